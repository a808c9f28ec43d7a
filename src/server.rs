//! Process assembly: listeners, shards, admin, signals. `run` takes a fully
//! validated config and returns when every shard has drained.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::control::drain::{DrainPhase, DrainTimes, Lifecycle, Request, Spares, Wakers};
use crate::control::registry::{Evacuations, Registry};
use crate::control::{handover, systemd};
use crate::keys::KeyStore;
use crate::metrics::ShardStats;
use crate::reload::ConfigStore;
use crate::shard::{listener, Shard, ShardSpec};
use crate::token::{self, KeySet};

/// Addresses actually bound (port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub shards: usize,
}

pub fn load_keys(cfg: &Config) -> io::Result<KeySet> {
    let mut keys = match &cfg.token.keys_dir {
        // Named as config errors are: the path alone does not say which
        // setting to fix. InvalidInput makes it exit 2 (bad config).
        Some(dir) => KeySet::load_dir(dir).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("config key `token.keys_dir`: {e}"),
            )
        })?,
        None => KeySet::new(),
    };
    if cfg.token.allow_dev_key {
        warn!("token.allow_dev_key is on: tokens signed with the public dev key are accepted");
        keys.insert(token::DEV_KID, token::dev_signing_key().verifying_key());
    }
    Ok(keys)
}

/// Blocks SIGTERM, SIGINT, SIGHUP and SIGUSR2 in the calling thread, and so in every
/// thread it spawns afterwards, so that only `run`'s signal thread
/// (`sigwait`) consumes them. The kernel hands a process-directed signal to
/// any thread that does not block it, and there the default action kills the
/// whole process with no drain; so a caller that starts threads of its own
/// before `run` (`--dev`'s embedded fake Conman) calls this first. `run`
/// calls it again; blocking twice is harmless.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Re-reads the key directory into the store; on any error the old keys
/// stay in force and the error is logged. The store counts the successful
/// reloads ([`KeyStore::epoch`]).
fn reload_keys(cfg: &Config, store: &KeyStore, why: &str) {
    match load_keys(cfg) {
        Ok(keys) => {
            info!(trigger = why, keys = keys.len(), "token keys reloaded");
            store.replace(keys);
        }
        Err(e) => error!(trigger = why, err = %e, "token key reload failed; keeping the old keys"),
    }
}

/// Watches `token.keys_dir` for changes (polling its entries' names and
/// mtimes: cheap, and works on every filesystem) and reloads on change.
fn watch_keys(cfg: Arc<Config>, store: Arc<KeyStore>) -> io::Result<()> {
    let Some(dir) = cfg.token.keys_dir.clone() else {
        return Ok(());
    };
    // `None` when the process is out of descriptors: that says nothing
    // about the directory, and a reload now would only fail the same way.
    let snapshot = move || -> Option<Vec<(std::path::PathBuf, Option<std::time::SystemTime>)>> {
        let out_of_fds =
            |e: &io::Error| matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        let mut v = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd {
                    match e {
                        Ok(e) => v.push((e.path(), e.metadata().and_then(|m| m.modified()).ok())),
                        Err(e) if out_of_fds(&e) => return None,
                        Err(_) => {}
                    }
                }
            }
            Err(e) if out_of_fds(&e) => return None,
            Err(_) => {}
        }
        v.sort();
        Some(v)
    };
    std::thread::Builder::new()
        .name("key-watch".into())
        .spawn(move || {
            let mut last = snapshot();
            loop {
                std::thread::sleep(KEY_POLL);
                let Some(now) = snapshot() else {
                    continue;
                };
                if last.as_ref() != Some(&now) {
                    last = Some(now);
                    reload_keys(&cfg, &store, "keys_dir changed");
                }
            }
        })?;
    Ok(())
}

const KEY_POLL: Duration = Duration::from_secs(2);

/// SIGUSR2 (systemd's `ExecReload`): starts this binary again, as it is on
/// disk now, with the same arguments plus `--takeover`; the new process
/// takes the sockets over and this one drains. Its stdout and stderr are
/// ours, so a supervisor sees its `ready` line.
fn upgrade(has_handover: bool) {
    if !has_handover {
        warn!("SIGUSR2: no handover socket (lifecycle.handover_socket), so no upgrade");
        return;
    }
    let mut args = std::env::args_os();
    // argv[0], not /proc/self/exe: that names the old, replaced file.
    let Some(exe) = args.next() else {
        return;
    };
    let rest: Vec<_> = args.filter(|a| a != "--takeover").collect();
    info!(exe = ?exe, "SIGUSR2: starting the new binary with --takeover");
    match std::process::Command::new(&exe)
        .args(&rest)
        .arg("--takeover")
        .spawn()
    {
        // Reaped if it exits first (a refused takeover, exit 2).
        Ok(mut child) => {
            let _ = std::thread::Builder::new()
                .name("upgrade-wait".into())
                .spawn(move || {
                    let st = child.wait();
                    info!(status = ?st, "the process started on SIGUSR2 exited");
                });
        }
        Err(err) => error!(%err, "SIGUSR2: cannot start the new binary"),
    }
}

