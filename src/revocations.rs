//! The revocations in force, shared by the process: made on the admin API
//! (`POST /revoke`), read from `token.revoked_file` (at start and whenever
//! it changes), and, in Controlplane mode, pulled from and pushed to the
//! Controlplane (`control::revsync`). The set itself and its matching are
//! sans-IO (`token::revoke`); this file is its shared, persistent home.
//!
//! Every change replaces the set (an `Arc`), moves the epoch, rewrites the
//! file (temp file + rename, so a crash leaves the old or the new one) and
//! wakes every shard through its eventfd. A shard checks the epoch with one
//! atomic load per loop turn, and only when it moved takes the lock, picks
//! up the new set and asks each of its sessions whether the set revokes it
//! (`Session::revoked_by`); tokens are checked against the shard's copy
//! after verification, cached verifications included. No lock is taken on
//! the per-event path.

use std::io::{self, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info};

use crate::control::drain::Wakers;
use crate::metrics::{self, names};
use crate::token::revoke::{Revocation, RevokeError, RevokeSet, Wire};

/// How often the watcher looks at `token.revoked_file`.
const FILE_POLL: Duration = Duration::from_secs(1);
/// A `POST /revoke` body is one small JSON object.
const MAX_BODY: usize = 16 * 1024;
/// Revocations made here and not yet accepted by the Controlplane, at most
/// (the oldest go first past it; each is in force locally anyway).
const MAX_OUTBOX: usize = 10_000;

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Revocations {
    epoch: AtomicU64,
    set: Mutex<Arc<RevokeSet>>,
    wakers: Wakers,
    file: Option<PathBuf>,
    /// Made here, to forward to the Controlplane (Controlplane mode only).
    outbox: Mutex<Option<Vec<Revocation>>>,
    /// `outbox` holds something: looked at ten times a second by the
    /// control shard, without the lock.
    outbox_full: AtomicBool,
    /// Controlplane polls and forwards that failed.
    pub poll_failures: AtomicU64,
    pub forward_failures: AtomicU64,
}

