//! The TLS transports of a session, driven sans-IO: ciphertext the ring
//! received goes in ([`Transport::receive`]), plaintext comes out for the
//! head parser, the Conman response parser and the relay tracker;
//! plaintext queued toward a TLS side is sealed into records
//! ([`Transport::seal`]) that the shard sends like any owned chunk. rustls
//! never touches a socket and never blocks. Once a client's TLS 1.3
//! handshake is done, rustls hands its keys over and the session's own
//! record layer ([`crate::proto::tls_record`]) takes its place: one copy
//! per byte each way instead of rustls's two or three.
//!
//! The client side is a rustls server (`[[tls.certs]]`); the Conman side,
//! for a `wss://` URL, a rustls client (`[conman.tls]`), made anew for each
//! attempt. Both sit in one box ([`Tls`]), allocated only when a side speaks
//! TLS, so a plaintext session pays one pointer and one check per receive
//! and send.
//!
//! # Conman over TLS
//! After the TCP connect the session sends its ClientHello; the upgrade
//! request waits in the Conman queue (plaintext) and is sealed once the
//! handshake is done. The handshake has `conman.tls.handshake_timeout_ms`
//! (within the setup deadline); the 101 then gets
//! `limits.connect_timeout_ms` of its own. Any TLS failure before the 101
//! (a certificate refused either way, an alert, a bad record, Conman gone
//! or silent mid-handshake) is `stage=conman_tls` with a reason word
//! ([`conman_reason`]) and follows the usual retry policy: backoff, and a
//! new placement that excludes the VM, which passive health also passes
//! over for a while. A certificate problem is usually one VM's (expired,
//! issued for another name), so another VM is worth a try; the same VM is
//! never retried within a session. A wrong `conman.tls.ca_file` fails every
//! attempt the same way, which `eval_conman_attempt_failures_total` shows
//! per VM.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::{
    ClientConfig, ClientConnection, Connection, ProtocolVersion, ServerConfig, ServerConnection,
};

use super::{Batch, Chunk, Env, Kind, Op, Session, Who};
use crate::error::{SetupError, Stage};
use crate::proto::tls_record::{self, capture, Opened, Opener, Records, Sealer};

/// Plaintext sealed per send at most: about four records, so one send
/// carries a useful amount while a slow peer's backlog stays in the
/// session's queue (counted, and subject to backpressure) rather than in
/// rustls.
pub const SEAL_MAX: usize = 64 * 1024;

/// What a TLS 1.3 (or 1.2) AES-GCM record adds to its plaintext at most: a
/// 5-byte header, the inner content type and a 16-byte tag (1.2: an 8-byte
/// explicit nonce instead of the type).
const RECORD_OVERHEAD: usize = 5 + 8 + 16;

/// A session's TLS state, boxed: the client side's transport (a TLS
/// listener) and the Conman side's (a `wss://` attempt).
#[derive(Default)]
pub struct Tls {
    pub client: Option<Transport>,
    pub conman: Option<Box<Transport>>,
}

impl Tls {
    pub fn side(&mut self, who: Who) -> Option<&mut Transport> {
        match who {
            Who::Client => self.client.as_mut(),
            Who::Conman => self.conman.as_deref_mut(),
        }
    }

    pub fn side_ref(&self, who: Who) -> Option<&Transport> {
        match who {
            Who::Client => self.client.as_ref(),
            Who::Conman => self.conman.as_deref(),
        }
    }
}

pub struct Transport {
    /// rustls, for the handshake (and for TLS 1.2 and Conman connections
    /// throughout); `None` once a TLS 1.3 client connection is handed over
    /// to [`Own`].
    conn: Option<Connection>,
    own: Option<Box<Own>>,
    /// A server handshake's input until it makes whole records: rustls
    /// gets one record at a time, so the handover can happen right after
    /// the one that completes the handshake.
    staged: Vec<u8>,
    /// The traffic secrets rustls logged during the handshake.
    secrets: capture::Secrets,
    /// The verified subject of the client's certificate, kept at the
    /// handover.
    subject: Option<String>,
    /// The front chunk of the side's send queue is the unsent rest of
    /// records already sealed (a short send), not plaintext.
    pub cipher_front: bool,
    /// close_notify is queued (or the connection failed): nothing more is
    /// sealed.
    pub notified: bool,
}

/// What one receive brought.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// The handshake completed during this input.
    pub handshake_done: bool,
    /// The peer sent close_notify: it will send nothing more.
    pub peer_closed: bool,
}

