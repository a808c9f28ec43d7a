//! Fake Controlplane: a real HTTP/1.1 server on loopback that speaks the
//! placement contract and misbehaves on request.
//!
//! It stands in for the Controlplane in `eval-loadgen controlplane` (its own
//! process) and in the integration tests. Plain blocking code (one accept
//! thread, one small-stack thread per keep-alive connection, httparse) so
//! that it shares nothing with the control shard it is testing.
//!
//! # Contract
//! `GET /v1/placement?repl=ID[&exclude=VM]...` (one `exclude` per VM to
//! skip) →
//! `200 {"vm":"ID","conman":"ws://HOST:PORT/PATH","ttl_ms":N}`; `404` for
//! repl ids starting with `unknown`; `503` (with `Retry-After: 1`) when every
//! VM is excluded; `400` without `repl`. Any other path is a 404 and is not
//! counted as a placement request.
//!
//! Revocations (how a fleet of proxies converges):
//! `GET /v1/revocations?since=CURSOR` →
//! `200 {"cursor":"C","revocations":[{"jti"|"user"|"repl":"X","until":"RFC 3339"}]}`,
//! the entries posted after the one the cursor names (all of them for an
//! empty cursor; here the cursor is the count seen so far, but callers
//! treat it as opaque); `POST /v1/revocations` with one such entry as the
//! body → `200 {}` (`400` for anything else). [`FakeMode::Unavailable503`]
//! and [`FakeMode::Down`] apply to them too.
//!
//! # Placement
//! Least loaded: a repl seen for the first time, or whose VM is excluded,
//! goes to the VM with the fewest repls placed on it (plus what
//! [`FakeControlplane::report_load`] added), ties to the first configured;
//! otherwise a repl keeps its VM. A repl whose id starts with the prefix of
//! a [`Pin`] (the first that matches) is placed only on that pin's VMs, so a
//! soak can keep the sessions that must survive away from the Conman it
//! kills; with all of them excluded it gets the `503`.
//!
//! # Misbehaviour
//! [`FakeMode`], switchable at runtime with [`FakeControlplane::set_mode`],
//! applies to every request read after the switch.

use super::lock;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// Every connection thread parses with httparse and formats small strings.
const CONNECTION_STACK_SIZE: usize = 128 * 1024;
const MAX_REQUEST_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
/// Accept errors such as EMFILE repeat at once; pausing keeps them from
/// spinning a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// The VM id that [`FakeMode::WrongVm`] answers with.
pub const WRONG_VM: &str = "wrong-vm";

#[derive(Debug, Clone)]
pub struct FakeControlplaneConfig {
    pub listen: SocketAddr,
    /// (vm id, Conman `ws://` URL), in tie-break order.
    pub conmans: Vec<(String, String)>,
    pub ttl_ms: u64,
    pub pins: Vec<Pin>,
}

/// Repls whose id starts with `prefix` are placed only on `vms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub prefix: String,
    pub vms: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeMode {
    #[default]
    Normal,
    /// Answer normally, after this delay.
    Slow(Duration),
    /// `503` with `Retry-After: 1` to every placement request.
    Unavailable503,
    /// Read the request, then close the connection without answering.
    Down,
    /// Answer `200` with VM [`WRONG_VM`], whose Conman URL is a loopback
    /// port that refuses connections.
    WrongVm,
}

#[derive(Debug, Default)]
struct Placements {
    by_repl: HashMap<String, usize>,
    load: Vec<i64>,
}

impl Placements {
    /// `None` when every VM is excluded (or, for a pinned repl, every VM
    /// of its pin).
    fn place(
        &mut self,
        vms: &[(String, String)],
        pins: &[Pin],
        repl: &str,
        exclude: &[String],
    ) -> Option<usize> {
        let pin = pins.iter().find(|p| repl.starts_with(&p.prefix));
        let excluded = |i: usize| {
            exclude.contains(&vms[i].0) || pin.is_some_and(|p| !p.vms.contains(&vms[i].0))
        };
        if let Some(&i) = self.by_repl.get(repl) {
            if !excluded(i) {
                return Some(i);
            }
            self.load[i] -= 1;
            self.by_repl.remove(repl);
        }
        let i = (0..vms.len())
            .filter(|&i| !excluded(i))
            .min_by_key(|&i| (self.load[i], i))?;
        self.load[i] += 1;
        self.by_repl.insert(repl.to_owned(), i);
        Some(i)
    }
}