/// Reads the config again as it was built at start (file plus flags), for
/// a SIGHUP reload; the error names the key or file at fault.
pub type Reloader = Box<dyn Fn() -> Result<Config, String> + Send>;

/// Sets the log filter (`log.level`) after a reload.
pub type LogLevelSetter = Box<dyn Fn(&str) + Send>;

/// How the process starts, beside its config.
#[derive(Default)]
pub struct StartOptions {
    /// Take the listening sockets over from the running proxy (its
    /// handover socket), which then drains; a normal start if none answers.
    pub takeover: bool,
    /// SIGHUP reloads the config through this (only the token keys without).
    pub reload: Option<Reloader>,
    pub set_log_level: Option<LogLevelSetter>,
}

/// SIGHUP: the config again, put in force if a reload may change what
/// changed (see `reload`); else the old one stays and the key at fault is
/// logged.
fn reload_config(
    reload: &Option<Reloader>,
    set_log_level: &Option<LogLevelSetter>,
    store: &ConfigStore,
    lifecycle: &Lifecycle,
) {
    let Some(reload) = reload else {
        return;
    };
    let result = reload()
        .inspect_err(|_| store.note_failure())
        .and_then(|new| store.replace(new).map_err(|e| e.to_string()));
    match result {
        Ok(cfg) => {
            lifecycle.set_times(drain_times(&cfg));
            if let Some(set) = set_log_level {
                set(&cfg.log.level);
            }
            info!(
                reloads = store.epoch(),
                "config reloaded; new sessions use it"
            );
        }
        Err(err) => error!(%err, "config reload refused; the old config stays in force"),
    }
}

fn drain_times(cfg: &Config) -> DrainTimes {
    DrainTimes {
        readiness_delay: cfg.drain.readiness_delay(),
        grace: Duration::from_secs(cfg.drain.grace_s),
        close_spread: cfg.drain.close_spread(),
    }
}

/// Where the listening sockets came from.
enum Origin {
    Bound,
    Systemd,
    TakenOver(handover::Received),
}

/// The configured identity a takeover compares (see `handover::Hello`).
fn hello(cfg: &Config) -> handover::Hello {
    handover::Hello {
        listen: cfg.listen.addr,
        shards: cfg.shard_count(),
        admin: cfg.admin.enabled.then_some(cfg.admin.addr),
    }
}

/// The public listening sockets, one per shard, and the admin listener if
/// it came with them: from systemd, from the running proxy, or bound here.
fn acquire(
    cfg: &Config,
    opts: &StartOptions,
) -> io::Result<(Vec<OwnedFd>, Option<OwnedFd>, Origin)> {
    let n = cfg.shard_count();
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if let Some(fds) = listener::systemd_fds()? {
        info!(
            sockets = fds.len(),
            "listening sockets from systemd (LISTEN_FDS)"
        );
        return Ok((listener::spread_over_shards(fds, n)?, None, Origin::Systemd));
    }
    let path = cfg.handover_socket();
    if opts.takeover {
        let path = path.clone().ok_or_else(|| {
            invalid(
                "--takeover needs a handover socket: set lifecycle.handover_socket \
                 (listen.addr has port 0, or handover is off)"
                    .into(),
            )
        })?;
        match handover::take_over(&path, &hello(cfg))? {
            handover::Takeover::Got(r) => {
                info!(
                    from_pid = r.old_pid,
                    sockets = r.listeners.len(),
                    "listening sockets taken over"
                );
                let mut r = r;
                let fds = std::mem::take(&mut r.listeners);
                let admin = r.admin.take();
                return Ok((fds, admin, Origin::TakenOver(r)));
            }
            handover::Takeover::NoOldProcess(why) => {
                warn!(%why, "--takeover: no running proxy answered; starting normally");
            }
        }
    }
    if listener::already_served(cfg.listen.addr) {
        let by = handover::who_listens(cfg.listen.addr)
            .map_or("another process".to_string(), |pid| {
                format!("process {pid}")
            });
        let how = match &path {
            Some(p) => format!(
                "To replace it without refusing a connect, run this binary with --takeover \
                 (and the same config): it takes the sockets over through {}",
                p.display()
            ),
            None => "Set lifecycle.handover_socket on both to hand the sockets over".into(),
        };
        return Err(invalid(format!(
            "listen.addr {} is already served by {by}; a second proxy would silently share \
             the port (SO_REUSEPORT). {how}.",
            cfg.listen.addr
        )));
    }
    let (sockets, _) = listener::bind_all(cfg.listen.addr, n, cfg.listen.backlog)
        .map_err(|e| io::Error::new(e.kind(), format!("listen on {}: {e}", cfg.listen.addr)))?;
    Ok((listener::into_owned(sockets), None, Origin::Bound))
}

