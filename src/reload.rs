//! The config in force, replaceable at run time (SIGHUP) without dropping a
//! session: shards check one relaxed atomic per loop turn and pick up the
//! new config (and the static placement built from it) when the epoch
//! moved, the way they pick up new token keys (`keys.rs`). New sessions
//! use it; live ones keep relaying (the limits they read from then on are
//! the new ones).
//!
//! What a reload cannot change is refused with the key that differs, and
//! the old config stays: the sockets (`listen.addr`, `listen.shards`,
//! `listen.backlog`, `listen.pin`, `listen.tcp_congestion`, `admin.*`,
//! `lifecycle.*`, `handover.*`),
//! the file of revocations (`token.revoked_file`), the shards' buffer rings
//! (`buffers.*`), the per-address table (`limits.per_ip_*`),
//! and placement while the control shard serves it (Controlplane mode, or
//! admission limits on): those need a restart, i.e. a `--takeover`.
//!
//! Certificate files also reload on their own ([`watch_tls_files`]): when
//! a file named by `[[tls.certs]]`, `tls.client_ca` or `[conman.tls]`
//! changes, the TLS configs are built again from the files into a copy of
//! the config in force, as a SIGHUP would, and nothing else changes. New
//! handshakes use them; live sessions keep theirs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::{Config, ConfigError};
use crate::control::LocalStatic;

/// A config and the static placement built from it.
#[derive(Clone)]
pub struct Loaded {
    pub cfg: Arc<Config>,
    pub local_placement: Option<Arc<LocalStatic>>,
}

impl Loaded {
    pub fn new(cfg: Config) -> Result<Loaded, ConfigError> {
        let local_placement = LocalStatic::for_config(&cfg.control_config()?)
            .map_err(|e| ConfigError::Invalid {
                key: "placement".into(),
                message: e.to_string(),
            })?
            .map(Arc::new);
        Ok(Loaded {
            cfg: Arc::new(cfg),
            local_placement,
        })
    }
}

pub struct ConfigStore {
    epoch: AtomicU64,
    failures: AtomicU64,
    current: Mutex<Loaded>,
}

impl ConfigStore {
    pub fn new(loaded: Loaded) -> ConfigStore {
        ConfigStore {
            epoch: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            current: Mutex::new(loaded),
        }
    }

    /// Successful reloads since start (`eval_config_reloads_total`).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Refused reloads (`eval_config_reload_failures_total`).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn current(&self) -> Loaded {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A reload that did not get as far as [`ConfigStore::replace`] (the
    /// file did not read or parse).
    pub fn note_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Puts `new` in force if it may replace the current config; else the
    /// error names the key at fault and nothing changes.
    pub fn replace(&self, new: Config) -> Result<Arc<Config>, ConfigError> {
        let r = (|| {
            new.validate()?;
            let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
            fixed_keys_unchanged(&cur.cfg, &new)?;
            let loaded = Loaded::new(new)?;
            *cur = loaded.clone();
            Ok(loaded.cfg)
        })();
        match &r {
            Ok(_) => self.epoch.fetch_add(1, Ordering::Release),
            Err(_) => self.failures.fetch_add(1, Ordering::Relaxed),
        };
        r
    }
}

impl ConfigStore {
    /// Builds the TLS configs of the config in force again from their
    /// files and puts the result in force (counted as a reload). A SIGHUP
    /// reload that lands meanwhile read the files itself: this one then
    /// changes nothing. On error nothing changes (the caller counts it).
    pub fn reload_tls(&self) -> Result<(), String> {
        let base = self.current();
        let mut new = (*base.cfg).clone();
        new.load_tls().map_err(|e| e.to_string())?;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&cur.cfg, &base.cfg) {
            return Ok(());
        }
        // Only TLS changed: the static placement stays as built.
        cur.cfg = Arc::new(new);
        drop(cur);
        self.epoch.fetch_add(1, Ordering::Release);
        Ok(())
    }
}

/// Every file the TLS configs are built from.
pub fn tls_files(cfg: &Config) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = cfg
        .tls
        .certs
        .iter()
        .flat_map(|c| [c.cert.clone(), c.key.clone()])
        .collect();
    let ct = &cfg.conman.tls;
    v.extend(
        [&cfg.tls.client_ca, &ct.ca_file, &ct.cert, &ct.key]
            .into_iter()
            .flatten()
            .cloned(),
    );
    v
}

