//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! `POST /drain`, and the session registry: `GET /sessions`,
//! `POST /sessions/{id}/close`, `GET /vms`, `POST /vms/{id}/evacuate`,
//! `POST /vms/{id}/restore` (answered by the data shards through their
//! mailboxes, `control::registry`). Plain blocking HTTP/1.1 on its own
//! thread: it serves operators and scrapers, never user traffic. A thread
//! per connection, at most `MAX_CONNS` of them, each with a whole-request
//! and a whole-response deadline.
//!
//! # Authentication
//! With `admin.token_file` every request must carry `Authorization: Bearer
//! TOKEN` (compared in constant time), else `401`; without one the listener
//! must be on loopback (the config refuses anything else). Endpoints that
//! change something answer only `POST` (`405` with `Allow` otherwise), so
//! a page in an operator's browser cannot trigger them with a plain link.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::control::drain::{self, Lifecycle};
use crate::control::registry::{self, Command, Registry};
use crate::keys::KeyStore;
use crate::log_every::LogEvery;
use crate::metrics::{self, names, ShardStats};
use crate::session::registry::{self as session_registry, Filter, Info};

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
    /// The data shards' mailboxes and the evacuated VMs.
    pub registry: Registry,
    /// `admin.token_file`'s token: every request must carry it.
    pub token: Option<Vec<u8>>,
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
        let _ = writeln!(
            body,
            "# HELP {0} 1 for each VM evacuated (POST /vms/ID/evacuate): placement avoids it until restored.\n# TYPE {0} gauge",
            names::VM_EVACUATED
        );
        for vm in self.registry.evacuations.list().iter() {
            let _ = writeln!(
                body,
                "{}{{vm=\"{}\"}} 1",
                names::VM_EVACUATED,
                metrics::escape_label(vm)
            );
        }
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

/// An admin request, parsed.
struct Request {
    method: String,
    path: String,
    query: String,
    authorization: Option<String>,
    /// The body, as its Content-Length says (only `POST /revoke` has one).
    body: Vec<u8>,
}

fn read_request(stream: &mut TcpStream) -> io::Result<Option<Result<Request, String>>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let target = req.path.unwrap_or("");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let authorization = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_owned);
                let (method, path, query) = (
                    req.method.unwrap_or("").to_string(),
                    path.to_string(),
                    query.to_string(),
                );
                let body = match crate::revocations::read_body(&buf, stream, deadline) {
                    Ok(b) => b,
                    Err(e) => return Ok(Some(Err(e))),
                };
                return Ok(Some(Ok(Request {
                    method,
                    path,
                    query,
                    authorization,
                    body,
                })));
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
            _ => return Ok(Some(Err("bad request".into()))),
        }
    }
}

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Readyz,
    Drain,
    Sessions,
    CloseSession(String),
    Vms,
    Evacuate(String),
    Restore(String),
    Revoke,
    Revocations,
    NotFound,
}

impl Route {
    fn of(path: &str) -> Route {
        let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        match segs.as_slice() {
            ["metrics"] => Route::Metrics,
            ["healthz"] => Route::Healthz,
            ["readyz"] => Route::Readyz,
            ["drain"] => Route::Drain,
            ["sessions"] => Route::Sessions,
            ["sessions", id, "close"] => Route::CloseSession(percent_decode(id)),
            ["vms"] => Route::Vms,
            ["vms", vm, "evacuate"] => Route::Evacuate(percent_decode(vm)),
            ["vms", vm, "restore"] => Route::Restore(percent_decode(vm)),
            ["revoke"] => Route::Revoke,
            ["revocations"] => Route::Revocations,
            _ => Route::NotFound,
        }
    }

    /// The one method it answers: `POST` for whatever changes something.
    fn method(&self) -> &'static str {
        match self {
            Route::Drain
            | Route::CloseSession(_)
            | Route::Evacuate(_)
            | Route::Restore(_)
            | Route::Revoke => "POST",
            _ => "GET",
        }
    }
}

