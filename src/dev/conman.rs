//! Fake Conman: a real WebSocket server on loopback that echoes and misbehaves
//! on request.
//!
//! It stands in for Conman in `eval-proxy --dev` (embedded), in
//! `eval-loadgen conman` (its own process) and in the integration tests. It is
//! deliberately plain blocking code (one accept thread, one small-stack thread
//! per connection, tungstenite for the protocol) so that it shares nothing with
//! the proxy it is testing.
//!
//! # Control messages
//! A Text message that is exactly one of these is a command, not echoed:
//! - `__headers__`: reply with a JSON object `{"path":…,"headers":{…}}` of the
//!   upgrade request (header names lower-cased, repeated headers joined with
//!   `", "`, keys sorted).
//! - `__vm__`: reply with the configured [`Behavior::vm_id`].
//! - `__close__ CODE [REASON]`: start a Close handshake with that code and
//!   reason, sent as given even when the code is one the RFC forbids on the wire.
//! - `__die__`: drop the TCP connection without a Close (the VM died).
//! - `__stall__`: stop reading for good; the connection is held open until
//!   [`ConmanHandle::shutdown`], even if the client goes away meanwhile.
//!
//! Every other Text or Binary message is echoed back as one message. Pings are
//! answered and a client's Close is answered with the same code and reason, both
//! by tungstenite.
//!
//! # Misbehaviour switches
//! [`Behavior`] applies to every connection. When several are set, the first of
//! `refuse`, `stall_before_101`, `reject_status` wins; `die_after_bytes` and
//! `slow_reader_bps` apply after a successful upgrade.
//!
//! # TLS
//! With [`Behavior::tls`] every connection is TLS first (`wss://`), using
//! a config from [`tls_config`], which can also require a client
//! certificate signed by a given CA (mTLS). A failed TLS handshake ends the
//! connection after rustls' alert; `refuse` and `stall_before_101` act on
//! the TCP connection, before any TLS.

use super::lock;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response};
use tungstenite::http::header::{CONNECTION, CONTENT_LENGTH};
use tungstenite::http::{HeaderValue, StatusCode};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// Thousands of mostly idle sessions must stay cheap, and only touched pages
/// cost memory. A debug build logging at trace level through a fmt or JSON
/// subscriber (tungstenite's `log` records included) was measured to need
/// between 32 and 48 KiB; this leaves room for a deeper subscriber stack.
const CONNECTION_STACK_SIZE: usize = 128 * 1024;

/// Tests relay 16 MiB messages; tungstenite's default frame limit is exactly
/// 16 MiB, which leaves no room for anything larger.
const MAX_MESSAGE_SIZE: usize = 128 << 20;

/// Accept errors such as EMFILE repeat at once; pausing keeps them from
/// spinning a core while the test or loadgen that caused them winds down.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Misbehaviour switches, all off by default, applied to every connection.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Accept the TCP connection, then close it at once without reading.
    pub refuse: bool,
    /// Answer the upgrade with this HTTP status (not 1xx, not 2xx).
    pub reject_status: Option<u16>,
    /// Read the upgrade request and never answer it.
    pub stall_before_101: bool,
    /// Once this many payload bytes have been echoed on a connection, drop it
    /// without a Close. Counted in whole messages: the message that reaches
    /// the limit is still echoed in full; 0 drops right after the 101.
    pub die_after_bytes: Option<u64>,
    /// Read at most this many bytes per second after the upgrade (> 0).
    pub slow_reader_bps: Option<u64>,
    /// Returned by `__vm__`, so a test can tell which fake Conman it reached.
    pub vm_id: String,
    /// Speak TLS (see [`tls_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A TLS config for the fake Conman: `cert` (PEM chain) and `key`; with
/// `client_ca`, a client certificate signed by that CA is required.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> io::Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = crate::tls::read_pem_pair(cert, key).map_err(invalid_input)?;
    let provider = Arc::new(crate::tls::crypto_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid_input(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            crate::tls::client_verifier(ca, false).map_err(invalid_input)?,
        ),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid_input(e.to_string()))?;
    cfg.alpn_protocols = vec![crate::tls::ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug, Clone)]