/// What a file looks like from outside: changed when its mtime, size or
/// inode (a symlink swapped to a new file) moves; `None` if it cannot be
/// stat'ed. stat(2) takes no descriptor, so running out of them does not
/// look like a change.
type Stamp = Option<(Option<SystemTime>, u64, u64)>;

fn stamps(files: &[PathBuf]) -> Vec<(PathBuf, Stamp)> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|p| {
            let st = std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len(), m.ino()));
            (p.clone(), st)
        })
        .collect()
}

/// How often the certificate files are looked at.
pub const TLS_POLL: Duration = Duration::from_secs(1);

/// Watches the TLS files of the config in force (polling their stat: cheap,
/// and works on every filesystem, symlinked secret mounts included) and
/// reloads the TLS configs when they changed and then held still for one
/// poll (so a certificate and key written one after the other load as a
/// pair). A file that does not load is logged with why, counted in
/// `eval_config_reload_failures_total`, and the old certificates stay;
/// a failure while the process is out of descriptors is no verdict on the
/// files, so it is neither logged nor counted, and tried again.
pub fn watch_tls_files(store: Arc<ConfigStore>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tls-watch".into())
        .spawn(move || {
            let mut loaded = stamps(&tls_files(&store.current().cfg));
            let mut seen = loaded.clone();
            loop {
                std::thread::sleep(TLS_POLL);
                let files = tls_files(&store.current().cfg);
                let now = stamps(&files);
                let settled = now == seen;
                seen = now.clone();
                // A SIGHUP reload may have named other files: those are
                // what was loaded.
                if loaded.iter().map(|(p, _)| p).ne(files.iter()) {
                    loaded = now;
                    continue;
                }
                if now == loaded || !settled {
                    continue;
                }
                match store.reload_tls() {
                    Ok(()) => {
                        tracing::info!(
                            reloads = store.epoch(),
                            "certificate files changed: reloaded; new handshakes use them"
                        );
                        loaded = now;
                    }
                    Err(_) if out_of_fds(&files) => {}
                    Err(err) => {
                        store.note_failure();
                        tracing::error!(%err, "certificate files changed but do not load; the old certificates stay in force");
                        loaded = now;
                    }
                }
            }
        })?;
    Ok(())
}

/// The process cannot open a file right now for want of descriptors.
fn out_of_fds(files: &[PathBuf]) -> bool {
    files.iter().any(|p| {
        std::fs::File::open(p)
            .err()
            .and_then(|e| e.raw_os_error())
            .is_some_and(|e| e == libc::EMFILE || e == libc::ENFILE)
    })
}

