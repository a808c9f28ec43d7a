//! What the session registry (`GET /sessions`, `POST /sessions/{id}/close`,
//! `POST /vms/{id}/evacuate`) sees of a session and asks of it. Every
//! decision is here, sans-IO: whether a session matches a filter, what it
//! looks like in the listing, whether an evacuation concerns it, and what
//! it sends when it is closed. The shard only walks its sessions and
//! performs what they queue (`shard/registry.rs`).

use std::sync::Arc;
use std::time::Instant;

use super::live::Live;
use super::{access, Env, Kind, Session, Who};
use crate::error::{SetupError, Stage};
use crate::keys::Ident;
use crate::proto::close;

/// `GET /sessions` filters: each one set must equal the session's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub repl: Option<String>,
    pub user: Option<String>,
    pub vm: Option<String>,
}

impl Filter {
    pub fn matches(&self, repl: Option<&str>, user: Option<&str>, vm: Option<&str>) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        eq(&self.repl, repl) && eq(&self.user, user) && eq(&self.vm, vm)
    }
}

/// One session as the listing shows it; built on the session's shard,
/// turned into JSON by the admin thread. The ids are shared, not copied.
#[derive(Debug, Clone)]
pub struct Info {
    pub id: u64,
    pub shard: usize,
    pub ident: Option<Arc<Ident>>,
    /// The VM relayed to, or the one the current setup attempt dials.
    pub vm: Option<Arc<str>>,
    pub phase: Kind,
    pub age_ms: u64,
    /// Milliseconds since anything arrived from the client and from
    /// Conman; `None` before relaying starts (keepalive keeps this clock).
    pub since_client_ms: Option<u64>,
    pub since_conman_ms: Option<u64>,
    pub bytes_from_client: u64,
    pub bytes_from_conman: u64,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ProxyHeader => "proxy_header",
            Kind::Head => "head",
            Kind::Verify => "verify",
            Kind::Placement => "placement",
            Kind::Connecting => "connecting",
            Kind::ConmanHandshake => "conman_handshake",
            Kind::Backoff => "backoff",
            Kind::Relay => "relay",
            Kind::Closing => "closing",
        }
    }
}

/// How a session uses a VM an evacuation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnVm {
    /// Relaying to it: closed at its planned time (1012 to the client).
    Relay,
    /// Dialing it or waiting for its 101: that attempt is dropped at once
    /// and the setup goes on with another VM, as after a failed attempt.
    Setup,
}

/// The default code of `POST /sessions/{id}/close`: the session was ended
/// on purpose; a client that wants to reconnect may.
pub const ADMIN_CLOSE_CODE: u16 = close::NORMAL;

/// The reason text of an operator's close.
pub fn admin_close_reason() -> String {
    close::reason_text("admin", "closed", None)
}

/// The reason text a client of an evacuated VM gets with its 1012.
pub fn evacuate_reason(retry_after_ms: u64) -> String {
    close::reason_text("conman", "evacuate", Some(retry_after_ms))
}

/// A code an operator may ask for: one a peer may put on the wire.
pub fn valid_close_code(code: u16) -> bool {
    close::is_valid_code(code)
}

impl Session {
    /// The VM in use: relayed to, or dialed by the current attempt.
    fn current_vm(&self) -> Option<&str> {
        match self.kind() {
            Kind::Relay | Kind::Closing => self.vm.as_deref(),
            Kind::Connecting | Kind::ConmanHandshake => {
                self.phase.setup().and_then(|st| st.vm_name())
            }
            _ => None,
        }
    }

    pub fn matches(&self, f: &Filter) -> bool {
        let ident = self.ident.as_deref();
        f.matches(
            ident.map(Ident::repl),
            ident.map(Ident::user),
            self.current_vm(),
        )
    }

    /// The listing's view of this session on shard `shard` at `now`.
    pub fn info(&self, shard: usize, now: Instant) -> Info {
        let clock = self.clock(now);
        let since = |who| {
            self.live()
                .map(|l: &Live| u64::from(clock.wrapping_sub(l.heard_at(who))))
        };
        Info {
            id: self.id,
            shard,
            ident: self.ident.clone(),
            vm: match (&self.vm, self.current_vm()) {
                (Some(v), Some(_)) => Some(v.clone()),
                (_, Some(v)) => Some(Arc::from(v)),
                _ => None,
            },
            phase: self.kind(),
            age_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            since_client_ms: since(Who::Client),
            since_conman_ms: since(Who::Conman),
            bytes_from_client: self.bytes[0],
            bytes_from_conman: self.bytes[1],
        }
    }