#[derive(Debug)]
struct Shared {
    conmans: Vec<(String, String)>,
    ttl_ms: u64,
    pins: Vec<Pin>,
    /// Bound and never listening, so connections to it are refused for as
    /// long as the fake runs (a closed port could be reused by anyone).
    _refusing: socket2::Socket,
    wrong_url: String,
    mode: Mutex<FakeMode>,
    requests: AtomicU64,
    connections: AtomicU64,
    placements: Mutex<Placements>,
    /// Revocations posted, in order (the cursor is an index into it).
    revocations: Mutex<Vec<serde_json::Value>>,
    live: Mutex<HashMap<u64, TcpStream>>,
    stopping: Mutex<bool>,
    stopped: Condvar,
}

/// A running fake Controlplane. Dropping it shuts it down like
/// [`FakeControlplane::shutdown`].
#[must_use = "the fake Controlplane shuts down when its handle is dropped"]
#[derive(Debug)]
pub struct FakeControlplane {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeControlplane {
    /// Placement requests read so far, whatever the mode answered.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far (keep-alive reuse shows here).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    pub fn set_mode(&self, m: FakeMode) {
        info!(mode = ?m, "fake controlplane mode");
        *lock(&self.shared.mode) = m;
    }

    /// Adds `delta` to a VM's load as the least-loaded choice sees it (a
    /// Conman reporting sessions that arrived or left). Unknown VMs are
    /// ignored.
    pub fn report_load(&self, vm: &str, delta: i64) {
        if let Some(i) = self.shared.conmans.iter().position(|(id, _)| id == vm) {
            lock(&self.shared.placements).load[i] += delta;
        }
    }

    /// Closes every open connection, as an idle timeout or a restart
    /// would; keep-alive clients must notice and reconnect.
    pub fn drop_connections(&self) {
        for tcp in lock(&self.shared.live).values() {
            tcp.shutdown(Shutdown::Both).ok();
        }
    }

    /// Revocations posted so far, as posted.
    pub fn revocations(&self) -> Vec<serde_json::Value> {
        lock(&self.shared.revocations).clone()
    }

    /// The Conman URL [`FakeMode::WrongVm`] hands out.
    pub fn wrong_vm_url(&self) -> &str {
        &self.shared.wrong_url
    }

    /// Stops accepting and cuts every live connection. When this returns,
    /// new connections are refused.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        super::stop_accept_thread(
            "fake controlplane",
            self.local_addr,
            accept,
            &self.shared.stopping,
            &self.shared.stopped,
        );
        for tcp in lock(&self.shared.live).values() {
            // An error only means the peer is already gone.
            tcp.shutdown(Shutdown::Both).ok();
        }
        info!(local_addr = %self.local_addr, "fake controlplane stopped");
    }
}

impl Drop for FakeControlplane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `cfg.listen` (port 0 allowed), starts the accept thread and returns
/// at once; requests are served until the handle is shut down or dropped.
pub fn spawn(cfg: FakeControlplaneConfig) -> io::Result<FakeControlplane> {
    if cfg.conmans.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fake controlplane needs at least one conman",
        ));
    }
    if let Some(vm) = cfg
        .pins
        .iter()
        .flat_map(|p| &p.vms)
        .find(|vm| !cfg.conmans.iter().any(|(id, _)| id == *vm))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fake controlplane: pinned VM {vm:?} is not one of the conmans"),
        ));
    }
    let listener = TcpListener::bind(cfg.listen)?;
    let local_addr = listener.local_addr()?;
    let refusing = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    refusing.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    let refusing_addr = refusing
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("refusing socket has no inet address"))?;
    let shared = Arc::new(Shared {
        placements: Mutex::new(Placements {
            by_repl: HashMap::new(),
            load: vec![0; cfg.conmans.len()],
        }),
        revocations: Mutex::new(Vec::new()),
        conmans: cfg.conmans,
        ttl_ms: cfg.ttl_ms,
        pins: cfg.pins,
        _refusing: refusing,
        wrong_url: format!("ws://{refusing_addr}/"),
        mode: Mutex::new(FakeMode::Normal),
        requests: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        live: Mutex::new(HashMap::new()),
        stopping: Mutex::new(false),
        stopped: Condvar::new(),
    });
    let accept = thread::Builder::new()
        .name("controlplane-accept".into())
        .spawn({
            let shared = Arc::clone(&shared);
            move || accept_loop(listener, shared)
        })?;
    info!(%local_addr, "fake controlplane listening");
    Ok(FakeControlplane {
        local_addr,
        shared,
        accept: Some(accept),
    })
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if *lock(&shared.stopping) {
            return;
        }
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                warn!(%error, "fake controlplane accept failed");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let id = next_id;
        next_id += 1;
        match tcp.try_clone() {
            Ok(clone) => {
                lock(&shared.live).insert(id, clone);
            }
            Err(error) => {
                warn!(%error, "fake controlplane: cannot track connection");
                continue;
            }
        }
        let spawned = thread::Builder::new()
            .name("controlplane-conn".into())
            .stack_size(CONNECTION_STACK_SIZE)
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    if let Err(error) = serve(&shared, tcp) {
                        debug!(%error, "fake controlplane connection ended");
                    }
                    lock(&shared.live).remove(&id);
                }
            });
        if let Err(error) = spawned {
            warn!(%error, "fake controlplane: cannot spawn connection thread");
            lock(&shared.live).remove(&id);
        }
    }
}