/// `%XX` escapes decoded (a `+` stays a `+`); invalid escapes and bytes
/// that do not make UTF-8 are kept as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// The query's `key=value` pairs, decoded; `None` naming the first key not
/// in `allowed` (a typo must not silently widen a filter).
fn query_pairs(query: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = percent_decode(k);
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "unknown query parameter {k:?}; known: {}",
                allowed.join(", ")
            ));
        }
        out.push((k, percent_decode(v)));
    }
    Ok(out)
}

/// Compares every byte of the longer of the two, whatever differs first,
/// so the time taken says nothing of how much of a guess was right.
fn same_token(given: &[u8], want: &[u8]) -> bool {
    let mut diff = given.len() ^ want.len();
    for i in 0..given.len().max(want.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = want.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    std::hint::black_box(diff) == 0
}

/// Whether an `Authorization` header carries `token` as a bearer token.
fn authorized(header: Option<&str>, token: &[u8]) -> bool {
    let Some((scheme, given)) = header.and_then(|h| h.trim().split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && same_token(given.trim().as_bytes(), token)
}

/// Most sessions one `GET /sessions` lists (`limit`), and the default.
pub const MAX_LIST: usize = 100_000;
pub const DEFAULT_LIST: usize = 1_000;
/// Longest evacuation spread a request may ask for.
const MAX_SPREAD_S: f64 = 86_400.0;

/// A response: status, content type, extra header lines, body.
struct Answer {
    status: u16,
    ctype: &'static str,
    headers: String,
    body: String,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Answer {
        Answer {
            status,
            ctype: "text/plain",
            headers: String::new(),
            body: body.into(),
        }
    }

    fn json(status: u16, v: &impl serde::Serialize) -> Answer {
        let mut body = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
        body.push('\n');
        Answer {
            status,
            ctype: "application/json",
            headers: String::new(),
            body,
        }
    }
}

fn handle(mut stream: TcpStream, admin: &Admin) -> io::Result<()> {
    let req = match read_request(&mut stream)? {
        None => return Ok(()),
        Some(Ok(r)) => r,
        Some(Err(e)) => return send(&mut stream, Answer::text(400, format!("{e}\n"))),
    };
    let a = answer(admin, &req);
    send(&mut stream, a)
}

fn answer(admin: &Admin, req: &Request) -> Answer {
    if let Some(token) = &admin.token {
        if !authorized(req.authorization.as_deref(), token) {
            let mut a = Answer::text(401, "unauthorized: send Authorization: Bearer TOKEN\n");
            a.headers = "WWW-Authenticate: Bearer realm=\"eval-proxy admin\"\r\n".into();
            return a;
        }
    }
    let route = Route::of(&req.path);
    if route == Route::NotFound {
        return Answer::text(404, "not found\n");
    }
    let allow = route.method();
    if req.method != allow {
        let mut a = Answer::text(405, "method not allowed\n");
        a.headers = format!("Allow: {allow}\r\n");
        return a;
    }
    match route {
        Route::Metrics => Answer {
            status: 200,
            ctype: "text/plain; version=0.0.4",
            headers: String::new(),
            body: admin.metrics(),
        },
        Route::Healthz => Answer::text(200, "ok\n"),
        Route::Readyz if !admin.lifecycle.ready() => Answer::text(503, "draining\n"),
        Route::Readyz => Answer::text(200, "ready\n"),
        Route::Drain => {
            admin.lifecycle.request(drain::Request::Drain);
            Answer::text(202, "draining\n")
        }
        Route::Sessions => list_sessions(admin, &req.query).unwrap_or_else(|e| e),
        Route::CloseSession(id) => close_session(admin, &id, &req.query).unwrap_or_else(|e| e),
        Route::Vms => Answer::json(
            200,
            &serde_json::json!({ "evacuated": *admin.registry.evacuations.list() }),
        ),
        Route::Evacuate(vm) => evacuate(admin, &vm, &req.query).unwrap_or_else(|e| e),
        Route::Restore(vm) => restore(admin, &vm).unwrap_or_else(|e| e),
        Route::Revoke | Route::Revocations => {
            let (status, body) = crate::revocations::admin_request(
                &admin.revocations,
                &req.method,
                &req.path,
                &req.query,
                &req.body,
            );
            Answer {
                status,
                ctype: "application/json",
                headers: String::new(),
                body,
            }
        }
        Route::NotFound => Answer::text(404, "not found\n"),
    }
}

fn bad(msg: impl std::fmt::Display) -> Answer {
    Answer::text(400, format!("{msg}\n"))
}

fn ask(admin: &Admin, make: impl Fn() -> Command) -> Result<Vec<registry::Reply>, Answer> {
    admin
        .registry
        .ask(make)
        .map_err(|e| Answer::text(503, format!("{e}\n")))
}

/// One listed session, as JSON.
#[derive(serde::Serialize)]
struct Row<'a> {
    /// As Conman sees it in `X-Eval-Session`.
    id: String,
    repl: Option<&'a str>,
    user: Option<&'a str>,
    vm: Option<&'a str>,
    shard: usize,
    phase: &'static str,
    age_ms: u64,
    since_client_ms: Option<u64>,
    since_conman_ms: Option<u64>,
    bytes_from_client: u64,
    bytes_from_conman: u64,
}

impl<'a> From<&'a Info> for Row<'a> {
    fn from(i: &'a Info) -> Row<'a> {
        Row {
            id: crate::session::SessionId(i.id).to_string(),
            repl: i.ident.as_deref().map(|x| x.repl()),
            user: i.ident.as_deref().map(|x| x.user()),
            vm: i.vm.as_deref(),
            shard: i.shard,
            phase: i.phase.as_str(),
            age_ms: i.age_ms,
            since_client_ms: i.since_client_ms,
            since_conman_ms: i.since_conman_ms,
            bytes_from_client: i.bytes_from_client,
            bytes_from_conman: i.bytes_from_conman,
        }
    }
}

fn list_sessions(admin: &Admin, query: &str) -> Result<Answer, Answer> {
    let mut filter = Filter::default();
    let mut limit = DEFAULT_LIST;
    for (k, v) in query_pairs(query, &["repl", "user", "vm", "limit"]).map_err(bad)? {
        let set = (!v.is_empty()).then_some(v.clone());
        match k.as_str() {
            "repl" => filter.repl = set,
            "user" => filter.user = set,
            "vm" => filter.vm = set,
            _ => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIST).contains(n))
                    .ok_or_else(|| bad(format!("limit must be a number in 1..={MAX_LIST}")))?
            }
        }
    }
    let replies = ask(admin, || Command::List {
        filter: filter.clone(),
        limit,
    })?;
    let (list, matched) = registry::merge_lists(replies, limit);
    /// Serialized as it is: going through a `serde_json::Value` would
    /// build a map per session (a few times slower for 10,000).
    #[derive(serde::Serialize)]
    struct Listing<'a> {
        matched: usize,
        returned: usize,
        sessions: Vec<Row<'a>>,
    }
    Ok(Answer::json(
        200,
        &Listing {
            matched,
            returned: list.len(),
            sessions: list.iter().map(Row::from).collect(),
        },
    ))
}