pub struct ConmanConfig {
    pub listen: SocketAddr,
    pub behavior: Behavior,
}

/// A running fake Conman. Dropping it shuts it down like [`ConmanHandle::shutdown`].
#[must_use = "the fake Conman shuts down when its handle is dropped"]
#[derive(Debug)]
pub struct ConmanHandle {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ConmanHandle {
    /// TCP connections accepted so far, including refused ones.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting and cuts every live connection (no Close frame), as if
    /// the VM went away. When this returns, new connections are refused and
    /// live ones have seen their socket shut down.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        super::stop_accept_thread(
            "fake conman",
            self.local_addr,
            accept,
            &self.shared.stopping,
            &self.shared.stopped,
        );
        for tcp in lock(&self.shared.live).values() {
            // An error only means the peer is already gone.
            tcp.shutdown(Shutdown::Both).ok();
        }
        info!(local_addr = %self.local_addr, "fake conman stopped");
    }
}

impl Drop for ConmanHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `cfg.listen` (port 0 allowed), starts the accept thread and returns
/// at once; connections are served until the handle is shut down or dropped.
pub fn spawn(cfg: ConmanConfig) -> io::Result<ConmanHandle> {
    let reject = cfg.behavior.reject_status.map(reject_status).transpose()?;
    if cfg.behavior.slow_reader_bps == Some(0) {
        return Err(invalid_input(
            "slow_reader_bps must be greater than 0".into(),
        ));
    }
    let listener = TcpListener::bind(cfg.listen)?;
    let local_addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        behavior: cfg.behavior,
        reject,
        ws_config: ws_config(),
        connections: AtomicU64::new(0),
        live: Mutex::new(HashMap::new()),
        stopping: Mutex::new(false),
        stopped: Condvar::new(),
    });
    let accept = thread::Builder::new().name("conman-accept".into()).spawn({
        let shared = Arc::clone(&shared);
        move || accept_loop(listener, shared)
    })?;
    info!(%local_addr, vm = %shared.behavior.vm_id, "fake conman listening");
    Ok(ConmanHandle {
        local_addr,
        shared,
        accept: Some(accept),
    })
}

fn reject_status(code: u16) -> io::Result<StatusCode> {
    match StatusCode::from_u16(code) {
        // tungstenite refuses to send a 1xx or 2xx as a failed handshake.
        Ok(status) if !status.is_informational() && !status.is_success() => Ok(status),
        _ => Err(invalid_input(format!(
            "reject_status {code} is not an HTTP status from 300 to 999"
        ))),
    }
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(MAX_MESSAGE_SIZE),
        max_frame_size: Some(MAX_MESSAGE_SIZE),
        ..WebSocketConfig::default()
    }
}

#[derive(Debug)]
struct Shared {
    behavior: Behavior,
    reject: Option<StatusCode>,
    ws_config: WebSocketConfig,
    connections: AtomicU64,
    /// Live sockets by connection id, so that shutdown can cut them.
    live: Mutex<HashMap<u64, Arc<TcpStream>>>,
    stopping: Mutex<bool>,
    stopped: Condvar,
}

impl Shared {
    fn is_stopping(&self) -> bool {
        *lock(&self.stopping)
    }