struct Request {
    path: String,
    keep_alive: bool,
    body_len: usize,
}

/// One request head off the front of `buf`, `Ok(None)` until complete.
fn parse_request(buf: &[u8]) -> io::Result<Option<(Request, usize)>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_owned());
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_REQUEST_HEAD => {
            return Err(bad("request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(&e.to_string())),
    };
    let mut keep_alive = req.version == Some(1);
    let mut body_len = 0;
    for h in req.headers.iter() {
        let v = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("connection") {
            for t in v.split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            body_len = v.trim().parse().map_err(|_| bad("bad content-length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("request bodies are not chunked here"));
        }
    }
    let path = req.path.ok_or_else(|| bad("no path"))?.to_owned();
    Ok(Some((
        Request {
            path,
            keep_alive,
            body_len,
        },
        n,
    )))
}

fn serve(shared: &Shared, mut tcp: TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let (req, used) = loop {
            if let Some(r) = parse_request(&buf)? {
                break r;
            }
            let n = tcp.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        // A GET carries no body, but skip one so the next request frames.
        while buf.len() < used + req.body_len {
            let n = tcp.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..used + req.body_len).skip(used).collect();
        let response = if is_revocations(&req.path) {
            respond_revocations(shared, &req.path, &body)
        } else {
            respond(shared, &req.path)
        };
        let Some(response) = response else {
            // Down: the caller sees its connection closed, no answer.
            tcp.shutdown(Shutdown::Both).ok();
            return Ok(());
        };
        let (status, retry_after, body) = response;
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(s) = retry_after {
            out.push_str(&format!("Retry-After: {s}\r\n"));
        }
        if !req.keep_alive {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&body);
        tcp.write_all(out.as_bytes())?;
        if !req.keep_alive {
            return Ok(());
        }
    }
}

/// Kept apart from the proxy's own encoder, so that a bug there shows up
/// as a mismatch here.
fn percent_decode(v: &str) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    let b = v.as_bytes();
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = v.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

type Response = (&'static str, Option<u64>, String);

fn json_error(status: &'static str, msg: &str, retry_after: Option<u64>) -> Response {
    (
        status,
        retry_after,
        serde_json::json!({ "error": msg }).to_string(),
    )
}

fn is_revocations(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    path.ends_with("/v1/revocations")
}

/// The revocation endpoints (module doc); `None`: close without answering.
fn respond_revocations(shared: &Shared, target: &str, body: &[u8]) -> Option<Response> {
    match *lock(&shared.mode) {
        FakeMode::Down => return None,
        FakeMode::Unavailable503 => {
            return Some(json_error("503 Service Unavailable", "down", Some(1)))
        }
        _ => {}
    }
    let query = target.split_once('?').map_or("", |(_, q)| q);
    if body.is_empty() {
        let since = query
            .split('&')
            .find_map(|p| p.strip_prefix("since="))
            .and_then(percent_decode)
            .unwrap_or_default();
        let Ok(since) = (if since.is_empty() {
            Ok(0)
        } else {
            since.parse::<usize>()
        }) else {
            return Some(json_error("400 Bad Request", "bad cursor", None));
        };
        let all = lock(&shared.revocations);
        let from = since.min(all.len());
        let body = serde_json::json!({
            "cursor": all.len().to_string(),
            "revocations": &all[from..],
        });
        return Some(("200 OK", None, body.to_string()));
    }
    let entry: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return Some(json_error("400 Bad Request", "not JSON", None)),
    };
    let named = ["jti", "user", "repl"]
        .iter()
        .filter(|k| entry.get(**k).is_some_and(|v| v.is_string()))
        .count();
    let until_ok = entry.get("until").is_some_and(|v| v.is_string());
    let fields = entry.as_object().map_or(0, |o| o.len());
    if named != 1 || !until_ok || fields != 2 {
        return Some(json_error(
            "400 Bad Request",
            "one of jti, user, repl, and until",
            None,
        ));
    }
    debug!(%entry, "fake controlplane: revocation posted");
    lock(&shared.revocations).push(entry);
    Some(("200 OK", None, "{}".into()))
}

/// `None`: close without answering.
fn respond(shared: &Shared, target: &str) -> Option<Response> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/v1/placement" && !path.ends_with("/v1/placement") {
        return Some(json_error("404 Not Found", "no such endpoint", None));
    }
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let mode = *lock(&shared.mode);
    match mode {
        FakeMode::Normal => {}
        FakeMode::Slow(d) => {
            // Interruptible, so that shutdown does not wait for it.
            let deadline = Instant::now() + d;
            let mut stopping = lock(&shared.stopping);
            while !*stopping {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                stopping = shared
                    .stopped
                    .wait_timeout(stopping, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        FakeMode::Unavailable503 => {
            return Some(json_error(
                "503 Service Unavailable",
                "no capacity",
                Some(1),
            ))
        }
        FakeMode::Down => return None,
        FakeMode::WrongVm => {}
    }
    let mut repl = None;
    let mut exclude = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "repl" => repl = v,
            "exclude" => exclude.extend(v),
            _ => {}
        }
    }
    let Some(repl) = repl.filter(|r| !r.is_empty()) else {
        return Some(json_error("400 Bad Request", "repl is required", None));
    };
    if repl.starts_with("unknown") {
        return Some(json_error("404 Not Found", "unknown repl", None));
    }
    let (vm, conman) = if mode == FakeMode::WrongVm {
        (WRONG_VM, shared.wrong_url.as_str())
    } else {
        let Some(i) =
            lock(&shared.placements).place(&shared.conmans, &shared.pins, &repl, &exclude)
        else {
            return Some(json_error(
                "503 Service Unavailable",
                "every VM excluded",
                Some(1),
            ));
        };
        (shared.conmans[i].0.as_str(), shared.conmans[i].1.as_str())
    };
    debug!(%repl, ?exclude, vm, "fake controlplane placed");
    let body = serde_json::json!({ "vm": vm, "conman": conman, "ttl_ms": shared.ttl_ms });
    Some(("200 OK", None, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vms(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("vm-{i}"), format!("ws://127.0.0.1:{}/", 7000 + i)))
            .collect()
    }

    fn ex(list: &[&str]) -> Vec<String> {
        list.iter().map(|&vm| vm.to_owned()).collect()
    }

    #[test]
    fn least_loaded_sticky_and_exclude() {
        let vms = vms(3);
        let mut p = Placements {
            by_repl: HashMap::new(),
            load: vec![0; 3],
        };
        assert_eq!(p.place(&vms, &[], "a", &[]), Some(0));
        assert_eq!(p.place(&vms, &[], "b", &[]), Some(1));
        assert_eq!(p.place(&vms, &[], "c", &[]), Some(2));
        assert_eq!(p.place(&vms, &[], "d", &[]), Some(0));
        assert_eq!(p.place(&vms, &[], "a", &[]), Some(0), "sticky");
        assert_eq!(
            p.place(&vms, &[], "a", &ex(&["vm-2"])),
            Some(0),
            "excluding another VM"
        );
        // a moves off vm-0 (load 2 → 1) to the least loaded other VM.
        assert_eq!(p.place(&vms, &[], "a", &ex(&["vm-0"])), Some(1));
        assert_eq!(p.load, [1, 2, 1]);
        p.load[2] += 10;
        assert_eq!(p.place(&vms, &[], "e", &[]), Some(0));
        // Every excluded VM is skipped, the sticky one included.
        assert_eq!(p.place(&vms, &[], "e", &ex(&["vm-1", "vm-0"])), Some(2));
        assert_eq!(p.place(&vms, &[], "b", &ex(&["vm-1", "vm-2"])), Some(0));
        assert_eq!(
            p.place(&vms, &[], "b", &ex(&["vm-0", "vm-1", "vm-2"])),
            None
        );
        let one = &vms[..1];
        let mut p = Placements {
            by_repl: HashMap::new(),
            load: vec![0],
        };
        assert_eq!(p.place(one, &[], "a", &ex(&["vm-0"])), None);
    }

    #[test]
    fn pinned_repls_stay_on_their_vms() {
        let vms = vms(3);
        let pins = [
            Pin {
                prefix: "keep-".into(),
                vms: ex(&["vm-0"]),
            },
            Pin {
                prefix: "k".into(),
                vms: ex(&["vm-1", "vm-2"]),
            },
        ];
        let mut p = Placements {
            by_repl: HashMap::new(),
            load: vec![0; 3],
        };
        assert_eq!(p.place(&vms, &pins, "keep-a", &[]), Some(0));
        assert_eq!(p.place(&vms, &pins, "keep-b", &[]), Some(0), "not spread");
        assert_eq!(p.place(&vms, &pins, "keep-a", &ex(&["vm-0"])), None);
        // The first matching pin wins: "kx" is not a "keep-" repl.
        assert_eq!(p.place(&vms, &pins, "kx", &[]), Some(1));
        assert_eq!(p.place(&vms, &pins, "kx", &ex(&["vm-1"])), Some(2));
        assert_eq!(p.place(&vms, &pins, "kx", &ex(&["vm-1", "vm-2"])), None);
        // Unpinned repls use every VM, least loaded first.
        assert_eq!(p.load, [1, 0, 0]);
        assert_eq!(p.place(&vms, &pins, "other", &[]), Some(1));
    }

    #[test]
    fn request_heads_frame_and_wait() {
        let raw = b"GET /v1/placement?repl=a HTTP/1.1\r\nHost: x\r\n\r\nGET";
        for cut in 0..raw.len() - 3 {
            assert!(parse_request(&raw[..cut]).unwrap().is_none());
        }
        let (r, used) = parse_request(raw).unwrap().unwrap();
        assert_eq!(
            (r.path.as_str(), r.keep_alive, used),
            ("/v1/placement?repl=a", true, raw.len() - 3)
        );
        let (r, _) = parse_request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        assert!(parse_request(b"\x16\x03\x01garbage\r\n\r\n").is_err());
    }

    #[test]
    fn revocations_are_served_after_the_cursor() {
        let cp = spawn(FakeControlplaneConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            conmans: vms(1),
            ttl_ms: 1000,
            pins: vec![],
        })
        .unwrap();
        let get = |since: &str| {
            let r = respond_revocations(&cp.shared, &format!("/v1/revocations?since={since}"), b"");
            serde_json::from_str::<serde_json::Value>(&r.unwrap().2).unwrap()
        };
        assert_eq!(get("")["cursor"], "0");
        let post = |b: &str| {
            respond_revocations(&cp.shared, "/v1/revocations", b.as_bytes())
                .unwrap()
                .0
        };
        assert_eq!(
            post(r#"{"jti":"a","until":"2030-01-01T00:00:00Z"}"#),
            "200 OK"
        );
        assert_eq!(
            post(r#"{"user":"b","until":"2030-01-01T00:00:00Z"}"#),
            "200 OK"
        );
        assert_eq!(post(r#"{"user":"b"}"#), "400 Bad Request");
        assert_eq!(
            post(r#"{"user":"b","jti":"a","until":"x"}"#),
            "400 Bad Request"
        );
        let all = get("");
        assert_eq!(
            (
                all["cursor"].as_str(),
                all["revocations"].as_array().unwrap().len()
            ),
            (Some("2"), 2)
        );
        let after = get("1");
        assert_eq!(after["revocations"][0]["user"], "b");
        assert_eq!(get("2")["revocations"].as_array().unwrap().len(), 0);
        assert_eq!(cp.revocations().len(), 2);
    }
}
