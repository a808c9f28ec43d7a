//! The binary's own interface: --dev quickstart, config errors, --help,
//! token keygen/mint, drain on SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tungstenite::Message;

/// `eval-proxy --dev` on port 0, and the ws:// URL it prints.
fn start_dev() -> (Proxy, String) {
    let dir = tempdir::Dir::new("dev");
    // Drain steps short enough for a test; the rest is --dev's defaults.
    let cfg = dir.path().join("eval.toml");
    std::fs::write(
        &cfg,
        "[drain]\nreadiness_delay_s = 0.2\nclose_spread_s = 0.2\n",
    )
    .unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["--dev", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let proxy = Proxy::spawn(cmd, dir);
    let line = proxy
        .banner
        .iter()
        .find(|l| l.contains("ws://"))
        .expect("a ws:// URL line");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .unwrap()
        .to_string();
    assert!(
        url.starts_with(&format!("ws://{}/wsv2/v4.public.", proxy.listen)),
        "{url}"
    );
    (proxy, url)
}

#[test]
fn dev_mode_prints_a_working_url() {
    let (_proxy, url) = start_dev();
    let mut ws = connect(&url);
    ws.send(Message::text("hello dev")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello dev"));
    ws.send(Message::text("__vm__")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("dev-vm"));
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run eval-proxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempdir::Dir::new("cfg");
    let p = dir.path().join("bad.toml");
    for (text, key) in [
        ("[limits]\nmax_hed = 1\n", "max_hed"),
        ("[buffers]\ncount = 1000\n[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n", "buffers.count"),
        ("[token]\nallow_dev_key = true\n[placement]\ndefault = \"http://x/\"\n", "placement.default"),
        ("[token]\nallow_dev_key = true\n", "placement.default"),
        ("[placement]\ndefault = \"ws://127.0.0.1:1/\"\n", "token.keys_dir"),
        ("[limits]\nheader_timeout_ms = \"soon\"\n", "header_timeout_ms"),
        ("[listen]\ntrusted_proxies = [\"10.0.0.0/33\"]\n", "trusted_proxies"),
        ("[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[listen]\ndefer_accept_s = 4000\n", "listen.defer_accept_s"),
        ("[token]\ncluster = \"\"\n", "token.cluster"),
        (
            "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[listen]\nproxy_protocol = true\n",
            "listen.proxy_protocol",
        ),
        (
            "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[limits]\nper_ip_handshake_rate = 5\n",
            "limits.per_ip_handshake_burst",
        ),
        (
            "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[websocket]\nallowed_origins = [\"https://a.example/\"]\n",
            "websocket.allowed_origins[0]",
        ),
        // A keys directory that is not there: the key, not only the path.
        (
            "[token]\nkeys_dir = \"/nonexistent\"\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n",
            "token.keys_dir`: /nonexistent",
        ),
        (
            "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[keepalive]\ninterval_s = 30\ntimeout_s = 10\n",
            "keepalive.timeout_s",
        ),
        // A congestion control the kernel lacks: named, with what it offers.
        (
            "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[conman]\ntcp_congestion = \"nosuchcc\"\n",
            "conman.tcp_congestion",
        ),
        (
            "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[listen]\ntcp_congestion = \"a b\"\n",
            "listen.tcp_congestion",
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let (code, _, err) = run(&["--config", p.to_str().unwrap(), "--check"]);
        assert_eq!(code, 2, "{text}: {err}");
        assert!(err.contains(key), "error must name {key}: {err}");
    }
    let (code, _, err) = run(&["--config", "/nonexistent/eval.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/eval.toml"), "{err}");
    let (code, _, _) = run(&["--no-such-flag"]);
    assert_eq!(code, 2);
}

#[test]
fn bad_token_flags_exit_2() {
    for bad in [
        ["--ttl", "5x"],
        ["--ttl", "h"],
        ["--nbf", "zz"],
        ["--ttl", "99999999999d"],
    ] {
        let (code, out, err) = run(&["token", "mint", "--dev", "--repl", "r", bad[0], bad[1]]);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(out.is_empty(), "{bad:?} minted {out}");
        assert!(err.contains(bad[0]), "the error names the flag: {err}");
    }
    let (code, out, err) = run(&["token", "mint", "--dev", "--repl", "r", "--ttl", "-1h"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("v4.public."));
}

#[test]
fn tuning_apply_has_help_and_refuses_bad_arguments() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/apply.sh");
    let sh = |args: &[&str]| {
        let out = Command::new("bash")
            .arg(script)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = sh(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("Usage: tuning/apply.sh"), "{out}");
    assert!(out.contains("tuning/eval-proxy.conf"), "{out}");
    assert_eq!(sh(&[]).0, 2);
    assert_eq!(sh(&["--bogus"]).0, 2);
    assert_eq!(sh(&["/nonexistent.conf"]).0, 2);
    // A dry run reads the profile and writes nothing.
    let profile = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/eval-proxy.conf");
    let (code, out) = sh(&["--dry-run", profile]);
    assert_eq!(code, 0);
    assert!(out.contains("net.core.somaxconn"), "{out}");
}

#[test]
fn help_documents_the_common_flags() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--listen",
        "--conman",
        "--shards",
        "--admin",
        "--dev",
        "--takeover",
        "SIGUSR2",
        "LISTEN_FDS",
        "token",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn keygen_mint_and_verify_with_a_real_key() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("keys");
    let keys = dir.path().join("keys");
    let (code, _, err) = run(&[
        "token",
        "keygen",
        "--out",
        keys.to_str().unwrap(),
        "--kid",
        "k7",
    ]);
    assert_eq!(code, 0, "{err}");
    let secret = keys.join("k7.secret");
    // Keep only the public half where the proxy looks.
    let pubdir = dir.path().join("pub");
    std::fs::create_dir_all(&pubdir).unwrap();
    std::fs::copy(keys.join("k7.pub"), pubdir.join("k7.pub")).unwrap();
    let (code, token, err) = run(&[
        "token",
        "mint",
        "--key",
        secret.to_str().unwrap(),
        "--repl",
        "r9",
        "--user",
        "bob",
    ]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim();
    assert!(token.starts_with("v4.public."));
    let cfg = format!(
        "[token]\nkeys_dir = \"{}\"\n[placement]\ndefault = \"ws://{}/\"\n",
        pubdir.display(),
        conman.local_addr
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let mut ws = connect(&proxy.url(token));
    ws.send(Message::text("__headers__")).unwrap();
    let text = ws.read().unwrap().into_text().unwrap().to_string();
    assert!(text.contains("\"x-user\":\"bob\""), "{text}");
    // The dev key is not trusted here.
    let mut c = raw_client(proxy.listen, &dev_token("r9"));
    assert_eq!(
        read_close(&mut c),
        (1008, "stage=token;reason=unknown_kid".into())
    );
}

#[test]
fn sigterm_drains_then_exits() {
    let conman = echo_conman();
    let mut proxy = Proxy::start(
        &config_for(
            conman.local_addr,
            "[drain]\ngrace_s = 1\nreadiness_delay_s = 0.2\nclose_spread_s = 0.2\n",
        ),
        &["--shards", "1"],
    );
    let mut ws = connect(&proxy.url(&dev_token("r1")));
    ws.send(Message::text("before")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("before"));
    proxy.signal(libc::SIGTERM);
    // Not ready any more, but the live session still relays.
    wait_until("readyz never turned 503", WAIT, || {
        proxy.admin_get("/readyz").0 == 503
    });
    ws.send(Message::text("during drain")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("during drain"));
    // After the grace period: Close 1012, then exit 0.
    assert_drain_close(ws_close(ws));
    let st = proxy.wait_exit();
    assert_eq!(st.code(), Some(0));
}

/// Close 1012 `stage=drain;reason=restart;retry_after_ms=N`.
fn assert_drain_close((code, reason): (u16, String)) {
    assert_eq!(code, 1012, "{reason}");
    let hint = reason
        .strip_prefix("stage=drain;reason=restart;retry_after_ms=")
        .unwrap_or_else(|| panic!("reason {reason:?}"));
    assert!(hint.parse::<u64>().is_ok(), "{reason}");
}

/// Names of the process's threads that do not block `signals`: each of
/// them could be handed a process-directed signal and die of it.
fn threads_not_blocking(pid: u32, signals: &[i32]) -> Vec<String> {
    let mut open = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let blocked = u64::from_str_radix(&field("SigBlk:"), 16).expect("SigBlk mask");
        let name = field("Name:");
        // The signal thread unblocks them only inside sigwait(), by design.
        if name != "signals" && signals.iter().any(|&s| blocked & (1 << (s - 1)) == 0) {
            open.push(name);
        }
    }
    open
}

/// The --dev quickstart runs threads of its own (the embedded fake Conman)
/// besides the proxy's; none may take a signal meant for the signal thread.
/// SIGHUP reloads keys and nothing else; the first drain signal (SIGTERM or
/// SIGINT) drains, a live session relaying on; the other one ends the grace
/// period: Close 1012, then exit 0, never death by a signal.
fn dev_mode_drains_on(first: i32, second: i32) {
    let (mut proxy, url) = start_dev();
    let mut ws = connect(&url);
    ws.send(Message::text("before")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("before"));
    let pid = proxy.child.id();
    let open = threads_not_blocking(pid, &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    assert!(open.is_empty(), "threads not blocking signals: {open:?}");

    proxy.signal(libc::SIGHUP);
    wait_until("no key reload on SIGHUP", WAIT, || {
        proxy.metric("eval_token_key_reloads_total", &[]) >= 1.0
    });
    assert_eq!(proxy.admin_get("/readyz").0, 200, "SIGHUP must not drain");
    ws.send(Message::text("after hup")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("after hup"));

    proxy.signal(first);
    wait_until("readyz never turned 503", WAIT, || {
        proxy.admin_get("/readyz").0 == 503
    });
    ws.send(Message::text("during drain")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("during drain"));

    proxy.signal(second);
    assert_drain_close(ws_close(ws));
    let st = proxy.wait_exit();
    assert_eq!(st.code(), Some(0), "{st}");
}

#[test]
fn dev_mode_drains_on_sigterm() {
    dev_mode_drains_on(libc::SIGTERM, libc::SIGINT);
}

#[test]
fn dev_mode_drains_on_sigint() {
    dev_mode_drains_on(libc::SIGINT, libc::SIGTERM);
}

/// Keys rotate without a restart: a token signed by a new key is refused,
/// then accepted once its public key is in keys_dir and the proxy reloads
/// (on SIGHUP here; a change in the directory also triggers it).
#[test]
fn keys_reload_on_sighup_and_on_change() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("rotate");
    let secrets = dir.path().join("secrets");
    let pubdir = dir.path().join("pub");
    std::fs::create_dir_all(&pubdir).unwrap();
    for kid in ["k1", "k2"] {
        let (code, _, err) = run(&[
            "token",
            "keygen",
            "--out",
            secrets.to_str().unwrap(),
            "--kid",
            kid,
        ]);
        assert_eq!(code, 0, "{err}");
    }
    std::fs::copy(secrets.join("k1.pub"), pubdir.join("k1.pub")).unwrap();
    let cfg = format!(
        "[token]\nkeys_dir = \"{}\"\n[placement]\ndefault = \"ws://{}/\"\n",
        pubdir.display(),
        conman.local_addr
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let mint = |kid: &str| {
        let key = secrets.join(format!("{kid}.secret"));
        let (code, t, err) = run(&[
            "token",
            "mint",
            "--key",
            key.to_str().unwrap(),
            "--repl",
            "r1",
        ]);
        assert_eq!(code, 0, "{err}");
        t.trim().to_string()
    };
    let reloads = |p: &Proxy| p.metric("eval_token_key_reloads_total", &[]);
    let wait_reloads = |p: &Proxy, n: f64| {
        wait_until("no key reload", WAIT, || reloads(p) >= n);
    };
    let mut c = raw_client(proxy.listen, &mint("k2"));
    assert_eq!(
        read_close(&mut c),
        (1008, "stage=token;reason=unknown_kid".into())
    );
    // Written under another name first so the watcher never sees half a key.
    std::fs::copy(secrets.join("k2.pub"), pubdir.join("k2.tmp")).unwrap();
    std::fs::rename(pubdir.join("k2.tmp"), pubdir.join("k2.pub")).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_reloads(&proxy, 1.0);
    let mut ws = connect(&proxy.url(&mint("k2")));
    ws.send(Message::text("rotated")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("rotated"));
    // No signal: the directory watcher notices k1's removal (one change,
    // so one reload sees all of it).
    let before = reloads(&proxy);
    std::fs::remove_file(pubdir.join("k1.pub")).unwrap();
    wait_reloads(&proxy, before + 1.0);
    let mut c = raw_client(proxy.listen, &mint("k1"));
    assert_eq!(
        read_close(&mut c),
        (1008, "stage=token;reason=unknown_kid".into())
    );
    let mut ws = connect(&proxy.url(&mint("k2")));
    ws.send(Message::text("k2 still")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("k2 still"));
}

/// What `ss -tino` says of the established socket whose local port is
/// `local` (0: any) and remote port `remote` (0: any): its line (with
/// `-o`'s timer) and its info line, joined.
fn ss_info(local: u16, remote: u16) -> Option<String> {
    let out = Command::new("ss")
        .args(["-tinoH", "state", "established"])
        .output();
    let out = String::from_utf8(out.expect("ss (iproute2) runs").stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    lines.windows(2).find_map(|w| {
        let f: Vec<&str> = w[0].split_whitespace().collect();
        let (l, r) = (port(f.get(2)?)?, port(f.get(3)?)?);
        ((local == 0 || l == local) && (remote == 0 || r == remote)).then(|| w.join(" "))
    })
}

#[test]
fn congestion_control_is_set_on_both_sockets() {
    // reno: built into every kernel, and any process may use it.
    let conman = echo_conman();
    let cfg = config_for(
        conman.local_addr,
        "[listen]\ntcp_congestion = \"reno\"\n[conman]\ntcp_congestion = \"reno\"\n",
    );
    let proxy = Proxy::start(&cfg, &[]);
    let mut ws = connect(&proxy.url(&dev_token("cc")));
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hi"));
    // The client's socket to the proxy: its accepted end is the proxy's.
    let client = ws.get_ref();
    let tungstenite::stream::MaybeTlsStream::Plain(s) = client else {
        panic!("plain")
    };
    let client_port = s.local_addr().unwrap().port();
    let accepted = ss_info(proxy.listen.port(), client_port).expect("the proxy's client socket");
    assert!(accepted.contains(" reno "), "client side: {accepted}");
    let to_conman = ss_info(0, conman.local_addr.port()).expect("the proxy's socket to Conman");
    assert!(to_conman.contains(" reno "), "Conman side: {to_conman}");
}

#[test]
fn conman_tcp_keepalive_is_set_at_the_first_liveness_look() {
    // Keepalive options are five setsockopt(2) calls a Conman socket pays
    // for only once its session outlives the first liveness look
    // (`keepalive.interval_s`, here 5 s, sooner than TCP_KEEPIDLE's 60 s).
    let conman = echo_conman();
    let cfg = config_for(
        conman.local_addr,
        "[keepalive]\ninterval_s = 5\ntimeout_s = 60\n",
    );
    let proxy = Proxy::start(&cfg, &[]);
    let mut ws = connect(&proxy.url(&dev_token("ka")));
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hi"));
    let port = conman.local_addr.port();
    let before = ss_info(0, port).expect("the proxy's socket to Conman");
    assert!(
        !before.contains("keepalive"),
        "set before the first look: {before}"
    );
    // No signal tells when a socket option is set: look until it is.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = ss_info(0, port).expect("the session lives on");
        if now.contains("timer:(keepalive,") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no TCP keepalive after the first look: {now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deferred accepts: a connection that has said nothing is not handed to
/// a shard (the kernel holds it until its first bytes), so the shard is
/// woken once per connection, with its request.
#[test]
fn a_silent_connection_is_accepted_only_once_it_speaks() {
    let conman = echo_conman();
    // Long enough that the kernel cannot give up waiting within the test.
    let proxy = Proxy::start(
        &config_for(conman.local_addr, "[listen]\ndefer_accept_s = 60\n"),
        &["--shards", "1"],
    );
    let accepted = || proxy.metric(eval_proxy::metrics::names::CONNECTIONS_ACCEPTED, &[]);
    let mut silent = std::net::TcpStream::connect(proxy.listen).expect("connect");
    // A whole session after it, on the same shard: had the silent
    // connection been accepted at its connect, it would be counted by now.
    let mut ws = connect(&proxy.url(&dev_token("r1")));
    ws.send(Message::text("hi")).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::text("hi"));
    assert_eq!(
        accepted(),
        1.0,
        "a connection that sent nothing was accepted"
    );
    use std::io::Write;
    silent
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(read_head(&mut silent).split(' ').nth(1), Some("200"));
    assert_eq!(accepted(), 2.0);
}