/// The connection failed (bad record, handshake failure, an alert from the
/// peer); rustls has queued the alert it owes the peer, if any.
#[derive(Debug)]
pub struct Failed {
    pub reason: &'static str,
    pub during_handshake: bool,
    /// rustls' error, when it said one.
    pub error: Option<rustls::Error>,
    pub detail: String,
}

/// The `reason` word of a `stage=conman_tls` failure.
pub fn conman_reason(f: &Failed) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match &f.error {
        Some(E::InvalidCertificate(c)) => match c {
            C::UnknownIssuer | C::BadSignature => "unknown_ca",
            C::NotValidForName | C::NotValidForNameContext { .. } => "wrong_name",
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => "expired",
            _ => "bad_certificate",
        },
        // Conman refused our certificate, or that we sent none.
        Some(E::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied,
        )) => "client_cert_refused",
        Some(E::AlertReceived(_)) => "alert",
        Some(E::NoApplicationProtocol) => "alpn",
        _ if f.during_handshake => "handshake",
        _ => "bad_record",
    }
}

/// The `reason` word of a client's failed TLS connection: a client
/// certificate that did not verify (or none, where one is required) is
/// told apart from other handshake failures.
fn client_reason(f: &Failed) -> &'static str {
    match &f.error {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            "tls_client_cert"
        }
        _ => f.reason,
    }
}

impl Transport {
    /// The client side of a TLS listener.
    pub fn server(cfg: &Arc<ServerConfig>) -> Result<Transport, rustls::Error> {
        Ok(Self::wrap(ServerConnection::new(cfg.clone())?.into()))
    }

    /// The Conman side of a `wss://` attempt, for a certificate valid for
    /// `name` (the URL's host: a DNS name or an IP literal).
    pub fn conman(cfg: &Arc<ClientConfig>, name: &str) -> Result<Transport, String> {
        let name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{name:?}: {e}"))?;
        let conn = ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
        Ok(Self::wrap(conn.into()))
    }

    fn wrap(mut conn: Connection) -> Transport {
        conn.set_buffer_limit(Some(crate::tls::BUFFER_LIMIT));
        Transport {
            conn: Some(conn),
            own: None,
            staged: Vec::new(),
            secrets: capture::Secrets::default(),
            subject: None,
            cipher_front: false,
            notified: false,
        }
    }