impl Revocations {
    /// The set in `file` if it exists (a file that does not parse is an
    /// error: starting without the revocations it holds would let revoked
    /// tokens in); else an empty one, and the file made now, so that a
    /// path that cannot be written is an error at start rather than at
    /// the first revocation. Called before the sockets are taken.
    pub fn load(file: Option<&Path>) -> io::Result<RevokeSet> {
        let Some(p) = file else {
            return Ok(RevokeSet::default());
        };
        let now = now_unix();
        if let Some(set) = read_file(p, now)? {
            if !set.is_empty() {
                info!(entries = set.len(), "revocations loaded");
            }
            return Ok(set);
        }
        let empty = RevokeSet::default();
        write_file(p, &empty, now).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "config key `token.revoked_file`: cannot write {}: {e}",
                    p.display()
                ),
            )
        })?;
        Ok(empty)
    }

    /// The store of `set` (from [`Revocations::load`] of `file`); changes
    /// wake the shards through `wake_fds`. `forward`: revocations made
    /// here go to the Controlplane too.
    pub fn new(set: RevokeSet, file: Option<PathBuf>, wake_fds: Vec<i32>, forward: bool) -> Self {
        Revocations {
            epoch: AtomicU64::new(0),
            set: Mutex::new(Arc::new(set)),
            wakers: Wakers { fds: wake_fds },
            file,
            outbox: Mutex::new(forward.then(Vec::new)),
            outbox_full: AtomicBool::new(false),
            poll_failures: AtomicU64::new(0),
            forward_failures: AtomicU64::new(0),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<RevokeSet> {
        lock(&self.set).clone()
    }

    /// Adds `list`; the error of the first that did not fit (the list is
    /// full), after the ones before it were added. `local`: made on this
    /// proxy's admin API, so forwarded to the Controlplane.
    pub fn add(&self, list: Vec<Revocation>, local: bool) -> Result<usize, RevokeError> {
        let now = now_unix();
        let mut guard = lock(&self.set);
        let mut set = (**guard).clone();
        set.prune(now);
        let mut added = 0;
        let mut result = Ok(());
        for r in list {
            let copy = local.then(|| r.clone());
            match set.insert(r, now) {
                Ok(changed) => {
                    added += usize::from(changed);
                    if let (true, Some(r), Some(out)) = (changed, copy, lock(&self.outbox).as_mut())
                    {
                        if out.len() >= MAX_OUTBOX {
                            out.remove(0);
                        }
                        out.push(r);
                        self.outbox_full.store(true, Ordering::Release);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if added > 0 {
            self.publish(&mut guard, set, now);
        }
        result.map(|()| added)
    }

    /// Puts the file's entries in force instead of the set's (it was
    /// edited by hand). Read under the lock, so that a revocation made
    /// meanwhile is not lost between the read and the swap. A file that
    /// is gone changes nothing.
    fn reload_file(&self) -> io::Result<()> {
        let Some(p) = &self.file else {
            return Ok(());
        };
        let now = now_unix();
        let mut guard = lock(&self.set);
        let Some(set) = read_file(p, now)? else {
            return Ok(());
        };
        if guard.live(now) != set.live(now) {
            info!(
                entries = set.len(),
                "revocations reloaded from token.revoked_file"
            );
            self.publish(&mut guard, set, now);
        }
        Ok(())
    }

    fn publish(&self, guard: &mut Arc<RevokeSet>, set: RevokeSet, now: i64) {
        if let Some(p) = &self.file {
            if let Err(e) = write_file(p, &set, now) {
                error!(file = %p.display(), err = %e, "cannot write token.revoked_file; the revocations are in force but will not survive a restart");
            }
        }
        *guard = Arc::new(set);
        self.epoch.fetch_add(1, Ordering::Release);
        self.wakers.wake_all();
    }

    /// Revocations made here since the last call, to forward.
    pub fn take_outbox(&self) -> Vec<Revocation> {
        let mut out = lock(&self.outbox);
        self.outbox_full.store(false, Ordering::Release);
        out.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Whether [`Revocations::take_outbox`] would give something.
    pub fn has_outbox(&self) -> bool {
        self.outbox_full.load(Ordering::Acquire)
    }

    /// Puts back what could not be forwarded, ahead of newer ones.
    pub fn requeue(&self, mut list: Vec<Revocation>) {
        if let Some(out) = lock(&self.outbox).as_mut() {
            list.append(out);
            let over = list.len().saturating_sub(MAX_OUTBOX);
            list.drain(..over);
            self.outbox_full.store(!list.is_empty(), Ordering::Release);
            *out = list;
        }
    }

    /// The `/metrics` lines of revocations.
    pub fn render(&self, out: &mut String) {
        metrics::gauge(
            out,
            names::REVOCATIONS_IN_FORCE,
            "Revocations in force (by jti, user or repl).",
            self.current().live_count(now_unix()) as u64,
        );
        let _ = std::fmt::Write::write_fmt(
            out,
            format_args!(
                "# HELP {0} Revocation syncs with the Controlplane that failed: polls (GET /v1/revocations) and forwards (POST /v1/revocations).\n# TYPE {0} counter\n{0}{{op=\"poll\"}} {1}\n{0}{{op=\"forward\"}} {2}\n",
                names::REVOCATION_SYNC_FAILURES,
                self.poll_failures.load(Ordering::Relaxed),
                self.forward_failures.load(Ordering::Relaxed),
            ),
        );
    }
}

/// `Ok(None)` when the file does not exist yet (it is made at the first
/// revocation).
fn read_file(p: &Path, now: i64) -> io::Result<Option<RevokeSet>> {
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("config key `token.revoked_file`: {}: {e}", p.display()),
            ))
        }
    };
    RevokeSet::from_file_text(&text, now)
        .map(Some)
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("config key `token.revoked_file`: {}: {e}", p.display()),
            )
        })
}

/// Temp file beside it, fsync, rename: readers see the old or the new file.
fn write_file(p: &Path, set: &RevokeSet, now: i64) -> io::Result<()> {
    use std::io::Write as _;
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(set.to_file_text(now).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, p)
}

