//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`
//! and `POST /drain`. Plain blocking HTTP/1.1 on its own thread: it serves
//! operators and scrapers, never user traffic. A thread per connection, at
//! most `MAX_CONNS` of them, each with a whole-request and a whole-response
//! deadline.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::control::drain::{self, Lifecycle};
use crate::keys::KeyStore;
use crate::log_every::LogEvery;
use crate::metrics::{self, names, ShardStats};

pub struct Admin {
    pub stats: Vec<Arc<ShardStats>>,
    pub control: Arc<crate::control::ControlStats>,
    /// The token keys in force; their reload count is exported.
    pub keys: Arc<KeyStore>,
    pub lifecycle: Arc<Lifecycle>,
    /// The config in force; its reload counts are exported.
    pub config: Arc<crate::reload::ConfigStore>,
    /// `POST /revoke`, `GET /revocations` (`crate::revocations`).
    pub revocations: Arc<crate::revocations::Revocations>,
}

impl Admin {
    /// The `/metrics` body: the data shards', the process's, the control
    /// shard's.
    pub fn metrics(&self) -> String {
        let mut body = metrics::render(&self.stats);
        metrics::gauge(
            &mut body,
            names::DRAINING,
            "1 once a drain has started (/readyz is 503).",
            u64::from(!self.lifecycle.ready()),
        );
        metrics::counter(
            &mut body,
            names::CONFIG_RELOADS,
            "Config reloads put in force (SIGHUP).",
            self.config.epoch(),
        );
        metrics::counter(
            &mut body,
            names::CONFIG_RELOAD_FAILURES,
            "Config reloads refused (invalid file, or a key that needs a restart); the old config stayed.",
            self.config.failures(),
        );
        metrics::gauge(
            &mut body,
            names::DRAIN_PHASE,
            "Drain phase: 0 running, 1 not ready (still accepting), 2 draining (not accepting), 3 closing the rest, 4 done.",
            self.lifecycle.phase() as u64,
        );
        metrics::gauge(
            &mut body,
            names::DRAIN_SESSIONS_LEFT,
            "Connections still open (what a drain waits for), all shards.",
            drain::sessions_left(&self.stats),
        );
        metrics::counter(
            &mut body,
            names::TOKEN_KEY_RELOADS,
            "Successful reloads of the token keys (SIGHUP or keys_dir change).",
            self.keys.epoch(),
        );
        self.revocations.render(&mut body);
        self.control.render(&mut body);
        body
    }
}

/// At most this many admin connections are served at once, each on its own
/// thread; one more is answered `503` (`Connection: close`) from the accept
/// loop and closed, without a thread. Scrapers and probes open a handful;
/// idle or hostile connections cannot pile up threads past this.
pub const MAX_CONNS: usize = 32;

/// The whole request head must arrive within this, however it is dripped:
/// the socket's read timeout is reset to what is left before each read.
/// It is also what frees a slot held by an idle connection, so a scrape
/// refused at the cap succeeds again within about this long.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// The whole response must be written within this (same rule, for writes).
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(5);

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// How long the accept loop waits before looking whether the listener was
/// handed to a new process.
const STOP_POLL_MS: i32 = 200;

/// Serves until the process exits, or until the listener is handed to a
/// new process ([`Lifecycle::admin_stopped`]). Each connection gets its own
/// short-lived thread, at most `MAX_CONNS` at once, and `REQUEST_DEADLINE`
/// plus `RESPONSE_DEADLINE` in total, so a stuck or hostile client cannot
/// block others for long nor pile up threads.
pub fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut accept_warn = LogEvery::default();
    let mut busy_warn = LogEvery::default();
    // Non-blocking, polled: after a handover the new process accepts on
    // the same socket, and this loop must notice that it is to stop.
    let _ = listener.set_nonblocking(true);
    loop {
        if admin.lifecycle.admin_stopped() {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, a local that outlives the call.
        unsafe { libc::poll(&mut pfd, 1, STOP_POLL_MS) };
        if admin.lifecycle.admin_stopped() {
            return;
        }
        let conn = match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => other.map(|(s, _)| s),
        };
        match conn {
            Ok(stream) => {
                let _ = stream.set_nonblocking(false);
                let Some(slot) = Slot::take(&active) else {
                    if let Some(held_back) = busy_warn.check(Instant::now()) {
                        warn!(
                            max = MAX_CONNS,
                            held_back, "admin connections at the cap; refusing"
                        );
                    }
                    refuse(stream);
                    continue;
                };
                let admin = admin.clone();
                // On a failed spawn the closure, and with it `slot`, drops.
                let _ = std::thread::Builder::new()
                    .name("admin-conn".into())
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = handle(stream, &admin) {
                            debug!(err = %e, "admin request failed");
                        }
                    });
            }
            Err(e) => {
                if let Some(held_back) = accept_warn.check(Instant::now()) {
                    warn!(err = %e, held_back, "admin accept failed");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One of the `MAX_CONNS` connection slots, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Over the cap: a `503` if the socket takes it without blocking, then close.
fn refuse(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_ok() {
        let _ = stream.write(BUSY);
    }
}

/// The time left until `deadline`, or `TimedOut` when none is.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "admin deadline passed"))
}

fn handle(mut stream: TcpStream, admin: &Admin) -> io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, target) = loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                )
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
            _ => return respond(&mut stream, 400, "text/plain", "bad request\n"),
        }
    };
    let path = target.split('?').next().unwrap_or("");
    match (method.as_str(), path) {
        (m, "/revoke" | "/revocations") => {
            let (status, body) = crate::revocations::admin_request(
                &admin.revocations,
                m,
                &target,
                &buf,
                &mut stream,
                deadline,
            );
            respond(&mut stream, status, "application/json", &body)
        }
        ("GET", "/metrics") => {
            let body = admin.metrics();
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body)
        }
        ("GET", "/healthz") => respond(&mut stream, 200, "text/plain", "ok\n"),
        ("GET", "/readyz") => {
            if !admin.lifecycle.ready() {
                respond(&mut stream, 503, "text/plain", "draining\n")
            } else {
                respond(&mut stream, 200, "text/plain", "ready\n")
            }
        }
        ("POST", "/drain") => {
            admin.lifecycle.request(drain::Request::Drain);
            respond(&mut stream, 202, "text/plain", "draining\n")
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/drain") => {
            respond(&mut stream, 405, "text/plain", "method not allowed\n")
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n"),
    }
}