    pub fn handshaking(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.is_handshaking())
    }

    /// The record layer is the session's own (the handover happened).
    #[cfg(test)]
    pub fn handed_over(&self) -> bool {
        self.own.is_some()
    }

    /// The verified subject of the peer's certificate, if it sent one
    /// (see [`crate::tls::peer_subject`]).
    pub fn peer_subject(&self) -> Option<String> {
        match &self.conn {
            Some(c) => crate::tls::peer_subject(c.peer_certificates()?.first()?),
            None => self.subject.clone(),
        }
    }

    /// Feeds received ciphertext, appending the plaintext it carried to
    /// `plain`, which grows by less than `data.len()`. At most one partial
    /// record is kept (by rustls, in `staged`, or in [`Records`]).
    pub fn receive(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<Received, Failed> {
        if self.own.is_some() {
            return self.receive_own(data, plain);
        }
        if matches!(self.conn, Some(Connection::Server(_))) && self.handshaking() {
            return self.receive_handshake(data, plain);
        }
        self.receive_rustls(data, plain)
    }

    /// A client's handshake: whole records to rustls one at a time, so
    /// that once the handshake is done what follows (application data in
    /// the same segment) stays ours for the handover.
    fn receive_handshake(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<Received, Failed> {
        let mut staged = std::mem::take(&mut self.staged);
        staged.extend_from_slice(data);
        let mut out = Received::default();
        let mut used = 0;
        while self.handshaking() {
            let rest = &staged[used..];
            if rest.len() < tls_record::HEADER {
                break;
            }
            let len = tls_record::HEADER + u16::from_be_bytes([rest[3], rest[4]]) as usize;
            // Not a record (a plaintext request, say): rustls refuses it
            // with the alert it owes.
            let plausible =
                (20..=23).contains(&rest[0]) && len <= tls_record::HEADER + (1 << 14) + 2048;
            let n = if !plausible {
                rest.len()
            } else if rest.len() >= len {
                len
            } else {
                break;
            };
            capture::take();
            let r = self.receive_rustls(&rest[..n], plain);
            let caught = capture::take();
            if caught.client.is_some() {
                self.secrets.client = caught.client;
            }
            if caught.server.is_some() {
                self.secrets.server = caught.server;
            }
            let r = r?;
            out.handshake_done |= r.handshake_done;
            out.peer_closed |= r.peer_closed;
            used += n;
            if r.peer_closed {
                return Ok(out);
            }
        }
        let rest = &staged[used..];
        if self.handshaking() {
            // Wait for the rest of the record; a hello is bounded by
            // rustls's own limits, checked as each record goes in.
            staged.drain(..used);
            self.staged = staged;
            return Ok(out);
        }
        if self.hand_over()? {
            if !rest.is_empty() {
                let r = self.receive_own(rest, plain)?;
                out.peer_closed |= r.peer_closed;
            }
        } else if !rest.is_empty() {
            let r = self.receive_rustls(rest, plain)?;
            out.peer_closed |= r.peer_closed;
        }
        Ok(out)
    }

    /// After a TLS 1.3 handshake: rustls's keys and sequence numbers go to
    /// the session's own record layer ([`tls_record`]); the tickets rustls
    /// has ready are sent ahead of our first record. TLS 1.2 (and a
    /// configuration without the key log) stays with rustls: `false`.
    fn hand_over(&mut self) -> Result<bool, Failed> {
        let Some(Connection::Server(c)) = &self.conn else {
            return Ok(false);
        };
        if c.protocol_version() != Some(ProtocolVersion::TLSv1_3)
            || self.secrets.client.is_none()
            || self.secrets.server.is_none()
        {
            return Ok(false);
        }
        self.subject = self.peer_subject();
        let mut owed = Vec::new();
        self.take_records(&mut owed);
        let Some(Connection::Server(c)) = self.conn.take() else {
            return Ok(false);
        };
        let secrets = std::mem::take(&mut self.secrets);
        let own = c
            .dangerous_extract_secrets()
            .map_err(|e| e.to_string())
            .and_then(|ex| {
                Ok(Own {
                    rx: Opener::new(ex.rx.0, ex.rx.1, secrets.client.unwrap_or_default())?,
                    tx: Sealer::new(ex.tx.0, ex.tx.1, secrets.server.unwrap_or_default())?,
                    owed,
                    update_owed: false,
                    ended: false,
                    records: Records::default(),
                })
            });
        match own {
            Ok(own) => {
                self.own = Some(Box::new(own));
                Ok(true)
            }
            // A bug, not the client's doing: the connection cannot go on.
            Err(detail) => Err(self.fail("tls_handover", false, None, detail)),
        }
    }

    /// Application-data records after the handover: each whole one is
    /// copied once into `plain` and opened there.
    fn receive_own(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<Received, Failed> {
        let mut out = Received::default();
        let Some(own) = self.own.as_deref_mut() else {
            return Ok(out);
        };
        let (rx, update_owed) = (&mut own.rx, &mut own.update_owed);
        let r = own.records.feed(data, |rec| {
            match rx.open(rec, plain)? {
                Opened::Data | Opened::Nothing => {}
                Opened::Closed => out.peer_closed = true,
                Opened::KeyUpdated { requested } => *update_owed |= requested,
            }
            Ok(!out.peer_closed)
        });
        match r {
            Ok(()) => Ok(out),
            Err(r) => {
                own.update_owed = false;
                if let Some(alert) = r.alert {
                    own.end_with(alert);
                } else {
                    own.ended = true;
                }
                own.records = Records::default();
                Err(fail_now(
                    &mut self.notified,
                    "tls_bad_record",
                    false,
                    None,
                    r.what.into(),
                ))
            }
        }
    }

    /// rustls's buffered path: ciphertext in, plaintext out.
    fn receive_rustls(&mut self, mut data: &[u8], plain: &mut Vec<u8>) -> Result<Received, Failed> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Received::default());
        };
        let was_handshaking = conn.is_handshaking();
        let notified = &mut self.notified;
        let mut out = Received::default();
        while !data.is_empty() {
            let before = data.len();
            // Reading from a slice cannot fail for IO reasons; an error is
            // rustls refusing more (its plaintext buffer is full, which the
            // drain below prevents, or a record too large).
            if let Err(e) = conn.read_tls(&mut data) {
                return Err(fail_now(
                    notified,
                    "tls_bad_record",
                    was_handshaking,
                    None,
                    e.to_string(),
                ));
            }
            if data.len() == before {
                let detail = "rustls took no bytes".into();
                return Err(fail_now(
                    notified,
                    "tls_bad_record",
                    was_handshaking,
                    None,
                    detail,
                ));
            }
            let state = match conn.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    let reason = if conn.is_handshaking() {
                        "tls_handshake"
                    } else {
                        "tls_bad_record"
                    };
                    let detail = e.to_string();
                    return Err(fail_now(notified, reason, was_handshaking, Some(e), detail));
                }
            };
            let mut n = state.plaintext_bytes_to_read();
            if n > 0 {
                plain.reserve(n);
                // Straight from rustls's buffer: one copy, no zeroing first.
                let mut reader = conn.reader();
                while n > 0 {
                    let got = match reader.fill_buf() {
                        Ok(b) if !b.is_empty() => {
                            plain.extend_from_slice(b);
                            b.len()
                        }
                        Ok(_) => break,
                        Err(e) => {
                            let detail = e.to_string();
                            return Err(fail_now(
                                notified,
                                "tls_bad_record",
                                was_handshaking,
                                None,
                                detail,
                            ));
                        }
                    };
                    reader.consume(got);
                    n = n.saturating_sub(got);
                }
            }
            if state.peer_has_closed() {
                out.peer_closed = true;
                break;
            }
        }
        out.handshake_done = was_handshaking && !conn.is_handshaking();
        Ok(out)
    }

    fn fail(
        &mut self,
        reason: &'static str,
        during_handshake: bool,
        error: Option<rustls::Error>,
        detail: String,
    ) -> Failed {
        fail_now(&mut self.notified, reason, during_handshake, error, detail)
    }

    /// Encrypts `plain` into records appended to `out`.
    pub fn seal(&mut self, mut plain: &[u8], out: &mut Vec<u8>) {
        if let Some(own) = self.own.as_deref_mut() {
            own.flush(out);
            own.tx.seal(plain, out);
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        while !plain.is_empty() {
            match conn.writer().write(plain) {
                Ok(n) if n > 0 => plain = &plain[n..],
                // The buffer limit: take the records out and go on.
                _ => {
                    let before = out.len();
                    rustls_records(conn, out);
                    if out.len() == before {
                        // Nothing left to make room with (cannot happen
                        // after the handshake): drop rather than spin.
                        debug_assert!(false, "rustls took no plaintext");
                        return;
                    }
                }
            }
        }
    }

    /// Records rustls has ready (handshake messages, alerts, sealed data,
    /// tickets), appended to `out`.
    pub fn take_records(&mut self, out: &mut Vec<u8>) {
        if let Some(own) = self.own.as_deref_mut() {
            own.flush(out);
            return;
        }
        if let Some(conn) = self.conn.as_mut() {
            rustls_records(conn, out);
        }
    }

    /// Queues close_notify (sent by the next `take_records`).
    pub fn notify_close(&mut self) {
        if !self.notified {
            self.notified = true;
            if let Some(own) = self.own.as_deref_mut() {
                own.end_with(tls_record::alert::CLOSE_NOTIFY);
            } else if let Some(conn) = self.conn.as_mut() {
                conn.send_close_notify();
            }
        }
    }
}