pub fn run(cfg: Config, on_ready: impl FnOnce(Bound)) -> io::Result<()> {
    run_with(cfg, StartOptions::default(), on_ready)
}

pub fn run_with(cfg: Config, opts: StartOptions, on_ready: impl FnOnce(Bound)) -> io::Result<()> {
    let sigset = block_signals();
    let cfg = Arc::new(cfg);
    let n = cfg.shard_count();
    let keys = Arc::new(KeyStore::new(load_keys(&cfg)?));
    let control_cfg = cfg
        .control_config()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let revoked = crate::revocations::Revocations::load(cfg.token.revoked_file.as_deref())?;
    let (sockets, admin_fd, origin) = acquire(&cfg, &opts)?;
    let listen = listener::local_addr(&sockets[0])?;
    // Copies for the next handover, taken before the shards own theirs.
    let spares = Spares {
        listeners: sockets
            .iter()
            .map(|s| s.try_clone())
            .collect::<io::Result<_>>()?,
        admin: None,
    };
    let stats: Vec<Arc<ShardStats>> = (0..n).map(|_| Arc::new(ShardStats::default())).collect();
    let mut shard_ctl = Vec::with_capacity(n);
    let mut control_ends = Vec::with_capacity(n);
    for _ in 0..n {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        shard_ctl.push(std::os::fd::OwnedFd::from(a));
        control_ends.push(std::os::fd::OwnedFd::from(b));
    }
    let loaded = crate::reload::Loaded::new((*cfg).clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let local_placement = loaded.local_placement.clone();
    let config_store = Arc::new(ConfigStore::new(loaded));
    let mut wake_fds = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: creating an eventfd; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        wake_fds.push(fd);
    }
    let lifecycle = Arc::new(Lifecycle::new(
        drain_times(&cfg),
        Wakers {
            fds: wake_fds.clone(),
        },
    )?);
    let revocations = Arc::new(crate::revocations::Revocations::new(
        revoked,
        cfg.token.revoked_file.clone(),
        wake_fds.clone(),
        matches!(
            control_cfg.mode,
            crate::control::PlacementMode::Controlplane(_)
        ),
    ));
    let driver = lifecycle
        .driver(stats.clone())
        .ok_or_else(|| io::Error::other("drain driver taken twice"))?;
    let control_stats = Arc::new(crate::control::ControlStats::default());
    let evacuations = Arc::new(Evacuations::default());
    let (registry, inboxes) = Registry::new(&wake_fds, evacuations.clone());
    // The control shard owns the drain: its executor runs the driver.
    let control_thread = crate::control::spawn_with_drain(
        control_cfg,
        control_ends,
        control_stats.clone(),
        driver,
        revocations.clone(),
        evacuations,
    )
    .map_err(|e| io::Error::new(e.kind(), format!("control shard: {e}")))?;
    let admin_token = cfg
        .admin_token()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;

    let mut spares = spares;
    let admin_addr = if cfg.admin.enabled {
        let l = match admin_fd {
            Some(fd) => TcpListener::from(fd),
            None => TcpListener::bind(cfg.admin.addr).map_err(|e| {
                io::Error::new(e.kind(), format!("admin listen on {}: {e}", cfg.admin.addr))
            })?,
        };
        spares.admin = Some(OwnedFd::from(l.try_clone()?));
        let addr = l.local_addr()?;
        let admin = Arc::new(Admin {
            stats: stats.clone(),
            control: control_stats.clone(),
            keys: keys.clone(),
            lifecycle: lifecycle.clone(),
            config: config_store.clone(),
            revocations: revocations.clone(),
            registry,
            token: admin_token,
        });
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || admin::serve(l, admin))?;
        Some(addr)
    } else {
        None
    };

    {
        let lifecycle = lifecycle.clone();
        let has_handover = cfg.handover_socket().is_some();
        let reload_cfg = cfg.clone();
        let reload_store = keys.clone();
        let config_store = config_store.clone();
        let (reload, set_log_level) = (opts.reload, opts.set_log_level);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: waiting on a set blocked in every thread.
                if unsafe { libc::sigwait(&sigset, &mut sig) } != 0 {
                    continue;
                }
                if sig == libc::SIGUSR2 {
                    upgrade(has_handover);
                    continue;
                }
                if sig == libc::SIGHUP {
                    reload_config(&reload, &set_log_level, &config_store, &lifecycle);
                    reload_keys(&reload_cfg, &reload_store, "SIGHUP");
                    continue;
                }
                // The first starts a drain; another ends its grace period.
                info!(
                    signal = sig,
                    phase = lifecycle.phase().as_str(),
                    "signal received"
                );
                lifecycle.request(Request::Drain);
            })?;
    }

    let hub = Arc::new(crate::shard::handoff::Hub::new(
        wake_fds.clone(),
        &cfg.handover,
    ));
    watch_keys(cfg.clone(), keys.clone())?;
    crate::revocations::watch_file(revocations.clone())?;
    crate::reload::watch_tls_files(config_store.clone())?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let per_ip = crate::session::PerIp::for_config(&cfg).map(Arc::new);
    let mut handles = Vec::with_capacity(n);
    for (((id, sock), ctl), inbox) in sockets.into_iter().enumerate().zip(shard_ctl).zip(inboxes) {
        let spec = ShardSpec {
            id,
            listener: sock.into_raw_fd(),
            cfg: cfg.clone(),
            keys: keys.clone(),
            control_fd: std::os::fd::IntoRawFd::into_raw_fd(ctl),
            local_placement: local_placement.clone(),
            stats: stats[id].clone(),
            lifecycle: lifecycle.clone(),
            config: config_store.clone(),
            wake_fd: wake_fds[id],
            per_ip: per_ip.clone(),
            revocations: revocations.clone(),
            registry: inbox,
            handoff: hub.clone(),
        };
        let core = if cfg.listen.pin && !cores.is_empty() {
            Some(cores[id % cores.len()])
        } else {
            None
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                match Shard::new(spec) {
                    Ok(shard) => {
                        let _ = tx.send(Ok(()));
                        shard.run()
                    }
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        Err(e)
                    }
                }
            })?;
        rx.recv()
            .map_err(|_| io::Error::other("shard thread died during start"))?
            .map_err(|e| io::Error::new(e.kind(), format!("shard {id}: io_uring setup: {e}")))?;
        handles.push(h);
    }
    on_ready(Bound {
        listen,
        admin: admin_addr,
        shards: n,
    });
    lifecycle.keep_spares(spares);
    let handover_path = cfg.handover_socket();
    let mut handover_thread = None;
    match origin {
        Origin::TakenOver(r) => {
            // Ready and serving: now the old process may stop accepting.
            match r.confirm() {
                Ok((pid, conn)) => {
                    info!(old_pid = pid, "the old process drains; this one serves");
                    // Its live sessions come next, on the same connection.
                    let hub = hub.clone();
                    std::thread::Builder::new()
                        .name("eval-adopt".into())
                        .spawn(move || crate::shard::handoff::adopt_from(conn, &hub))?;
                }
                Err(e) => warn!(err = %e, "the old process did not confirm the handover"),
            }
            if let Some(p) = handover_path.clone() {
                handover_thread =
                    handover::serve_after_takeover(p, hello(&cfg), lifecycle.clone(), hub.clone());
            }
        }
        Origin::Bound | Origin::Systemd => {
            if let Some(p) = handover_path.clone() {
                handover_thread = handover::serve(p, hello(&cfg), lifecycle.clone(), hub.clone());
            }
        }
    }
    // After a takeover this process becomes the unit's main one
    // (`NotifyAccess=all` in tuning/eval-proxy.service).
    systemd::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    let mut result = Ok(());
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(shard = id, err = %e, "shard failed");
                result = Err(e);
            }
            Err(_) => {
                error!(shard = id, "shard panicked");
                result = Err(io::Error::other("shard panicked"));
            }
        }
    }
    // Shards closed their control sockets on exit; the control thread ends.
    let _ = control_thread.join();
    if lifecycle.handed_over() {
        // It ends the session handover (every shard is done with it) and
        // says so to the new process and in the log.
        if let Some(h) = handover_thread {
            let _ = h.join();
        }
    }
    if lifecycle.phase() < DrainPhase::Draining {
        // Every shard stopped without a drain (they failed): nothing is
        // left to drain either.
        warn!("shards stopped without a drain");
    }
    lifecycle.all_stopped();
    if let (Some(p), false) = (&handover_path, lifecycle.handed_over()) {
        // Ours, unless a new process took over (then it is the new one's).
        let _ = std::fs::remove_file(p);
    }
    for (id, s) in stats.iter().enumerate() {
        info!(
            shard = id,
            accepted = s.accepted.load(Ordering::Relaxed),
            established = s.established.load(Ordering::Relaxed),
            "shard totals"
        );
    }
    result
}
