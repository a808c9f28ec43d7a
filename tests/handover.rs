//! Zero-downtime upgrades (issue 9, item 2): a new process takes the
//! listening sockets over from the running one (`--takeover`, SCM_RIGHTS
//! over `lifecycle.handover_socket`) while a client loop connects, upgrades
//! and echoes as fast as it can: no connect fails, sessions opened on each
//! old process keep relaying, each old process exits 0. Also: an
//! incompatible takeover is refused (exit 2), a takeover with nobody to
//! take over from starts normally, and a second proxy on an address a
//! running one serves refuses to start instead of sharing the port.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tungstenite::Message;

/// Upgrades in a row, and how long the load runs on each process before
/// the next takes over: CI-sized, or `EVAL_HANDOVER_LOAD_MS` (the issue's
/// 20,000-connect run takes about 5000 here). The count is reported.
const UPGRADES: usize = 3;

fn load_per_process() -> Duration {
    let ms = std::env::var("EVAL_HANDOVER_LOAD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    Duration::from_millis(ms)
}
const CLIENTS: usize = 2;

/// The proxy with this config file and flags, its own stderr in `dir`.
fn start(cfg: &Path, args: &[&str]) -> Proxy {
    let dir = tempdir::Dir::new("handover");
    let err = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(cfg)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err);
    Proxy::spawn(cmd, dir)
}

fn config(dir: &Path, backend: SocketAddr, listen: &str) -> std::path::PathBuf {
    let path = dir.join(format!("eval-{}.toml", listen.replace([':', '.'], "_")));
    let text = config_for(
        backend,
        &format!(
            "[listen]\naddr = \"{listen}\"\nshards = 2\n\n[admin]\naddr = \"127.0.0.1:0\"\n\n\
             [lifecycle]\nhandover_socket = \"{}\"\n\n\
             [drain]\nreadiness_delay_s = 0.2\nclose_spread_s = 0.5\n\n[limits]\nlinger_ms = 500\n",
            dir.join("handover.sock").display()
        ),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Inodes of the sockets listening on `port` (from /proc/net/tcp): a
/// handover keeps them (the same sockets, the same accept queues); a new
/// process binding sockets of its own would change them.
fn listening_inodes(port: u16) -> std::collections::BTreeSet<String> {
    let port = format!("{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3] == "0A" && f[1].ends_with(&format!(":{port}"))).then(|| f[9].to_string())
        })
        .collect()
}

#[derive(Default)]
struct Load {
    tried: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

#[test]
fn three_upgrades_under_load_fail_no_connect() {
    let backend = Listening::echo_server();
    let dir = tempdir::Dir::new("upgrade");
    let cfg = config(dir.path(), backend.addr(), "127.0.0.1:0");
    let mut old = start(&cfg, &[]);
    let listen = old.listen;
    let token = dev_token("r1");

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, load, token) = (stop.clone(), load.clone(), token.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    load.tried.fetch_add(1, Ordering::Relaxed);
                    match try_echo(listen, &token, Duration::from_secs(5)) {
                        Attempt::Served => {}
                        other => {
                            load.failed.fetch_add(1, Ordering::Relaxed);
                            load.failures.lock().unwrap().push(format!("{other:?}"));
                        }
                    }
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut per_upgrade = Vec::new();
    let sockets = listening_inodes(listen.port());
    assert_eq!(sockets.len(), 2, "one socket per shard");
    for round in 0..UPGRADES {
        // A session on the old process, to relay on after the handover.
        let mut ws = connect(&format!("ws://{listen}/wsv2/{token}"));
        ws.send(Message::text("before")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("before"));
        std::thread::sleep(load_per_process());
        let before = load.tried.load(Ordering::Relaxed);
        let t = Instant::now();
        let new = start(&cfg, &["--takeover"]);
        assert_eq!(new.listen, listen, "round {round}: the same port");
        // The old process has stopped accepting but relays on.
        wait_until("the old process to say it drains", WAIT, || {
            old.log().contains("handed over")
        });
        ws.send(Message::text("after")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("after"));
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
        let st = old.wait_exit();
        assert_eq!(st.code(), Some(0), "round {round}: old process {st}");
        per_upgrade.push((t.elapsed(), load.tried.load(Ordering::Relaxed) - before));
        assert_eq!(
            listening_inodes(listen.port()),
            sockets,
            "round {round}: the new process serves the very sockets of the first"
        );
        old = new;
    }
    std::thread::sleep(load_per_process());
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let tried = load.tried.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    eprintln!(
        "handover under load: {tried} connects (upgrade + echo) tried, {failed} failed, \
         across {UPGRADES} upgrades in {:.1} s; per upgrade (takeover to old exit, connects meanwhile): {per_upgrade:?}",
        started.elapsed().as_secs_f64()
    );
    let failures = load.failures.lock().unwrap();
    assert_eq!(
        failed,
        0,
        "failed connects: {:?}",
        &failures[..failures.len().min(10)]
    );
    assert!(tried >= 100, "the load loop ran: {tried}");
    // The last process serves, and drains to exit 0 like any other.
    assert_eq!(try_echo(listen, &token, WAIT), Attempt::Served);
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait_exit().code(), Some(0));
}

#[test]
fn a_takeover_with_another_address_is_refused_and_the_old_proxy_serves_on() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("incompatible");
    let cfg = config(dir.path(), conman.local_addr, "127.0.0.1:0");
    let mut old = start(&cfg, &[]);
    let other = config(dir.path(), conman.local_addr, "127.0.0.2:0");
    let out = Command::new(bin())
        .arg("--config")
        .arg(&other)
        .arg("--takeover")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("takeover refused"), "{err}");
    assert!(err.contains("127.0.0.2:0"), "{err}");
    assert_eq!(
        try_echo(old.listen, &dev_token("r1"), WAIT),
        Attempt::Served
    );
    assert_eq!(old.admin_get("/readyz").0, 200);
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait_exit().code(), Some(0));
}