    fn wait_until_stopping(&self) {
        let mut stopping = lock(&self.stopping);
        while !*stopping {
            stopping = self
                .stopped
                .wait(stopping)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Keeps a connection in [`Shared::live`] for exactly as long as its thread
/// (or, if the thread never started, its closure) exists.
struct LiveGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl LiveGuard {
    fn register(shared: &Arc<Shared>, id: u64, tcp: &Arc<TcpStream>) -> Self {
        lock(&shared.live).insert(id, Arc::clone(tcp));
        Self {
            shared: Arc::clone(shared),
            id,
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        lock(&self.shared.live).remove(&self.id);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.is_stopping() {
            break;
        }
        let tcp = match incoming {
            Ok(tcp) => tcp,
            Err(error) => {
                warn!(%error, "fake conman accept failed");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        let id = shared.connections.fetch_add(1, Ordering::Relaxed);
        if shared.behavior.refuse {
            debug!(id, "fake conman refusing connection");
            drop(tcp);
            continue;
        }
        // Echo latency is what the loadgen measures; Nagle would add to it.
        if let Err(error) = tcp.set_nodelay(true) {
            debug!(id, %error, "set_nodelay failed");
        }
        let tcp = Arc::new(tcp);
        let guard = LiveGuard::register(&shared, id, &tcp);
        let spawned = thread::Builder::new()
            .name(format!("conman-{id}"))
            .stack_size(CONNECTION_STACK_SIZE)
            .spawn(move || {
                serve(id, tcp, &guard.shared);
                drop(guard);
            });
        if let Err(error) = spawned {
            warn!(id, %error, "fake conman could not start a connection thread");
        }
    }
    debug!("fake conman accept loop ended");
}

fn serve(id: u64, tcp: Arc<TcpStream>, shared: &Shared) {
    let behavior = &shared.behavior;
    if behavior.stall_before_101 {
        discard_until_eof(&tcp);
        debug!(id, "stalled upgrade ended");
        return;
    }

    let mut request_json = String::new();
    let callback = Upgrade {
        request_json: &mut request_json,
        reject: shared.reject,
    };
    let tls = match &behavior.tls {
        None => None,
        Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
            Ok(conn) => Some(Box::new(conn)),
            Err(error) => {
                warn!(id, %error, "fake conman cannot start TLS");
                return;
            }
        },
    };
    let stream = ConmanStream {
        raw: Raw { tcp, limit: None },
        tls,
    };
    let mut ws = match tungstenite::accept_hdr_with_config(stream, callback, Some(shared.ws_config))
    {
        Ok(ws) => ws,
        Err(error) => {
            debug!(id, %error, "upgrade ended without a WebSocket");
            return;
        }
    };
    // The handshake itself is not throttled, so a slow reader still upgrades
    // promptly and the slowness shows where a test looks for it: in the relay.
    ws.get_mut().raw.limit = behavior
        .slow_reader_bps
        .map(|bps| TokenBucket::new(bps, Instant::now()));

    let mut echoed: u64 = 0;
    loop {
        if behavior
            .die_after_bytes
            .is_some_and(|limit| echoed >= limit)
        {
            debug!(id, echoed, "dying after the configured byte count");
            return die(&ws);
        }
        let message = match ws.read() {
            Ok(message) => message,
            Err(tungstenite::Error::ConnectionClosed) => {
                debug!(id, "connection closed");
                return;
            }
            Err(error) => {
                debug!(id, %error, "connection ended");
                return;
            }
        };
        let reply = match message {
            Message::Text(text) => match Command::parse(&text) {
                None => {
                    echoed += text.len() as u64;
                    Message::Text(text)
                }
                Some(Command::Headers) => Message::Text(request_json.clone()),
                Some(Command::Vm) => Message::Text(behavior.vm_id.clone()),
                Some(Command::Close(frame)) => {
                    if let Err(error) = ws.close(Some(frame)) {
                        debug!(id, %error, "close failed");
                        return;
                    }
                    continue;
                }
                Some(Command::Die) => {
                    debug!(id, "dying on request");
                    return die(&ws);
                }
                Some(Command::Stall) => {
                    debug!(id, "stalling on request");
                    shared.wait_until_stopping();
                    return;
                }
                Some(Command::Malformed(usage)) => Message::Text(usage.into()),
            },
            Message::Binary(data) => {
                echoed += data.len() as u64;
                Message::Binary(data)
            }
            // tungstenite answers Ping and Close itself during read().
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => continue,
        };
        // After we sent a Close, the client's remaining messages get no echo.
        if !ws.can_write() {
            continue;
        }
        if let Err(error) = ws.send(reply) {
            debug!(id, %error, "echo failed");
            return;
        }
    }
}

fn die(ws: &WebSocket<ConmanStream>) {
    // Shutting down (rather than only dropping our Arc) cuts the connection
    // even while shutdown() still holds a reference to the socket.
    ws.get_ref().raw.tcp.shutdown(Shutdown::Both).ok();
}

fn discard_until_eof(tcp: &TcpStream) {
    let mut sink = [0u8; 1024];
    let mut reader = tcp;
    while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
}

#[derive(Debug, PartialEq)]
enum Command {
    Headers,
    Vm,
    Close(CloseFrame<'static>),
    Die,
    Stall,
    Malformed(&'static str),
}

impl Command {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "__headers__" => return Some(Self::Headers),
            "__vm__" => return Some(Self::Vm),
            "__die__" => return Some(Self::Die),
            "__stall__" => return Some(Self::Stall),
            _ => {}
        }
        let args = text
            .strip_prefix("__close__")
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))?;
        let (code, reason) = args
            .trim_start()
            .split_once(' ')
            .unwrap_or((args.trim_start(), ""));
        Some(match code.parse::<u16>() {
            Ok(code) => Self::Close(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            }),
            Err(_) => Self::Malformed("__error__ usage: __close__ CODE [REASON]"),
        })
    }
}

/// Records the upgrade request for `__headers__` and answers it.
struct Upgrade<'a> {
    request_json: &'a mut String,
    reject: Option<StatusCode>,
}

impl Callback for Upgrade<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        *self.request_json = describe_request(request);
        match self.reject {
            Some(status) => Err(reject_response(status)),
            None => Ok(response),
        }
    }
}