    /// Whether an evacuation of the VMs in `evacuated` concerns this
    /// session, and how.
    pub fn on_vm(&self, evacuated: &[String]) -> Option<OnVm> {
        let vm = self.current_vm()?;
        if !evacuated.iter().any(|e| e == vm) {
            return None;
        }
        match self.kind() {
            Kind::Relay => Some(OnVm::Relay),
            Kind::Connecting | Kind::ConmanHandshake => Some(OnVm::Setup),
            _ => None,
        }
    }

    /// An evacuation reached this session (at its planned time, or at once
    /// for one in setup). A relaying session on an evacuated VM closes:
    /// 1012 `stage=conman;reason=evacuate;retry_after_ms=N` to the client,
    /// which reconnects and is placed elsewhere, 1001 to Conman. A setup
    /// attempt on one is abandoned for another VM. Anything else (the VM
    /// was restored meanwhile, the session moved on) is left alone.
    pub fn handle_evacuate(&mut self, env: &mut Env, evacuated: &[String], retry_after_ms: u64) {
        match self.on_vm(evacuated) {
            Some(OnVm::Relay) => {
                self.ended(access::End::Proxy);
                let reason = evacuate_reason(retry_after_ms);
                self.end_session(env, close::SERVICE_RESTART, &reason);
            }
            Some(OnVm::Setup) => {
                let stage = match self.kind() {
                    Kind::Connecting => Stage::ConmanConnect,
                    _ => Stage::ConmanHandshake,
                };
                self.retry_or_fail(env, SetupError::new(stage, "evacuate"));
            }
            None => return,
        }
        self.advance(env);
    }

    /// `POST /sessions/{id}/close?code=`: a relaying session gets `code` and
    /// `stage=admin;reason=closed`, Conman 1001. One still being set up
    /// fails as a drain fails it (1012, `stage=drain;reason=closed`): it
    /// holds no relay yet whose end could carry the code; one not yet
    /// upgraded just ends.
    pub fn handle_admin_close(&mut self, env: &mut Env, code: u16) {
        self.ended(access::End::Proxy);
        match self.kind() {
            Kind::Relay => self.end_session(env, code, &admin_close_reason()),
            Kind::Placement | Kind::Connecting | Kind::ConmanHandshake | Kind::Backoff => {
                self.fail_setup(env, SetupError::new(Stage::Drain, "closed"))
            }
            Kind::ProxyHeader | Kind::Head | Kind::Verify => self.begin_closing(env),
            Kind::Closing => {}
        }
        self.advance(env);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(repl: Option<&str>, user: Option<&str>, vm: Option<&str>) -> Filter {
        Filter {
            repl: repl.map(Into::into),
            user: user.map(Into::into),
            vm: vm.map(Into::into),
        }
    }

    #[test]
    fn every_filter_set_must_match_exactly() {
        let s = (Some("r1"), Some("alice"), Some("vm-1"));
        assert!(f(None, None, None).matches(s.0, s.1, s.2));
        assert!(f(Some("r1"), None, None).matches(s.0, s.1, s.2));
        assert!(f(Some("r1"), Some("alice"), Some("vm-1")).matches(s.0, s.1, s.2));
        assert!(
            !f(Some("r"), None, None).matches(s.0, s.1, s.2),
            "no prefix match"
        );
        assert!(!f(None, Some("bob"), None).matches(s.0, s.1, s.2));
        assert!(!f(None, None, Some("vm-2")).matches(s.0, s.1, s.2));
        // A session without a VM yet (or without a token) matches no value.
        assert!(!f(None, None, Some("vm-1")).matches(s.0, s.1, None));
        assert!(!f(Some("r1"), None, None).matches(None, None, None));
        assert!(f(None, None, None).matches(None, None, None));
    }

    #[test]
    fn reasons_are_machine_readable() {
        assert_eq!(
            evacuate_reason(1234),
            "stage=conman;reason=evacuate;retry_after_ms=1234"
        );
        assert_eq!(admin_close_reason(), "stage=admin;reason=closed");
        assert!(valid_close_code(ADMIN_CLOSE_CODE));
        for bad in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
            assert!(!valid_close_code(bad), "{bad}");
        }
        for good in [1000, 1001, 1008, 1012, 3000, 4999] {
            assert!(valid_close_code(good), "{good}");
        }
    }
}