/// Watches `token.revoked_file` (its size, mtime and inode, polled: cheap,
/// and works on every filesystem) and puts a changed file in force; a file
/// that does not parse is logged, one removed is ignored, and in both
/// cases the revocations in force stay (an empty list,
/// `{"revocations":[]}`, clears them). Like
/// the key directory's watcher (`server::watch_keys`): when the process is
/// out of descriptors the round is skipped, as that says nothing about the
/// file.
pub fn watch_file(store: Arc<Revocations>) -> io::Result<()> {
    let Some(path) = store.file.clone() else {
        return Ok(());
    };
    type Stamp = Option<(u64, u64, Option<SystemTime>)>;
    let stamp = move |p: &Path| -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(p) {
            Ok(m) => Some(Some((m.ino(), m.len(), m.modified().ok()))),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => None,
            Err(_) => Some(None),
        }
    };
    std::thread::Builder::new()
        .name("revoked-watch".into())
        .spawn(move || {
            let mut last = stamp(&path);
            loop {
                std::thread::sleep(FILE_POLL);
                let Some(now) = stamp(&path) else {
                    continue;
                };
                if last.as_ref() == Some(&now) || now.is_none() {
                    last = Some(now);
                    continue;
                }
                match store.reload_file() {
                    Ok(()) => last = Some(now),
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {}
                    Err(e) => {
                        last = Some(now);
                        error!(err = %e, "token.revoked_file changed but does not read; the revocations in force stay");
                    }
                }
            }
        })?;
    Ok(())
}

/// A shard's copy of the set and the epoch it came from.
pub struct LocalRevocations {
    store: Arc<Revocations>,
    epoch: u64,
    set: Arc<RevokeSet>,
}

impl LocalRevocations {
    pub fn new(store: Arc<Revocations>) -> Self {
        let epoch = store.epoch();
        let set = store.current();
        LocalRevocations { store, epoch, set }
    }

    /// Picks up a changed set: one atomic load when nothing changed; true
    /// when it did (the shard then asks its sessions).
    pub fn refresh(&mut self) -> bool {
        let e = self.store.epoch();
        if e == self.epoch {
            return false;
        }
        self.epoch = e;
        self.set = self.store.current();
        true
    }

    pub fn get(&self) -> &RevokeSet {
        &self.set
    }
}

// ---- admin API -----------------------------------------------------------

/// `POST /revoke` and `GET /revocations`, routed here by the admin
/// listener with the request's body (see [`read_body`]). Returns the
/// status and the JSON body to answer with.
pub fn admin_request(
    store: &Revocations,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
) -> (u16, String) {
    let err = |status: u16, msg: &str| (status, serde_json::json!({ "error": msg }).to_string());
    match (method, path) {
        ("GET", "/revocations") => {
            let live: Vec<Wire> = store
                .current()
                .live(now_unix())
                .iter()
                .map(Wire::from_revocation)
                .collect();
            (
                200,
                serde_json::json!({ "revocations": live }).to_string() + "\n",
            )
        }
        ("POST", "/revoke") => {
            let wire = match parse_revoke(query, body) {
                Ok(w) => w,
                Err(e) => return err(400, &e),
            };
            let r = match wire.into_revocation(now_unix()) {
                Ok(r) => r,
                Err(e) => return err(400, &e.to_string()),
            };
            let shown = serde_json::to_value(Wire::from_revocation(&r)).unwrap_or_default();
            info!(
                scope = r.scope.as_str(),
                until = r.until,
                "revocation made on the admin API"
            );
            match store.add(vec![r], true) {
                Ok(_) => (
                    200,
                    serde_json::json!({ "revoked": shown }).to_string() + "\n",
                ),
                Err(e) => err(507, &e.to_string()),
            }
        }
        (_, "/revoke" | "/revocations") => err(405, "method not allowed"),
        _ => err(404, "not found"),
    }
}