/// The keys a reload may not change (module doc), compared section by
/// section; the error names the first that differs.
pub fn fixed_keys_unchanged(old: &Config, new: &Config) -> Result<(), ConfigError> {
    fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }
    let refuse = |key: &str| {
        Err(ConfigError::Invalid {
            key: key.into(),
            message: "cannot change on a reload; restart with --takeover to change it".into(),
        })
    };
    let (o, n) = (&old.listen, &new.listen);
    for (key, ok) in [
        ("listen.addr", o.addr == n.addr),
        ("listen.shards", old.shard_count() == new.shard_count()),
        ("listen.backlog", o.backlog == n.backlog),
        ("listen.pin", o.pin == n.pin),
        // Set on the listener at start; accepted sockets inherit it.
        (
            "listen.tcp_congestion",
            o.tcp_congestion == n.tcp_congestion,
        ),
        ("admin", same(&old.admin, &new.admin)),
        ("buffers", same(&old.buffers, &new.buffers)),
        ("lifecycle", same(&old.lifecycle, &new.lifecycle)),
        // Read and written by the store made at start.
        (
            "token.revoked_file",
            old.token.revoked_file == new.token.revoked_file,
        ),
        ("handover", same(&old.handover, &new.handover)),
        // A listener speaks TLS or not for its whole life: clients connect
        // with wss:// or ws:// to it. New certificates are fine.
        (
            "tls.certs",
            old.tls.certs.is_empty() == new.tls.certs.is_empty(),
        ),
        (
            "limits.per_ip_sessions",
            old.limits.per_ip_sessions == new.limits.per_ip_sessions,
        ),
        (
            "limits.per_ip_handshake_rate",
            old.limits.per_ip_handshake_rate == new.limits.per_ip_handshake_rate
                && old.limits.per_ip_handshake_burst == new.limits.per_ip_handshake_burst,
        ),
    ] {
        if !ok {
            return refuse(key);
        }
    }
    // Placement answered by the control shard stays as it started.
    let shard_local = |c: &Config| {
        c.control_config()
            .ok()
            .and_then(|cc| LocalStatic::for_config(&cc).ok().flatten())
            .is_some()
    };
    if !(shard_local(old) && shard_local(new)) {
        for (key, ok) in [
            ("placement", same(&old.placement, &new.placement)),
            ("controlplane", same(&old.controlplane, &new.controlplane)),
            ("admission", same(&old.admission, &new.admission)),
        ] {
            if !ok {
                return refuse(key);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_default(url: &str) -> Config {
        let mut c = Config::default();
        c.token.allow_dev_key = true;
        c.placement.default = Some(url.into());
        c
    }

    #[test]
    fn a_static_placement_change_applies_and_counts() {
        let store = ConfigStore::new(Loaded::new(with_default("ws://127.0.0.1:1/")).unwrap());
        store.replace(with_default("ws://127.0.0.1:2/")).unwrap();
        assert_eq!(store.epoch(), 1);
        let cur = store.current();
        assert_eq!(
            cur.cfg.placement.default.as_deref(),
            Some("ws://127.0.0.1:2/")
        );
        assert!(cur.local_placement.is_some());
    }

    #[test]
    fn a_fixed_key_or_an_invalid_file_is_refused_and_the_old_config_stays() {
        let store = ConfigStore::new(Loaded::new(with_default("ws://127.0.0.1:1/")).unwrap());
        let mut moved = with_default("ws://127.0.0.1:1/");
        moved.listen.addr = "127.0.0.1:9".parse().unwrap();
        let e = store.replace(moved).unwrap_err();
        assert!(e.to_string().contains("listen.addr"), "{e}");
        let mut cc = with_default("ws://127.0.0.1:1/");
        cc.listen.tcp_congestion = Some("reno".into());
        let e = store.replace(cc).unwrap_err();
        assert!(e.to_string().contains("listen.tcp_congestion"), "{e}");
        let mut bad = with_default("ws://127.0.0.1:1/");
        bad.drain.close_spread_s = -1.0;
        let e = store.replace(bad).unwrap_err();
        assert!(e.to_string().contains("drain.close_spread_s"), "{e}");
        assert_eq!((store.epoch(), store.failures()), (0, 3));
        assert_eq!(
            store.current().cfg.placement.default.as_deref(),
            Some("ws://127.0.0.1:1/")
        );
    }

    /// Certificate files loaded again in place: a good pair is put in
    /// force (a reload), a bad one leaves the config as it was, and the
    /// files watched are exactly the configured ones.
    #[test]
    fn tls_files_reload_in_place_and_a_bad_pair_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("eval-reload-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        let (c1, k1) = pair("one.test");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let mut cfg = with_default("ws://127.0.0.1:1/");
        cfg.tls.certs = vec![crate::config::TlsCert {
            cert: cert.clone(),
            key: key.clone(),
            names: vec![],
        }];
        cfg.load_tls().unwrap();
        assert_eq!(tls_files(&cfg), vec![cert.clone(), key.clone()]);
        let store = ConfigStore::new(Loaded::new(cfg).unwrap());
        let before = store.current();

        let (c2, k2) = pair("two.test");
        std::fs::write(&cert, &c2).unwrap();
        std::fs::write(&key, &k2).unwrap();
        store.reload_tls().unwrap();
        assert_eq!(store.epoch(), 1);
        let after = store.current();
        assert!(!Arc::ptr_eq(
            before.cfg.tls.server.as_ref().unwrap(),
            after.cfg.tls.server.as_ref().unwrap()
        ));

        std::fs::write(&key, &k1).unwrap();
        let e = store.reload_tls().unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        assert_eq!(store.epoch(), 1);
        assert!(Arc::ptr_eq(&store.current().cfg, &after.cfg));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn placement_served_by_the_control_shard_cannot_change_on_a_reload() {
        let mut a = with_default("ws://127.0.0.1:1/");
        a.admission.per_repl_rate = 1.0;
        a.admission.per_repl_burst = 1.0;
        let mut b = a.clone();
        b.placement.default = Some("ws://127.0.0.1:2/".into());
        let e = fixed_keys_unchanged(&a, &b).unwrap_err();
        assert!(e.to_string().contains("placement"), "{e}");
    }
}