fn close_session(admin: &Admin, id: &str, query: &str) -> Result<Answer, Answer> {
    let sid = u64::from_str_radix(id, 16)
        .ok()
        .filter(|_| !id.is_empty() && id.len() <= 16)
        .ok_or_else(|| bad(format!("{id:?} is not a session id (16 hex digits)")))?;
    let mut code = session_registry::ADMIN_CLOSE_CODE;
    for (_, v) in query_pairs(query, &["code"]).map_err(bad)? {
        code = v
            .parse()
            .ok()
            .filter(|&c| session_registry::valid_close_code(c))
            .ok_or_else(|| {
                bad(format!(
                    "code {v:?}: must be a close code a peer may send (1000-1003, 1007-1014, 3000-4999)"
                ))
            })?;
    }
    let replies = ask(admin, || Command::Close { id: sid, code })?;
    if replies.iter().all(|r| r.closed == 0) {
        return Err(Answer::text(404, format!("no session {id}\n")));
    }
    Ok(Answer::json(
        200,
        &serde_json::json!({ "closed": crate::session::SessionId(sid).to_string(), "code": code }),
    ))
}

/// A VM id as placement knows it: in static mode one of the configured
/// VMs, else any reasonable name (the Controlplane's).
fn check_vm(admin: &Admin, vm: &str) -> Result<(), Answer> {
    if vm.is_empty() || vm.len() > 255 || vm.chars().any(char::is_control) {
        return Err(bad(format!("{vm:?} is not a VM id")));
    }
    let cfg = admin.config.current().cfg;
    if let Ok(crate::control::ControlConfig {
        mode: crate::control::PlacementMode::Static { vms, .. },
        ..
    }) = cfg.control_config()
    {
        if !vms.iter().any(|(id, _)| id == vm) {
            let known: Vec<&str> = vms.iter().map(|(id, _)| id.as_str()).collect();
            return Err(Answer::text(
                404,
                format!(
                    "no VM {vm:?} in placement.vms (known: {})\n",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn evacuate(admin: &Admin, vm: &str, query: &str) -> Result<Answer, Answer> {
    check_vm(admin, vm)?;
    let mut spread = admin.config.current().cfg.drain.evacuate_spread();
    for (_, v) in query_pairs(query, &["spread_s"]).map_err(bad)? {
        let s: f64 = v
            .parse()
            .ok()
            .filter(|s| (0.0..=MAX_SPREAD_S).contains(s))
            .ok_or_else(|| bad(format!("spread_s {v:?}: seconds in 0..={MAX_SPREAD_S}")))?;
        spread = Duration::from_secs_f64(s);
    }
    let added = admin.registry.evacuations.add(vm).map_err(|_| {
        Answer::text(
            409,
            format!(
                "{} VMs are evacuated already, the most at once\n",
                registry::MAX_EVACUATED
            ),
        )
    })?;
    let (closing, moved) = if added {
        let vm_id = vm.to_owned();
        let replies = match admin.registry.ask(|| Command::Evacuate {
            vm: vm_id.clone(),
            spread,
        }) {
            Ok(r) => r,
            // Some shards never got it: undo, so that a retry plans them all.
            Err(e @ registry::Unanswered::Busy(_)) => {
                admin.registry.evacuations.remove(vm);
                // Shards that took it drop the VM from their copy again
                // (best effort: a busy one refreshes at its next command).
                let _ = admin.registry.ask(|| Command::Refresh);
                return Err(Answer::text(
                    503,
                    format!("not evacuated: {e}; try again\n"),
                ));
            }
            // Every shard got it and acts on it when it gets to it.
            Err(e) => {
                return Err(Answer::text(
                    503,
                    format!("evacuated, but not confirmed: {e}\n"),
                ))
            }
        };
        (
            replies.iter().map(|r| r.closed).sum::<usize>(),
            replies.iter().map(|r| r.moved).sum::<usize>(),
        )
    } else {
        (0, 0)
    };
    tracing::info!(vm, closing, moved, already = !added, "VM evacuated");
    Ok(Answer::json(
        202,
        &serde_json::json!({
            "vm": vm,
            "already_evacuated": !added,
            "closing": closing,
            "moved": moved,
            "spread_ms": spread.as_millis() as u64,
        }),
    ))
}

fn restore(admin: &Admin, vm: &str) -> Result<Answer, Answer> {
    let removed = admin.registry.evacuations.remove(vm);
    // Every shard has the new set before the answer: a session placed
    // after it may land on the VM again.
    ask(admin, || Command::Refresh)?;
    tracing::info!(vm, was_evacuated = removed, "VM restored");
    Ok(Answer::json(
        200,
        &serde_json::json!({ "vm": vm, "was_evacuated": removed }),
    ))
}

fn send(stream: &mut TcpStream, a: Answer) -> io::Result<()> {
    let reason = match a.status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        a.status,
        a.ctype,
        a.body.len(),
        a.headers
    );
    let deadline = Instant::now() + RESPONSE_DEADLINE;
    write_all_by(stream, head.as_bytes(), deadline)?;
    write_all_by(stream, a.body.as_bytes(), deadline)
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
            registry: Registry::new(&[], Arc::default()).0,
            token: None,
        }
    }

    fn req(method: &str, target: &str, auth: Option<&str>) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            authorization: auth.map(Into::into),
            body: Vec::new(),
        }
    }

    #[test]
    fn changes_are_post_only_and_a_wrong_method_says_what_is_allowed() {
        let a = admin();
        for target in [
            "/drain",
            "/sessions/00000000000000ff/close",
            "/vms/default/evacuate",
            "/vms/default/restore",
        ] {
            let r = answer(&a, &req("GET", target, None));
            assert_eq!(
                (r.status, r.headers.as_str()),
                (405, "Allow: POST\r\n"),
                "{target}"
            );
        }
        for target in ["/metrics", "/sessions", "/vms", "/healthz", "/readyz"] {
            let r = answer(&a, &req("POST", target, None));
            assert_eq!(
                (r.status, r.headers.as_str()),
                (405, "Allow: GET\r\n"),
                "{target}"
            );
        }
        assert_eq!(answer(&a, &req("GET", "/nope", None)).status, 404);
        assert_eq!(answer(&a, &req("GET", "/sessions/x", None)).status, 404);
    }

    #[test]
    fn with_a_token_every_request_needs_it() {
        let mut a = admin();
        a.token = Some(b"0123456789abcdef".to_vec());
        for auth in [
            None,
            Some("Bearer 0123456789abcdeX"),
            Some("Bearer 0123456789abcde"),
            Some("Bearer 0123456789abcdef0"),
            Some("Basic 0123456789abcdef"),
            Some("Bearer"),
        ] {
            let r = answer(&a, &req("GET", "/healthz", auth));
            assert_eq!(r.status, 401, "{auth:?}");
            assert!(r.headers.starts_with("WWW-Authenticate: Bearer"));
            // Even the 404 and the 405 are for those who may ask.
            assert_eq!(answer(&a, &req("GET", "/nope", auth)).status, 401);
            assert_eq!(answer(&a, &req("GET", "/drain", auth)).status, 401);
        }
        let ok = Some("bearer  0123456789abcdef ");
        assert_eq!(answer(&a, &req("GET", "/healthz", ok)).status, 200);
        assert_eq!(answer(&a, &req("GET", "/drain", ok)).status, 405);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"a"));
        assert!(same_token(b"", b""));
    }

    #[test]
    fn paths_and_queries_are_decoded_and_unknown_keys_refused() {
        assert_eq!(
            Route::of("/vms/vm%2F1%20a/evacuate"),
            Route::Evacuate("vm/1 a".into())
        );
        assert_eq!(Route::of("/vms/a/b/evacuate"), Route::NotFound);
        assert_eq!(percent_decode("a+b%zz%4"), "a+b%zz%4");
        assert_eq!(
            query_pairs("repl=r%201&&limit=", &["repl", "limit"]).unwrap(),
            [
                ("repl".into(), "r 1".into()),
                ("limit".into(), String::new())
            ]
        );
        assert!(query_pairs("rpl=x", &["repl"]).unwrap_err().contains("rpl"));
    }

    #[test]
    fn registry_requests_check_their_arguments() {
        let a = admin();
        let status = |m: &str, t: &str| answer(&a, &req(m, t, None)).status;
        assert_eq!(status("GET", "/sessions?limit=0"), 400);
        assert_eq!(status("GET", "/sessions?limit=x"), 400);
        assert_eq!(status("GET", "/sessions?vmm=1"), 400);
        assert_eq!(status("GET", "/sessions?repl=r&limit=5"), 200);
        assert_eq!(status("POST", "/sessions/zz/close"), 400);
        assert_eq!(status("POST", "/sessions/ff/close?code=1005"), 400);
        assert_eq!(status("POST", "/sessions/ff/close?code=999"), 400);
        // No shard has it (this admin has no shards).
        assert_eq!(status("POST", "/sessions/ff/close?code=4000"), 404);
        // Static mode: only configured VMs.
        assert_eq!(status("POST", "/vms/vm-9/evacuate"), 404);
        assert_eq!(status("POST", "/vms/default/evacuate?spread_s=-1"), 400);
        assert_eq!(status("POST", "/vms/default/evacuate?spread_s=0"), 202);
        assert!(a
            .metrics()
            .contains("eval_vm_evacuated{vm=\"default\"} 1\n"));
        let vms = answer(&a, &req("GET", "/vms", None)).body;
        assert_eq!(vms, "{\"evacuated\":[\"default\"]}\n");
        assert_eq!(status("POST", "/vms/default/restore"), 200);
        assert!(!a.metrics().contains("eval_vm_evacuated{"));
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