fn respond(stream: &mut TcpStream, status: u16, ctype: &str, body: &str) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let deadline = Instant::now() + RESPONSE_DEADLINE;
    write_all_by(stream, head.as_bytes(), deadline)?;
    write_all_by(stream, body.as_bytes(), deadline)
}

/// `write_all`, with the socket's write timeout reset to what is left of
/// `deadline` before each write, so a slow reader cannot stretch it.
fn write_all_by(stream: &mut TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Stage;
    use crate::metrics::{CloseSide, Phase};
    use crate::token::KeySet;
    use std::collections::BTreeMap;

    fn admin() -> Admin {
        Admin {
            stats: vec![Arc::new(ShardStats::default())],
            control: Default::default(),
            keys: Arc::new(KeyStore::new(KeySet::new())),
            lifecycle: Arc::new(
                Lifecycle::new(
                    drain::DrainTimes {
                        readiness_delay: Duration::ZERO,
                        grace: Duration::ZERO,
                        close_spread: Duration::ZERO,
                    },
                    drain::Wakers { fds: Vec::new() },
                )
                .unwrap(),
            ),
            config: Arc::new(crate::reload::ConfigStore::new({
                let mut cfg = crate::config::Config::default();
                cfg.placement.default = Some("ws://127.0.0.1:1/".into());
                crate::reload::Loaded::new(cfg).unwrap()
            })),
            revocations: Arc::new(crate::revocations::Revocations::new(
                Default::default(),
                None,
                Vec::new(),
                false,
            )),
        }
    }

    #[test]
    fn slots_stop_at_the_cap_and_come_back_on_drop() {
        let active = Arc::new(AtomicUsize::new(0));
        let held: Vec<Slot> = (0..MAX_CONNS).map_while(|_| Slot::take(&active)).collect();
        assert_eq!(held.len(), MAX_CONNS);
        assert!(Slot::take(&active).is_none());
        drop(held);
        assert_eq!(active.load(Ordering::Acquire), 0);
        assert!(Slot::take(&active).is_some());
    }

    #[test]
    fn a_passed_deadline_is_a_timeout() {
        let e = remaining(Instant::now()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(remaining(Instant::now() + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn key_reloads_are_a_counter_read_from_the_store() {
        let a = admin();
        a.keys.replace(KeySet::new());
        a.keys.replace(KeySet::new());
        let body = a.metrics();
        let reloads = names::TOKEN_KEY_RELOADS;
        assert!(body.contains(&format!("# TYPE {reloads} counter\n")));
        assert!(body.lines().any(|l| l == format!("{reloads} 2")));
    }

    /// `/metrics` exports every name in `names::ALL`, once, with its
    /// declared type, and no series that is not declared there.
    #[test]
    fn metrics_exports_exactly_the_declared_names() {
        let a = admin();
        let s = &a.stats[0];
        s.setup_failure(Stage::Token, "bad_signature", true);
        s.attempt_failure(Stage::ConmanConnect, "refused", "vm-1".into());
        s.close_code(CloseSide::Client, 1000);
        s.http_response(404);
        s.setup_duration(Phase::Token, Duration::from_millis(3));
        let body = a.metrics();
        let declared: BTreeMap<&str, &str> =
            names::ALL.iter().map(|&(n, k)| (n, k.as_str())).collect();
        let typed: Vec<(&str, &str)> = body
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
            .collect();
        assert_eq!(typed.len(), declared.len(), "a name typed twice?\n{body}");
        assert_eq!(typed.into_iter().collect::<BTreeMap<_, _>>(), declared);
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            let series = l.split(['{', ' ']).next().unwrap();
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|sfx| series.strip_suffix(sfx))
                .find(|base| declared.get(base) == Some(&"histogram"))
                .unwrap_or(series);
            assert!(declared.contains_key(name), "{series} is not in names.rs");
            assert!(
                body.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
    }
}