fn reject_response(status: StatusCode) -> ErrorResponse {
    let body = format!("fake conman rejects the upgrade: {status}\n");
    let mut response = ErrorResponse::new(None);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    *response.body_mut() = Some(body);
    response
}

/// `{"path":…,"headers":{…}}` with sorted keys and no spaces, so tests can
/// match on substrings as well as parse it.
fn describe_request(request: &Request) -> String {
    let uri = request.uri();
    let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let mut headers: BTreeMap<&str, String> = BTreeMap::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let mut json = String::from("{\"path\":");
    push_json_string(&mut json, path);
    json.push_str(",\"headers\":{");
    for (i, (name, value)) in headers.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        push_json_string(&mut json, name);
        json.push(':');
        push_json_string(&mut json, value);
    }
    json.push_str("}}");
    json
}

fn push_json_string(json: &mut String, s: &str) {
    json.push('"');
    for c in s.chars() {
        match c {
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            '\n' => json.push_str("\\n"),
            '\r' => json.push_str("\\r"),
            '\t' => json.push_str("\\t"),
            c if c < ' ' => json.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => json.push(c),
        }
    }
    json.push('"');
}

/// The connection: its socket, through TLS if it speaks it.
#[derive(Debug)]
struct ConmanStream {
    raw: Raw,
    tls: Option<Box<rustls::ServerConnection>>,
}

impl Read for ConmanStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(conn) => rustls::Stream::new(&mut **conn, &mut self.raw).read(buf),
            None => self.raw.read(buf),
        }
    }
}

impl Write for ConmanStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(conn) => rustls::Stream::new(&mut **conn, &mut self.raw).write(buf),
            None => self.raw.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            Some(conn) => rustls::Stream::new(&mut **conn, &mut self.raw).flush(),
            None => self.raw.flush(),
        }
    }
}

/// The connection's socket, throttled on read once `limit` is set.
#[derive(Debug)]
struct Raw {
    tcp: Arc<TcpStream>,
    limit: Option<TokenBucket>,
}

impl Read for Raw {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tcp = &*self.tcp;
        let Some(bucket) = &mut self.limit else {
            return tcp.read(buf);
        };
        let allowed = loop {
            match bucket.allowance(buf.len(), Instant::now()) {
                Ok(allowed) => break allowed,
                Err(wait) => thread::sleep(wait),
            }
        };
        let n = tcp.read(&mut buf[..allowed])?;
        bucket.consume(n);
        Ok(n)
    }
}

impl Write for Raw {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.tcp).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.tcp).flush()
    }
}