/// The revocation of a query string or a JSON body, not both.
fn parse_revoke(query: &str, body: &[u8]) -> Result<Wire, String> {
    let body = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
    let body = body.trim();
    if !body.is_empty() {
        if !query.is_empty() {
            return Err("give the revocation as a query string or a JSON body, not both".into());
        }
        return serde_json::from_str(body).map_err(|e| format!("body: {e}"));
    }
    let mut w = Wire::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = crate::proto::url::decode_query_value(v)
            .ok_or_else(|| format!("{k}: bad percent-encoding"))?;
        let slot = match k {
            "jti" => &mut w.jti,
            "user" => &mut w.user,
            "repl" => &mut w.repl,
            "until" => {
                set_once(&mut w.until, crate::token::revoke::Until::Text(v), k)?;
                continue;
            }
            "ttl_s" => {
                let n = v.parse().map_err(|_| "ttl_s: not an integer".to_string())?;
                set_once(&mut w.ttl_s, n, k)?;
                continue;
            }
            _ => return Err(format!("unknown parameter {k:?}")),
        };
        set_once(slot, v, k)?;
    }
    Ok(w)
}

fn set_once<T>(slot: &mut Option<T>, v: T, k: &str) -> Result<(), String> {
    if slot.replace(v).is_some() {
        return Err(format!("{k} given twice"));
    }
    Ok(())
}

/// The request body after `head`'s request head, by its Content-Length.
/// The body after the request head in `head` (read on from `stream` until
/// `deadline`), as long as its Content-Length says; empty without one.
pub fn read_body(
    head: &[u8],
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = req.parse(head) else {
        return Err("bad request head".into());
    };
    let mut len = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad Content-Length")?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("send the body with a Content-Length".into());
        }
    }
    if len > MAX_BODY {
        return Err(format!("body over {MAX_BODY} bytes"));
    }
    let mut body = head[n..].to_vec();
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or("body not received in time")?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err("body cut short".into()),
            Ok(k) => body.extend_from_slice(&chunk[..k]),
            Err(e) => return Err(format!("body: {e}")),
        }
    }
    body.truncate(len);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::revoke::Scope;

    #[test]
    fn query_and_body_forms_parse_the_same() {
        let now = now_unix();
        let q = parse_revoke("user=b%C3%B6b&ttl_s=60", b"").unwrap();
        let b = parse_revoke("", r#"{"user":"böb","ttl_s":60}"#.as_bytes()).unwrap();
        for w in [q, b] {
            let r = w.into_revocation(now).unwrap();
            assert_eq!(
                (r.scope, r.value.as_str(), r.until),
                (Scope::User, "böb", now + 60)
            );
        }
        for bad in [
            "jti=a&jti=b&ttl_s=1",
            "jti=a&ttl_s=x",
            "x=1",
            "jti=%zz&ttl_s=1",
        ] {
            assert!(parse_revoke(bad, b"").is_err(), "{bad}");
        }
        assert!(parse_revoke("jti=a", br#"{"jti":"a","ttl_s":1}"#).is_err());
        assert!(parse_revoke("", b"{not json").is_err());
    }

    #[test]
    fn changes_move_the_epoch_and_land_in_the_file() {
        let dir = std::env::temp_dir().join(format!("eval-revoked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("revoked.json");
        let _ = std::fs::remove_file(&file);
        let set = Revocations::load(Some(&file)).unwrap();
        assert!(file.exists(), "made at start");
        let store = Arc::new(Revocations::new(set, Some(file.clone()), Vec::new(), true));
        let mut local = LocalRevocations::new(store.clone());
        assert!(!local.refresh());
        let r = Revocation {
            scope: Scope::Jti,
            value: "j1".into(),
            until: now_unix() + 100,
        };
        assert_eq!(store.add(vec![r.clone()], true), Ok(1));
        assert_eq!(store.add(vec![r.clone()], true), Ok(0), "no change");
        assert_eq!(store.epoch(), 1);
        assert!(local.refresh());
        assert!(local.get().matches("j1", "", "", now_unix()));
        assert!(store.has_outbox());
        assert_eq!(store.take_outbox(), vec![r.clone()]);
        assert!(!store.has_outbox());
        assert!(store.take_outbox().is_empty());
        store.requeue(vec![r]);
        assert!(store.has_outbox());
        // A restart reads it back.
        let again = Revocations::load(Some(&file)).unwrap();
        assert!(again.matches("j1", "", "", now_unix()));
        // A broken file is refused at start, naming the key.
        std::fs::write(&file, "{").unwrap();
        let e = Revocations::load(Some(&file)).unwrap_err();
        assert!(e.to_string().contains("token.revoked_file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