#[test]
fn a_takeover_with_nobody_to_take_over_from_starts_normally() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("alone");
    let cfg = config(dir.path(), conman.local_addr, "127.0.0.1:0");
    let mut p = start(&cfg, &["--takeover"]);
    assert_eq!(try_echo(p.listen, &dev_token("r1"), WAIT), Attempt::Served);
    assert!(p.log().contains("no running proxy answered"), "{}", p.log());
    // It serves the handover socket for the next upgrade, owner-only.
    let sock = dir.path().join("handover.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit().code(), Some(0));
}

#[test]
fn a_second_proxy_on_a_served_address_refuses_to_start() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("second");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(dir.path(), conman.local_addr, &format!("127.0.0.1:{port}"));
    let mut first = start(&cfg, &[]);
    let out = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("process {}", first.child.id())),
        "names the running pid: {err}"
    );
    assert!(err.contains("--takeover"), "names the takeover: {err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "never printed ready"
    );
    assert_eq!(
        try_echo(first.listen, &dev_token("r1"), WAIT),
        Attempt::Served
    );
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit().code(), Some(0));
}

/// systemd's `ExecReload=kill -USR2 $MAINPID`: the running proxy starts
/// the binary again with `--takeover`; the new one prints `ready` (on the
/// same stdout) and takes over, the old one exits 0.
#[test]
fn sigusr2_starts_the_new_binary_which_takes_over() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("usr2");
    let cfg = config(dir.path(), conman.local_addr, "127.0.0.1:0");
    let mut old = start(&cfg, &[]);
    let token = dev_token("r1");
    old.signal(libc::SIGUSR2);
    let line = old.next_line(WAIT).expect("the new process's ready line");
    assert!(
        line.starts_with(&format!("eval-proxy ready listen={} ", old.listen)),
        "{line}"
    );
    assert_eq!(old.wait_exit().code(), Some(0));
    assert_eq!(try_echo(old.listen, &token, WAIT), Attempt::Served);
    let new = eval_proxy::control::handover::who_listens(old.listen).expect("the new process");
    // SAFETY: signalling the process the test started (through the old one).
    unsafe { libc::kill(new as i32, libc::SIGTERM) };
    wait_until("the new process to exit", WAIT, || {
        !Path::new(&format!("/proc/{new}")).exists()
            || std::fs::read_to_string(format!("/proc/{new}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
}