/// Read-rate limiter. The burst is a tenth of a second's worth, so a slow
/// reader wakes about ten times a second whatever its rate.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(bytes_per_sec: u64, now: Instant) -> Self {
        let rate = bytes_per_sec as f64;
        let burst = (rate / 10.0).max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// How many of `want` bytes may be read now, or how long to wait first.
    /// Waits for a full burst (or all of `want`) rather than for one byte, so
    /// that a large read is not dribbled out one byte per syscall.
    fn allowance(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        let need = (want as f64).min(self.burst);
        if self.tokens >= need {
            Ok((self.tokens as usize).min(want))
        } else {
            Err(Duration::from_secs_f64((need - self.tokens) / self.rate))
        }
    }

    fn consume(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use tungstenite::client::{client_with_config, IntoClientRequest};
    use tungstenite::error::ProtocolError;
    use tungstenite::handshake::client::ClientHandshake;
    use tungstenite::handshake::HandshakeError;

    /// Only a guard against a hung test; no test waits for it to pass.
    const SAFETY_TIMEOUT: Duration = Duration::from_secs(20);

    type Client = WebSocket<TcpStream>;
    type ClientResult = Result<Client, Box<HandshakeError<ClientHandshake<TcpStream>>>>;

    fn start(behavior: Behavior) -> ConmanHandle {
        spawn(ConmanConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            behavior,
        })
        .expect("spawn fake conman")
    }

    fn try_connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&'static str, &str)],
        read_timeout: Duration,
    ) -> ClientResult {
        let mut request = format!("ws://{addr}{path}")
            .into_client_request()
            .expect("valid request");
        for (name, value) in headers {
            let value = HeaderValue::from_str(value).expect("valid header value");
            request.headers_mut().insert(*name, value);
        }
        let tcp = TcpStream::connect(addr).expect("tcp connect");
        tcp.set_read_timeout(Some(read_timeout))
            .expect("set read timeout");
        tcp.set_write_timeout(Some(SAFETY_TIMEOUT))
            .expect("set write timeout");
        client_with_config(request, tcp, Some(ws_config()))
            .map(|(ws, _)| ws)
            .map_err(Box::new)
    }

    fn try_connect(addr: SocketAddr) -> ClientResult {
        try_connect_with(addr, "/", &[], SAFETY_TIMEOUT)
    }

    fn connect(addr: SocketAddr) -> Client {
        try_connect(addr).expect("websocket handshake")
    }

    fn set_read_timeout(ws: &Client, timeout: Duration) {
        ws.get_ref()
            .set_read_timeout(Some(timeout))
            .expect("set read timeout");
    }

    fn roundtrip(ws: &mut Client, message: Message) -> Message {
        ws.send(message).expect("send");
        ws.read().expect("read reply")
    }

    fn text(ws: &mut Client, command: &str) -> String {
        match roundtrip(ws, Message::Text(command.into())) {
            Message::Text(reply) => reply,
            other => panic!("expected a text reply to {command:?}, got {other:?}"),
        }
    }

    fn assert_dropped_without_close(ws: &mut Client) {
        match ws.read() {
            Err(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected a drop without a Close frame, got {other:?}"),
        }
    }

    fn is_timeout(error: &io::Error) -> bool {
        matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    }

    #[test]
    fn echoes_text_and_binary() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        assert_eq!(text(&mut ws, "hello"), "hello");
        assert_eq!(text(&mut ws, ""), "");
        let binary = Message::Binary(vec![0, 1, 2, 255]);
        assert_eq!(roundtrip(&mut ws, binary.clone()), binary);
        assert_eq!(
            roundtrip(&mut ws, Message::Binary(Vec::new())),
            Message::Binary(Vec::new())
        );
    }

    #[test]
    fn echoes_a_16_mib_binary_message() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        let payload: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        match roundtrip(&mut ws, Message::Binary(payload.clone())) {
            Message::Binary(echo) => assert!(echo == payload, "16 MiB echo differs"),
            other => panic!("expected binary, got {other:?}"),
        }
    }

    #[test]
    fn answers_ping_with_pong() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        assert_eq!(
            roundtrip(&mut ws, Message::Ping(b"p1".to_vec())),
            Message::Pong(b"p1".to_vec())
        );
    }

    #[test]
    fn headers_command_reflects_the_upgrade_request() {
        let conman = start(Behavior::default());
        let mut ws = try_connect_with(
            conman.local_addr,
            "/conman/repl-1?x=1",
            &[
                ("x-eval-session", "sess-42"),
                ("x-repl-id", "repl-1"),
                ("x-user", "ada \"quoted\""),
                ("x-forwarded-for", "203.0.113.9"),
            ],
            SAFETY_TIMEOUT,
        )
        .expect("websocket handshake");
        let json = text(&mut ws, "__headers__");
        assert!(json.starts_with("{\"path\":\"/conman/repl-1?x=1\",\"headers\":{"));
        for pair in [
            "\"x-eval-session\":\"sess-42\"",
            "\"x-repl-id\":\"repl-1\"",
            "\"x-user\":\"ada \\\"quoted\\\"\"",
            "\"x-forwarded-for\":\"203.0.113.9\"",
            "\"upgrade\":\"websocket\"",
        ] {
            assert!(json.contains(pair), "{pair} missing from {json}");
        }
    }

    #[test]
    fn vm_command_reports_the_configured_id() {
        let conman = start(Behavior {
            vm_id: "vm-7".into(),
            ..Behavior::default()
        });
        let mut ws = connect(conman.local_addr);
        assert_eq!(text(&mut ws, "__vm__"), "vm-7");
    }

    #[test]
    fn client_close_is_answered_with_the_same_code_and_reason() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        let frame = CloseFrame {
            code: CloseCode::from(4002),
            reason: "later".into(),
        };
        ws.close(Some(frame.clone())).expect("send close");
        match ws.read() {
            Ok(Message::Close(Some(reply))) => assert_eq!(reply, frame),
            other => panic!("expected Close 4002, got {other:?}"),
        }
        assert!(matches!(
            ws.read(),
            Err(tungstenite::Error::ConnectionClosed)
        ));
    }

    #[test]
    fn close_command_starts_a_close_with_that_code_and_reason() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        ws.send(Message::Text("__close__ 4001 bye".into()))
            .expect("send");
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4001);
                assert_eq!(frame.reason, "bye");
            }
            other => panic!("expected Close 4001, got {other:?}"),
        }
        assert!(matches!(
            ws.read(),
            Err(tungstenite::Error::ConnectionClosed)
        ));
    }

    #[test]
    fn parses_commands() {
        let close = |code: u16, reason: &str| {
            Some(Command::Close(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            }))
        };
        assert_eq!(Command::parse("__close__ 4001 bye"), close(4001, "bye"));
        assert_eq!(Command::parse("__close__ 1000"), close(1000, ""));
        assert_eq!(
            Command::parse("__close__ 1011 two words"),
            close(1011, "two words")
        );
        assert!(matches!(
            Command::parse("__close__ soon"),
            Some(Command::Malformed(_))
        ));
        assert!(matches!(
            Command::parse("__close__"),
            Some(Command::Malformed(_))
        ));
        assert_eq!(Command::parse("__closed__ 1000"), None);
        assert_eq!(Command::parse("__die__ "), None);
        assert_eq!(Command::parse("hello"), None);
    }

    #[test]
    fn malformed_close_command_gets_a_usage_reply() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        assert!(text(&mut ws, "__close__ soon").starts_with("__error__"));
        assert_eq!(text(&mut ws, "still open"), "still open");
    }

    #[test]
    fn refuse_fails_the_client_handshake() {
        let conman = start(Behavior {
            refuse: true,
            ..Behavior::default()
        });
        assert!(try_connect(conman.local_addr).is_err());
        assert_eq!(conman.connections(), 1);
    }

    #[test]
    fn reject_status_answers_the_upgrade_with_that_status() {
        let conman = start(Behavior {
            reject_status: Some(503),
            ..Behavior::default()
        });
        match try_connect(conman.local_addr).map_err(|e| *e) {
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            }
            other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn stall_before_101_never_answers() {
        let conman = start(Behavior {
            stall_before_101: true,
            ..Behavior::default()
        });
        match try_connect_with(conman.local_addr, "/", &[], Duration::from_millis(200))
            .map_err(|e| *e)
        {
            Err(HandshakeError::Interrupted(_)) => {}
            Err(HandshakeError::Failure(tungstenite::Error::Io(e))) if is_timeout(&e) => {}
            other => panic!("expected a handshake timeout, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn die_after_bytes_drops_the_connection_without_close() {
        let conman = start(Behavior {
            die_after_bytes: Some(8),
            ..Behavior::default()
        });
        let mut ws = connect(conman.local_addr);
        assert_eq!(text(&mut ws, "abcd"), "abcd");
        assert_eq!(text(&mut ws, "__vm__"), "", "commands do not count");
        assert_eq!(
            roundtrip(&mut ws, Message::Binary(b"efgh".to_vec())),
            Message::Binary(b"efgh".to_vec())
        );
        assert_dropped_without_close(&mut ws);
    }

    #[test]
    fn die_after_zero_bytes_drops_right_after_the_upgrade() {
        let conman = start(Behavior {
            die_after_bytes: Some(0),
            ..Behavior::default()
        });
        let mut ws = connect(conman.local_addr);
        assert_dropped_without_close(&mut ws);
    }

    #[test]
    fn die_command_drops_the_connection_without_close() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        assert_eq!(text(&mut ws, "before"), "before");
        ws.send(Message::Text("__die__".into())).expect("send");
        assert_dropped_without_close(&mut ws);
    }

    #[test]
    fn stall_command_stops_reading_until_shutdown() {
        let conman = start(Behavior::default());
        let mut ws = connect(conman.local_addr);
        ws.send(Message::Text("__stall__".into())).expect("send");
        ws.send(Message::Text("anyone there?".into()))
            .expect("send");
        set_read_timeout(&ws, Duration::from_millis(200));
        match ws.read() {
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            other => panic!("expected no reply from a stalled conman, got {other:?}"),
        }
        set_read_timeout(&ws, SAFETY_TIMEOUT);
        conman.shutdown();
        assert_dropped_without_close(&mut ws);
    }

    #[test]
    fn slow_reader_limits_the_read_rate() {
        const BPS: u64 = 64 * 1024;
        let conman = start(Behavior {
            slow_reader_bps: Some(BPS),
            ..Behavior::default()
        });
        let mut ws = connect(conman.local_addr);
        let payload = vec![7u8; BPS as usize];
        let started = Instant::now();
        assert_eq!(
            roundtrip(&mut ws, Message::Binary(payload.clone())),
            Message::Binary(payload)
        );
        // One second's worth less the initial burst, with a wide margin.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(500), "took {elapsed:?}");
    }

    #[test]
    fn token_bucket_paces_reads() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1000, t0);
        assert_eq!(bucket.allowance(0, t0), Ok(0));
        assert_eq!(bucket.allowance(4096, t0), Ok(100));
        bucket.consume(100);
        assert_eq!(bucket.allowance(4096, t0), Err(Duration::from_millis(100)));
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(bucket.allowance(10, t1), Ok(10));
        bucket.consume(10);
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(bucket.allowance(4096, t2), Ok(100), "burst is capped");
    }

    #[test]
    fn shutdown_cuts_live_connections_and_stops_accepting() {
        let conman = start(Behavior::default());
        let addr = conman.local_addr;
        let mut ws = connect(addr);
        assert_eq!(text(&mut ws, "up"), "up");
        assert_eq!(conman.connections(), 1);
        conman.shutdown();
        assert_dropped_without_close(&mut ws);
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn spawn_rejects_invalid_behavior() {
        for behavior in [
            Behavior {
                reject_status: Some(101),
                ..Behavior::default()
            },
            Behavior {
                reject_status: Some(200),
                ..Behavior::default()
            },
            Behavior {
                reject_status: Some(42),
                ..Behavior::default()
            },
            Behavior {
                slow_reader_bps: Some(0),
                ..Behavior::default()
            },
        ] {
            let result = spawn(ConmanConfig {
                listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                behavior: behavior.clone(),
            });
            match result {
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{behavior:?}"),
                Ok(_) => panic!("accepted {behavior:?}"),
            }
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut json = String::new();
        push_json_string(&mut json, "a\"b\\c\n\u{1}é");
        assert_eq!(json, "\"a\\\"b\\\\c\\n\\u0001é\"");
    }
}