/// Records rustls has ready, appended to `out`.
fn rustls_records(conn: &mut Connection, out: &mut Vec<u8>) {
    while conn.wants_write() {
        // Writing into a Vec cannot fail.
        match conn.write_tls(out) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn fail_now(
    notified: &mut bool,
    reason: &'static str,
    during_handshake: bool,
    error: Option<rustls::Error>,
    detail: String,
) -> Failed {
    *notified = true;
    Failed {
        reason,
        during_handshake,
        error,
        detail,
    }
}

/// A TLS 1.3 client connection's record layer after the handover.
struct Own {
    rx: Opener,
    tx: Sealer,
    /// Records owed to the peer ahead of anything sealed next: the tickets
    /// rustls had ready at the handover, an alert.
    owed: Vec<u8>,
    /// The peer asked for a KeyUpdate: ours goes ahead of our next record.
    /// However many it asks for while we are silent, one answers them all
    /// (RFC 8446 §4.6.3), so a client cannot make us queue without bound.
    update_owed: bool,
    /// Our last record is sealed (close_notify or a fatal alert): nothing
    /// may follow it, not even a KeyUpdate.
    ended: bool,
    records: Records,
}

impl Own {
    fn flush_update(&mut self) {
        if std::mem::take(&mut self.update_owed) && !self.ended {
            self.tx.key_update(&mut self.owed);
        }
    }

    /// The last record we send: close_notify or a fatal alert.
    fn end_with(&mut self, alert: u8) {
        self.flush_update();
        if !self.ended {
            self.ended = true;
            self.tx.alert(alert, &mut self.owed);
        }
    }

    /// What is owed, appended to `out` (copied: `out` keeps the capacity
    /// its caller reserved for a whole send).
    fn flush(&mut self, out: &mut Vec<u8>) {
        self.flush_update();
        out.extend_from_slice(&self.owed);
        self.owed.clear();
    }
}

impl Session {
    /// `who`'s transport, when that side speaks TLS.
    pub(super) fn tls_side(&mut self, who: Who) -> Option<&mut Transport> {
        self.tls.as_deref_mut().and_then(|t| t.side(who))
    }

    pub(super) fn speaks_tls(&self, who: Who) -> bool {
        self.tls
            .as_deref()
            .is_some_and(|t| t.side_ref(who).is_some())
    }

    /// `who` speaks TLS and its handshake is not done.
    pub(super) fn tls_handshaking(&self, who: Who) -> bool {
        self.tls
            .as_deref()
            .and_then(|t| t.side_ref(who))
            .is_some_and(Transport::handshaking)
    }

    /// Ciphertext from `who`, in ring buffer `bid`.
    pub(super) fn on_tls_data(&mut self, env: &mut Env, who: Who, bid: u16, data: &[u8]) {
        // Decryption copies what it needs: the buffer goes back at once
        // (after this input, when the shard performs the op).
        env.op(Op::Recycle { bid });
        if who == Who::Client && self.kind() == Kind::ProxyHeader {
            // The PROXY header comes in clear, in front of the handshake.
            self.on_proxy_bytes(env, data);
        } else {
            self.on_tls_bytes(env, who, data);
        }
    }

    /// Ciphertext into `who`'s transport, plaintext on to the phase's
    /// handling.
    pub(super) fn on_tls_bytes(&mut self, env: &mut Env, who: Who, data: &[u8]) {
        // After a failure (or close_notify) nothing more is read.
        if self.side_ref(who).eof {
            return;
        }
        let Some(t) = self.tls_side(who) else {
            return;
        };
        let mut plain = Vec::new();
        let result = t.receive(data, &mut plain);
        if let Ok(r) = &result {
            if r.handshake_done {
                self.tls_handshake_done(env, who);
            }
        }
        // Plaintext before a bad record was authentic: it goes on.
        if !plain.is_empty() {
            self.on_plain(env, who, plain);
        }
        match result {
            Ok(r) if r.peer_closed && !self.side_ref(who).eof => {
                // close_notify: like a FIN, the peer sends no more.
                self.side(who).eof = true;
                self.on_side_lost(env, who);
            }
            Ok(_) => {}
            Err(f) => {
                tracing::debug!(
                    session = self.id,
                    side = ?who,
                    client = ?self.client_ip,
                    reason = f.reason,
                    detail = %f.detail,
                    "TLS failed"
                );
                match who {
                    Who::Client => self.tls_failed(env, client_reason(&f), f.during_handshake),
                    Who::Conman => self.conman_tls_failed(env, conman_reason(&f)),
                }
            }
        }
    }

    /// A handshake completed: the next step gets its own time.
    fn tls_handshake_done(&mut self, env: &mut Env, who: Who) {
        match (who, self.kind()) {
            // The head gets the usual time of its own.
            (Who::Client, Kind::Head) => self.set_deadline(env.now + env.cfg.header_timeout()),
            (Who::Conman, Kind::ConmanHandshake) => {
                let now = env.now;
                let Some(st) = self.phase.setup_mut() else {
                    return;
                };
                env.stats
                    .setup_duration(crate::metrics::Phase::ConmanTls, now - st.phase_started);
                // The upgrade's own time (and metric) starts now.
                st.phase_started = now;
                let answer = Duration::from_millis(env.cfg.limits.connect_timeout_ms);
                let t = st.deadline.min(now + answer);
                self.set_deadline(t);
            }
            _ => {}
        }
    }

    /// Decrypted bytes from `who`, by phase (as `on_data` for plaintext).
    fn on_plain(&mut self, env: &mut Env, who: Who, plain: Vec<u8>) {
        match (self.kind(), who) {
            (Kind::Head, Who::Client) => self.on_head_bytes(env, &plain),
            (
                Kind::Verify
                | Kind::Placement
                | Kind::Connecting
                | Kind::ConmanHandshake
                | Kind::Backoff,
                Who::Client,
            ) => self.hold(env, &plain),
            (Kind::ConmanHandshake, Who::Conman) => self.on_conman_head(env, &plain),
            (Kind::Relay, _) => {
                self.forward_owned(env, who, plain);
                if self.kind() == Kind::Relay {
                    self.close_progress(env);
                }
            }
            // Conman's answer to the client's Close still reaches the
            // client (as in `on_data`).
            (Kind::Closing, Who::Conman) if self.deliverable(Who::Client) => {
                self.forward_owned(env, who, plain)
            }
            // Before the header is done no plaintext exists; when closing,
            // what a peer says is read and dropped; so is what an abandoned
            // Conman attempt still says.
            _ => {}
        }
    }

    /// The client's TLS connection failed or its handshake ran out of
    /// time: the alert rustls owes it (if any) goes out, then the socket
    /// closes. Nothing more is read.
    pub(super) fn tls_failed(&mut self, env: &mut Env, reason: &'static str, handshake: bool) {
        if let Some(t) = self.tls_side(Who::Client) {
            t.notified = true;
        }
        if handshake || matches!(self.kind(), Kind::ProxyHeader | Kind::Head) {
            // No request was read: no session attempt, as for a refused
            // connection; the failure metric sees it.
            env.stats.setup_failure(Stage::Request, reason, false);
            self.begin_closing(env);
            self.client.eof = true;
        } else {
            // Mid-session the client's stream is broken: as if it was lost.
            self.client.eof = true;
            self.on_side_lost(env, Who::Client);
        }
    }

    /// Conman's TLS connection failed: during setup, a failed attempt of
    /// stage `conman_tls` (retried per the module doc); in relay, Conman
    /// is lost.
    pub(super) fn conman_tls_failed(&mut self, env: &mut Env, reason: &'static str) {
        match self.kind() {
            Kind::Connecting | Kind::ConmanHandshake => {
                self.retry_or_fail(env, SetupError::new(Stage::ConmanTls, reason));
            }
            _ => {
                self.conman.eof = true;
                self.on_side_lost(env, Who::Conman);
            }
        }
    }

    /// The client's connection ended: in the middle of the handshake, that
    /// is how most clients refuse a certificate (they close without
    /// sending their alert), so it is counted as a failed handshake.
    pub(super) fn tls_eof(&mut self, env: &mut Env) {
        if !self.client.eof && self.tls_handshaking(Who::Client) {
            env.stats
                .setup_failure(Stage::Request, "tls_handshake_eof", false);
        }
    }

    /// `who`'s sends: what rustls has to say (handshake, alerts, tickets)
    /// and up to [`SEAL_MAX`] bytes of the queue, sealed into one owned
    /// chunk; or the unsent rest of the last records as they are.
    pub(super) fn kick_send_tls(&mut self, env: &mut Env, who: Who) {
        let (sd, t) = match who {
            Who::Client => (
                &mut self.client,
                self.tls.as_deref_mut().and_then(|t| t.client.as_mut()),
            ),
            Who::Conman => (
                &mut self.conman,
                self.tls
                    .as_deref_mut()
                    .and_then(|t| t.conman.as_deref_mut()),
            ),
        };
        let Some(t) = t else {
            return;
        };
        if sd.sending || sd.fd < 0 || sd.shut || sd.closed {
            return;
        }
        let chunk = if std::mem::take(&mut t.cipher_front) {
            match sd.sendq.pop_front() {
                Some(c) => c,
                None => return,
            }
        } else {
            let mut out = Vec::new();
            if !t.handshaking() {
                // Sized for what is sealed (plus each record's header, type
                // and tag) up front: growing the Vec past 64 KiB doubled it
                // to 128 KiB, glibc's mmap threshold, and every send then
                // paid an mmap, page faults and an munmap.
                let mut plain = 0;
                for c in sd.sendq.iter() {
                    if plain >= SEAL_MAX {
                        break;
                    }
                    plain += c.remaining();
                }
                out.reserve(plain + plain.div_ceil(16 * 1024) * RECORD_OVERHEAD + 512);
                let mut n = 0;
                while n < SEAL_MAX {
                    let Some(c) = sd.sendq.pop_front() else {
                        break;
                    };
                    let len = c.remaining();
                    // After close_notify or a failure nothing may follow:
                    // what is still queued is dropped.
                    if !t.notified {
                        let bytes: &[u8] = match &c {
                            Chunk::Buf { bid, off, len } => env.ring.bytes(*bid, *off, *len),
                            Chunk::Owned { data, off } => &data[*off as usize..],
                        };
                        t.seal(bytes, &mut out);
                    }
                    sd.unqueue(len);
                    sd.disown(&c, len);
                    if let Chunk::Buf { bid, .. } = c {
                        env.op(Op::Recycle { bid });
                    }
                    n += len;
                }
            }
            t.take_records(&mut out);
            if out.is_empty() {
                return;
            }
            let c = Chunk::Owned {
                data: out.into_boxed_slice(),
                off: 0,
            };
            // Counted like any owned bytes queued: backpressure and the
            // shard's buffer budget see ciphertext in flight.
            sd.queued += c.remaining();
            sd.owned += c.remaining() as u32;
            c
        };
        sd.sending = true;
        sd.inflight += 1;
        let fd = sd.fd;
        env.op(Op::Send {
            who,
            fd,
            batch: Batch::One(chunk),
            fin: false,
        });
    }

    /// A short send put records back at the front of `who`'s queue.
    pub(super) fn requeued_records(&mut self, who: Who) {
        if let Some(t) = self.tls_side(who) {
            t.cipher_front = true;
        }
    }

    /// Before `who`'s write side shuts: close_notify, once everything
    /// queued is out, so the peer sees a clean end of the TLS stream.
    pub(super) fn close_notify(&mut self, env: &mut Env, who: Who) {
        let sd = self.side_ref(who);
        if !sd.want_shut || sd.shut || sd.closed || !sd.drained() {
            return;
        }
        let Some(t) = self.tls_side(who) else {
            return;
        };
        if t.notified || t.handshaking() {
            return;
        }
        t.notify_close();
        self.kick_send_tls(env, who);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::ClientConnection;
    use std::io::Read;

    /// A server transport and a rustls client trusting its certificate.
    fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Transport, ClientConnection) {
        let (server, client) = crate::tls::testkit::pair(versions);
        (
            Transport::server(&server).unwrap(),
            crate::tls::testkit::client(&client),
        )
    }

    /// Moves bytes both ways until neither has anything to say; what the
    /// server decrypted is appended to `plain`. `chunk` splits the client's
    /// bytes into inputs of at most that size (ring buffers).
    fn shuttle(t: &mut Transport, c: &mut ClientConnection, plain: &mut Vec<u8>, chunk: usize) {
        for _ in 0..64 {
            let mut to_server = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut to_server).unwrap();
            }
            for piece in to_server.chunks(chunk) {
                t.receive(piece, plain).unwrap();
            }
            let mut to_client = Vec::new();
            t.take_records(&mut to_client);
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
            let mut rd = &to_client[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        panic!("no quiescence");
    }

    #[test]
    fn handshake_then_bytes_both_ways_at_every_split() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            for chunk in [1, 7, 64, 16384] {
                let (mut t, mut c) = pair(versions);
                let mut plain = Vec::new();
                assert!(t.handshaking());
                shuttle(&mut t, &mut c, &mut plain, chunk);
                assert!(!t.handshaking());
                assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
                assert_eq!(t.handed_over(), versions[0] == &rustls::version::TLS13);
                // Larger than a record and than the buffer limit.
                let msg: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
                // The client's own buffer limit (64 KiB) asks for steps.
                for piece in msg.chunks(40_000) {
                    c.writer().write_all(piece).unwrap();
                    shuttle(&mut t, &mut c, &mut plain, chunk);
                }
                assert_eq!(plain, msg, "client -> server, chunk {chunk}");
                let mut sealed = Vec::new();
                t.seal(&msg, &mut sealed);
                t.take_records(&mut sealed);
                let mut rd = &sealed[..];
                let mut got = Vec::new();
                while !rd.is_empty() {
                    c.read_tls(&mut rd).unwrap();
                    let st = c.process_new_packets().unwrap();
                    let n = st.plaintext_bytes_to_read();
                    let at = got.len();
                    got.resize(at + n, 0);
                    c.reader().read_exact(&mut got[at..]).unwrap();
                }
                assert_eq!(got, msg, "server -> client");
            }
        }
    }

    /// What the client says after the handshake (its Finished and its
    /// first request in one segment) is opened by the session's own
    /// record layer, and every cipher suite agrees with rustls both ways.
    #[test]
    fn data_behind_the_finished_and_every_suite_after_the_handover() {
        let suites = crate::tls::crypto_provider().cipher_suites;
        let tls13: Vec<_> = suites.iter().filter(|s| s.tls13().is_some()).collect();
        assert_eq!(tls13.len(), 3);
        for &suite in tls13 {
            let (server, client) = crate::tls::testkit::pair_offering(&[suite]);
            let mut t = Transport::server(&server).unwrap();
            let mut c = crate::tls::testkit::client(&client);
            let mut plain = Vec::new();
            // Hello; the server's flight back.
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            t.receive(&wire, &mut plain).unwrap();
            let mut back = Vec::new();
            t.take_records(&mut back);
            c.read_tls(&mut &back[..]).unwrap();
            c.process_new_packets().unwrap();
            assert!(!c.is_handshaking());
            // Finished and a request, in one input.
            c.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let r = t.receive(&wire, &mut plain).unwrap();
            assert!(r.handshake_done);
            assert!(t.handed_over(), "{suite:?}");
            assert_eq!(plain, b"GET / HTTP/1.1\r\n\r\n");
            // The tickets go first, then our records; the client reads all.
            let mut out = Vec::new();
            t.seal(b"HTTP/1.1 101", &mut out);
            let got = client_reads(&mut c, &out);
            assert_eq!(got, b"HTTP/1.1 101", "{suite:?}");
        }
    }

    /// The client updates its key and asks for ours: its next records
    /// open under its new key, and ours reach it under our new one.
    #[test]
    fn key_update_from_the_client_is_followed_and_answered() {
        let (mut t, mut c) = pair(&[&rustls::version::TLS13]);
        let mut plain = Vec::new();
        shuttle(&mut t, &mut c, &mut plain, 4096);
        assert!(t.handed_over());
        for round in 0..3 {
            c.refresh_traffic_keys().unwrap();
            c.writer().write_all(b"after the update").unwrap();
            plain.clear();
            shuttle(&mut t, &mut c, &mut plain, 100);
            assert_eq!(plain, b"after the update", "round {round}");
            let mut out = Vec::new();
            t.seal(b"and back", &mut out);
            assert_eq!(client_reads(&mut c, &out), b"and back", "round {round}");
        }
    }

    /// A record changed on the way fails the connection with the alert
    /// owed (bad_record_mac), sealed for the client to read.
    #[test]
    fn a_forged_record_after_the_handover_gets_an_alert() {
        let (mut t, mut c) = pair(&[&rustls::version::TLS13]);
        let mut plain = Vec::new();
        shuttle(&mut t, &mut c, &mut plain, 4096);
        c.writer().write_all(b"x").unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let e = t.receive(&wire, &mut plain).unwrap_err();
        assert_eq!(e.reason, "tls_bad_record");
        assert!(t.notified);
        let mut out = Vec::new();
        t.take_records(&mut out);
        c.read_tls(&mut &out[..]).unwrap();
        let e = c.process_new_packets().unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
            ),
            "{e:?}"
        );
    }

    /// Everything the client can read in `wire`.
    fn client_reads(c: &mut ClientConnection, mut wire: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        while !wire.is_empty() {
            c.read_tls(&mut wire).unwrap();
            let st = c.process_new_packets().unwrap();
            let at = got.len();
            got.resize(at + st.plaintext_bytes_to_read(), 0);
            c.reader().read_exact(&mut got[at..]).unwrap();
        }
        got
    }

    #[test]
    fn close_notify_is_reported_and_sent() {
        let (mut t, mut c) = pair(&[&rustls::version::TLS13]);
        let mut plain = Vec::new();
        shuttle(&mut t, &mut c, &mut plain, 4096);
        c.send_close_notify();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let r = t.receive(&wire, &mut plain).unwrap();
        assert!(r.peer_closed);
        t.notify_close();
        let mut out = Vec::new();
        t.take_records(&mut out);
        let mut rd = &out[..];
        c.read_tls(&mut rd).unwrap();
        assert!(c.process_new_packets().unwrap().peer_has_closed());
    }

    #[test]
    fn garbage_fails_the_handshake_with_an_alert() {
        let (mut t, _) = pair(&[&rustls::version::TLS13]);
        let mut plain = Vec::new();
        let e = t
            .receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut plain)
            .unwrap_err();
        assert!(e.during_handshake);
        assert!(plain.is_empty());
        let mut out = Vec::new();
        t.take_records(&mut out);
        assert_eq!(out.first(), Some(&21), "an alert record");
    }

    #[test]
    fn first_record_may_come_a_byte_at_a_time() {
        let (mut t, mut c) = pair(&[&rustls::version::TLS13]);
        let mut hello = Vec::new();
        c.write_tls(&mut hello).unwrap();
        let mut plain = Vec::new();
        for b in &hello[..hello.len() - 1] {
            let r = t.receive(std::slice::from_ref(b), &mut plain).unwrap();
            assert!(!r.handshake_done);
        }
        let mut out = Vec::new();
        t.take_records(&mut out);
        assert!(out.is_empty(), "nothing before the whole hello");
        t.receive(&hello[hello.len() - 1..], &mut plain).unwrap();
        t.take_records(&mut out);
        assert_eq!(out.first(), Some(&22), "a handshake record");
    }
}
