//! The client side's TLS transport, driven sans-IO: ciphertext the ring
//! received goes in ([`Transport::receive`]), plaintext comes out for the
//! head parser and the relay tracker; plaintext queued toward the client is
//! sealed into records ([`Transport::seal`]) that the shard sends like any
//! owned chunk. rustls never touches a socket and never blocks.
//!
//! Boxed in the session and allocated only for a TLS connection, so a
//! plaintext session pays one pointer and one check per receive and send.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use super::{Batch, Chunk, Env, Kind, Op, Session, Who};
use crate::error::Stage;

/// Plaintext sealed per send at most: about four records, so one send
/// carries a useful amount while a slow client's backlog stays in the
/// session's queue (counted, and subject to backpressure) rather than in
/// rustls.
pub const SEAL_MAX: usize = 64 * 1024;

pub struct Transport {
    conn: ServerConnection,
    /// The front chunk of the client's send queue is the unsent rest of
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
    /// The client sent close_notify: it will send nothing more.
    pub peer_closed: bool,
}

/// The connection failed (bad record, handshake failure, an alert from the
/// client); rustls has queued the alert it owes the client, if any.
#[derive(Debug)]
pub struct Failed {
    pub reason: &'static str,
    pub during_handshake: bool,
    pub detail: String,
}

impl Transport {
    pub fn new(cfg: &Arc<ServerConfig>) -> Result<Transport, rustls::Error> {
        let mut conn = ServerConnection::new(cfg.clone())?;
        conn.set_buffer_limit(Some(crate::tls::BUFFER_LIMIT));
        Ok(Transport {
            conn,
            cipher_front: false,
            notified: false,
        })
    }

    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The name the client asked for (SNI), once its hello is in.
    #[cfg(test)]
    pub fn server_name(&self) -> Option<&str> {
        self.conn.server_name()
    }

