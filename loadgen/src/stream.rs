//! A client connection's byte stream: the TCP socket itself, or rustls on
//! top of it, driven without blocking by the same readiness events (the
//! worker's epoll loop is edge-triggered, so every call here either makes
//! progress or reports `WouldBlock` from the socket itself).
//!
//! The client offers one suite and one group (TLS 1.3, AES-128-GCM,
//! X25519), so every server of a benchmark negotiates the same
//! handshake and record cost, and resumes with TLS 1.3 tickets kept in
//! one [`TicketPool`] per run (shared by all connections and threads).

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use mio::net::TcpStream;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, NamedGroup, RootCertStore};

/// TLS 1.3 tickets kept per server name; the oldest go first.
const MAX_TICKETS: usize = 4096;

/// What TLS connections of a run share: the client config (with its
/// session cache) and the name to send and verify.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsClient {
    /// Trusts the certificates in the PEM file `ca`, sends and verifies
    /// `name`, and resumes sessions when `resume` is set.
    pub fn new(ca: &Path, name: &str, resume: bool) -> Result<Self, String> {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificate in it", ca.display()));
        }
        let name =
            ServerName::try_from(name.to_owned()).map_err(|e| format!("--sni {name:?}: {e}"))?;
        // The proxy's provider, narrowed to what every peer is measured with.
        let mut provider = eval_proxy::tls::crypto_provider();
        provider
            .kx_groups
            .retain(|g| g.name() == NamedGroup::X25519);
        provider
            .cipher_suites
            .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = if resume {
            Resumption::store(Arc::new(TicketPool::new()))
        } else {
            Resumption::disabled()
        };
        Ok(Self {
            config: Arc::new(config),
            name,
        })
    }
}

/// TLS 1.3 tickets for the next connection to the same name, as many as
/// the servers sent. rustls' own cache keeps 8 per name: with more
/// connections than that under way at once (16 handshake workers), a
/// server that sends one ticket per handshake would be resumed only
/// about half the time, and one that sends two would look better than it
/// is. Each ticket is still used once.
#[derive(Debug)]
struct TicketPool {
    tickets: Mutex<HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>>,
    /// The rest (the group hint, TLS 1.2 sessions) as rustls keeps it.
    other: ClientSessionMemoryCache,
}

impl TicketPool {
    fn new() -> Self {
        Self {
            tickets: Mutex::default(),
            other: ClientSessionMemoryCache::new(16),
        }
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.other.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.other.kx_hint(name)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.other.set_tls12_session(name, value);
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.other.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.other.remove_tls12_session(name);
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut all = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        let tickets = all.entry(name).or_default();
        if tickets.len() == MAX_TICKETS {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let mut all = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        all.get_mut(name)?.pop_back()
    }
}

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

pub struct TlsStream {
    tcp: TcpStream,
    tls: ClientConnection,
}

impl Stream {
    pub fn new(tcp: TcpStream, tls: Option<&TlsClient>) -> Result<Self, rustls::Error> {
        Ok(match tls {
            None => Self::Plain(tcp),
            Some(c) => Self::Tls(Box::new(TlsStream {
                tcp,
                tls: ClientConnection::new(c.config.clone(), c.name.clone())?,
            })),
        })
    }

    /// The socket, for the poller and for connect status.
    pub fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(t) => &mut t.tcp,
        }
    }

    /// Whether a read shorter than the buffer means the socket is empty.
    /// Not with TLS: rustls reads the socket in small steps, so the reads
    /// go on until `WouldBlock`.
    pub fn short_read_drains(&self) -> bool {
        matches!(self, Self::Plain(_))
    }

    /// `Some(true)` if the TLS handshake resumed a session, `Some(false)`
    /// if it was full, `None` on plain TCP or before the handshake is done.
    pub fn resumed(&self) -> Option<bool> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(t) => t
                .tls
                .handshake_kind()
                .filter(|_| !t.tls.is_handshaking())
                .map(|k| k == HandshakeKind::Resumed),
        }
    }

    /// Writes out ciphertext rustls holds (handshake messages, records that
    /// a full socket did not take); `WouldBlock` if some is still held.
    pub fn push(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(_) => Ok(()),
            Self::Tls(t) => t.push(),
        }
    }

    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(t) => t.read(buf),
        }
    }

    /// Plaintext accepted; with TLS it may still be on its way out (see
    /// [`Stream::push`]).
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Plain(s) if bufs.len() == 1 => s.write(&bufs[0]),
            Self::Plain(s) => s.write_vectored(bufs),
            Self::Tls(t) => t.write_vectored(bufs),
        }
    }
}

impl TlsStream {
    fn push(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Plaintext if rustls has some, else ciphertext from the socket until
    /// it does. `Ok(0)` at the end of the stream, with or without the
    /// peer's close_notify: the WebSocket close handshake, not TLS, says
    /// whether an end was expected.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.tls.process_new_packets() {
                // Best effort: the alert rustls queued tells the server why.
                let _ = self.push();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Nothing new is encrypted while older records wait for the socket:
        // that bounds what rustls holds, and the WouldBlock comes from the
        // socket, so epoll reports when it drains.
        self.push()?;
        let n = self.tls.writer().write_vectored(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // Plaintext queued during the handshake is at rustls' limit.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.push() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }
}