    /// Feeds received ciphertext, appending the plaintext it carried to
    /// `plain`. rustls keeps at most one partial record of it; `plain` grows
    /// by less than `data.len()`.
    pub fn receive(&mut self, mut data: &[u8], plain: &mut Vec<u8>) -> Result<Received, Failed> {
        let was_handshaking = self.conn.is_handshaking();
        let mut out = Received::default();
        while !data.is_empty() {
            let before = data.len();
            // Reading from a slice cannot fail for IO reasons; an error is
            // rustls refusing more (its plaintext buffer is full, which the
            // drain below prevents, or a record too large).
            if let Err(e) = self.conn.read_tls(&mut data) {
                return Err(self.fail("tls_bad_record", was_handshaking, e.to_string()));
            }
            if data.len() == before {
                return Err(self.fail(
                    "tls_bad_record",
                    was_handshaking,
                    "rustls took no bytes".into(),
                ));
            }
            let state = match self.conn.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    let reason = if self.conn.is_handshaking() {
                        "tls_handshake"
                    } else {
                        "tls_bad_record"
                    };
                    return Err(self.fail(reason, was_handshaking, e.to_string()));
                }
            };
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let at = plain.len();
                plain.resize(at + n, 0);
                if let Err(e) = self.conn.reader().read_exact(&mut plain[at..]) {
                    plain.truncate(at);
                    return Err(self.fail("tls_bad_record", was_handshaking, e.to_string()));
                }
            }
            if state.peer_has_closed() {
                out.peer_closed = true;
                break;
            }
        }
        out.handshake_done = was_handshaking && !self.conn.is_handshaking();
        Ok(out)
    }

    fn fail(&mut self, reason: &'static str, during_handshake: bool, detail: String) -> Failed {
        self.notified = true;
        Failed {
            reason,
            during_handshake,
            detail,
        }
    }

    /// Encrypts `plain` into records appended to `out`.
    pub fn seal(&mut self, mut plain: &[u8], out: &mut Vec<u8>) {
        while !plain.is_empty() {
            match self.conn.writer().write(plain) {
                Ok(n) if n > 0 => plain = &plain[n..],
                // The buffer limit: take the records out and go on.
                _ => {
                    let before = out.len();
                    self.take_records(out);
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
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail.
            match self.conn.write_tls(out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Queues close_notify (sent by the next `take_records`).
    pub fn notify_close(&mut self) {
        if !self.notified {
            self.notified = true;
            self.conn.send_close_notify();
        }
    }
}

impl Session {
    /// Ciphertext from the client, in ring buffer `bid`.
    pub(super) fn on_tls_data(&mut self, env: &mut Env, bid: u16, data: &[u8]) {
        // Decryption copies what it needs: the buffer goes back at once
        // (after this input, when the shard performs the op).
        env.op(Op::Recycle { bid });
        if self.kind() == Kind::ProxyHeader {
            // The PROXY header comes in clear, in front of the handshake.
            self.on_proxy_bytes(env, data);
        } else {
            self.on_tls_bytes(env, data);
        }
    }

    /// Ciphertext into the transport, plaintext on to the phase's handling.
    pub(super) fn on_tls_bytes(&mut self, env: &mut Env, data: &[u8]) {
        // After a failure (or close_notify) nothing more is read.
        if self.client.eof {
            return;
        }
        let Some(t) = self.tls.as_deref_mut() else {
            return;
        };
        let mut plain = Vec::new();
        let result = t.receive(data, &mut plain);
        if let Ok(r) = &result {
            if r.handshake_done && self.kind() == Kind::Head {
                // The head gets the usual time of its own.
                self.set_deadline(env.now + env.cfg.header_timeout());
            }
        }
        // Plaintext before a bad record was authentic: it goes on.
        if !plain.is_empty() {
            self.on_plain(env, plain);
        }
        match result {
            Ok(r) if r.peer_closed && !self.client.eof => {
                // close_notify: like a FIN, the client sends no more.
                self.client.eof = true;
                self.on_side_lost(env, Who::Client);
            }
            Ok(_) => {}
            Err(f) => {
                tracing::debug!(
                    session = self.id,
                    client = ?self.client_ip,
                    reason = f.reason,
                    detail = %f.detail,
                    "TLS failed"
                );
                self.tls_failed(env, f.reason, f.during_handshake);
            }
        }
    }

    /// Decrypted client bytes, by phase (as `on_data` for plaintext).
    fn on_plain(&mut self, env: &mut Env, plain: Vec<u8>) {
        match self.kind() {
            Kind::Head => self.on_head_bytes(env, &plain),
            Kind::Verify
            | Kind::Placement
            | Kind::Connecting
            | Kind::ConmanHandshake
            | Kind::Backoff => self.hold(env, &plain),
            Kind::Relay => {
                self.forward_owned(env, Who::Client, plain);
                if self.kind() == Kind::Relay {
                    self.close_progress(env);
                }
            }
            // Before the header is done no plaintext exists; when closing,
            // what the client says is read and dropped.
            Kind::ProxyHeader | Kind::Closing => {}
        }
    }

    /// The client's TLS connection failed or its handshake ran out of
    /// time: the alert rustls owes it (if any) goes out, then the socket
    /// closes. Nothing more is read.
    pub(super) fn tls_failed(&mut self, env: &mut Env, reason: &'static str, handshake: bool) {
        if let Some(t) = self.tls.as_deref_mut() {
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

    /// The client's connection ended: in the middle of the handshake, that
    /// is how most clients refuse a certificate (they close without
    /// sending their alert), so it is counted as a failed handshake.
    pub(super) fn tls_eof(&mut self, env: &mut Env) {
        if !self.client.eof && self.tls.as_ref().is_some_and(|t| t.handshaking()) {
            env.stats
                .setup_failure(Stage::Request, "tls_handshake_eof", false);
        }
    }

    /// The client's sends: what rustls has to say (handshake, alerts,
    /// tickets) and up to [`SEAL_MAX`] bytes of the queue, sealed into one
    /// owned chunk; or the unsent rest of the last records as they are.
    pub(super) fn kick_send_tls(&mut self, env: &mut Env) {
        let Some(t) = self.tls.as_deref_mut() else {
            return;
        };
        let sd = &mut self.client;
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
            who: Who::Client,
            fd,
            batch: Batch::One(chunk),
        });
    }

    /// A short send put records back at the front of `who`'s queue.
    pub(super) fn requeued_records(&mut self, who: Who) {
        if who == Who::Client {
            if let Some(t) = self.tls.as_deref_mut() {
                t.cipher_front = true;
            }
        }
    }

    /// Before the client's write side shuts: close_notify, once everything
    /// queued is out, so the client sees a clean end of the TLS stream.
    pub(super) fn close_notify(&mut self, env: &mut Env) {
        let sd = &self.client;
        if !sd.want_shut || sd.shut || sd.closed || !sd.drained() {
            return;
        }
        let Some(t) = self.tls.as_deref_mut() else {
            return;
        };
        if t.notified || t.handshaking() {
            return;
        }
        t.notify_close();
        self.kick_send_tls(env);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::ClientConnection;

    /// A server transport and a rustls client trusting its certificate.
    fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Transport, ClientConnection) {
        let (server, client) = crate::tls::testkit::pair(versions);
        (
            Transport::new(&server).unwrap(),
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
                assert_eq!(t.server_name(), Some("eval.test"));
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
