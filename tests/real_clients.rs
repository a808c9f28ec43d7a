//! Real WebSocket clients through the real proxy: Python `websockets`, Node
//! `ws`, headless Chromium, and the Autobahn|Testsuite compared case by case
//! with the committed result of the same echo server reached directly. Their
//! tooling is installed by `.ci/install-deps.sh`; a missing tool fails the
//! test with that hint.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run_script(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{what}: cannot run ({e}); run `bash .ci/install-deps.sh` first")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {}\n(if a tool is missing: bash .ci/install-deps.sh)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(root().join("tests/clients").join(script));
    c
}

fn node(script: &str) -> Command {
    let mut c = Command::new("node");
    c.arg(root().join("tests/clients").join(script));
    c
}

#[test]
fn python_websockets_client() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    run_script(
        python("py_client.py").arg(proxy.url(&dev_token("r1"))),
        "py_client",
    );
    // Close codes the proxy originates are accepted by the library, 1014 too.
    let out = run_script(
        python("py_client.py").args(["--expect-close", "1008", &proxy.url("v4.public.bad")]),
        "py_client --expect-close 1008",
    );
    assert!(out.contains("stage=token;reason=malformed"), "{out}");
    let dead = refusing_addr();
    let proxy2 = Proxy::start(&config_for(dead.addr, ""), &["--shards", "1"]);
    let out = run_script(
        python("py_client.py").args(["--expect-close", "1014", &proxy2.url(&dev_token("r1"))]),
        "py_client --expect-close 1014",
    );
    assert!(out.contains("stage=conman_connect;reason=refused"), "{out}");
}

#[test]
fn node_ws_client() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    run_script(
        node("node_client.js").arg(proxy.url(&dev_token("r1"))),
        "node_client",
    );
    let dead = refusing_addr();
    let proxy2 = Proxy::start(&config_for(dead.addr, ""), &["--shards", "1"]);
    let out = run_script(
        node("node_client.js").args(["--expect-close", "1014", &proxy2.url(&dev_token("r1"))]),
        "node_client --expect-close 1014",
    );
    assert!(out.contains("stage=conman_connect;reason=refused"), "{out}");
}

#[test]
fn headless_chromium() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    run_script(
        python("chromium_check.py").arg(proxy.url(&dev_token("r1"))),
        "chromium_check",
    );
    assert!(proxy.metric("eval_sessions_established_total", &[]) >= 1.0);
}

/// The conformant echo server of the Autobahn comparison, as a process
/// (it also exits when this test process goes away and its stdin closes).
struct EchoServer {
    _process: Listening,
    port: u16,
}

impl EchoServer {
    /// `args`: more of echo_server.py's flags.
    fn start(args: &[&str]) -> EchoServer {
        let process = Listening::start(
            Command::new("python3")
                .arg(root().join("tests/autobahn/echo_server.py"))
                .arg("--exit-on-stdin-eof")
                .args(args)
                .stdin(Stdio::piped()),
        );
        let port = process
            .at
            .parse()
            .unwrap_or_else(|_| panic!("echo server said {:?}", process.at));
        EchoServer {
            _process: process,
            port,
        }
    }
}

/// Runs Autobahn `cases` through a proxy in `mode` in front of the echo
/// server started with `echo_args`, and compares each case with the
/// committed direct run of that mode (`tests/autobahn/expected/`, made by
/// `tests/autobahn/full.sh --regenerate`, which also runs every case).
fn autobahn_matches_expected(mode: &str, echo_args: &[&str], cases: &str) {
    autobahn_through(mode, echo_args, cases, false);
}

/// The same, with `tls`: wss:// on both sides of the proxy (Autobahn to
/// the proxy, the proxy to the echo server), one throwaway certificate.
fn autobahn_through(mode: &str, echo_args: &[&str], cases: &str, tls: bool) {
    // Cases such as 6.4.x pace their frames in time and judge what came
    // back meanwhile: runs side by side on two shared cores turned OKs
    // into FAILED, so one run at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempdir::Dir::new("autobahn");
    let certs = tls.then(|| eval_proxy::dev::tls::generate(&dir.path().join("tls")).unwrap());
    let mut echo_args = echo_args.to_vec();
    let (mut scheme, mut extra) = ("ws", String::new());
    if let Some(c) = &certs {
        echo_args.extend([
            "--tls",
            c.cert.cert.to_str().unwrap(),
            c.cert.key.to_str().unwrap(),
        ]);
        scheme = "wss";
        extra = format!(
            "[conman.tls]\nca_file = {:?}\n[[tls.certs]]\ncert = {:?}\nkey = {:?}\n",
            c.ca, c.cert.cert, c.cert.key
        );
    }
    let echo = EchoServer::start(&echo_args);
    let proxy = Proxy::start(
        &format!(
            "[token]\nallow_dev_key = true\n[websocket]\nmode = \"{mode}\"\n[placement]\ndefault = \"{scheme}://127.0.0.1:{}/\"\n{extra}",
            echo.port
        ),
        &["--shards", "1"],
    );
    let report = dir.path().join("report");
    let url = format!("{scheme}://{}/wsv2/{}", proxy.listen, dev_token("autobahn"));
    run_script(
        Command::new("bash")
            .arg(root().join("tests/autobahn/run.sh"))
            .args([&url, report.to_str().unwrap(), cases]),
        "autobahn run.sh",
    );
    let out = run_script(
        Command::new("python3")
            .arg(root().join("tests/autobahn/compare.py"))
            .arg("--non-strict-is-ok")
            .arg(root().join(format!("tests/autobahn/expected/{mode}.json")))
            .arg(report.join("index.json")),
        "autobahn compare",
    );
    eprintln!("{mode}: {}", out.lines().last().unwrap_or(""));
    if tls {
        // Every session's Conman side went through a TLS handshake.
        let handshakes = proxy.metric(
            "eval_setup_duration_seconds_count",
            &["stage=\"conman_tls\""],
        );
        assert_eq!(
            handshakes,
            proxy.metric("eval_sessions_established_total", &[])
        );
        assert!(handshakes > 100.0, "{handshakes}");
    }
}

/// Autobahn's quick set (sections 1-7 and 10) through the proxy in its
/// default mode: every case ends as it does directly.
#[test]
fn autobahn_quick_client_first_matches_expected() {
    autobahn_matches_expected("client_first", &[], "quick");
}

/// The quick set over wss:// on both sides: the client's TLS terminated
/// by the shard and the proxy's own TLS to Conman (the echo server), each
/// a rustls transport driven sans-IO; every case still ends as it does
/// directly.
#[test]
fn autobahn_quick_over_wss_matches_expected() {
    autobahn_through("client_first", &[], "quick", true);
}

/// The quick set in upstream-first mode in front of an echo server with
/// permessage-deflate, plus the first case of each compression group (12.x:
/// message sizes and fragmentation, 13.x: the client's deflate parameters):
/// the extension is negotiated end to end, so those pass instead of being
/// UNIMPLEMENTED as in client-first mode.
#[test]
fn autobahn_quick_upstream_first_matches_expected() {
    autobahn_matches_expected(
        "upstream_first",
        &["--deflate"],
        "quick,12.1.1,12.2.1,12.3.1,12.4.1,12.5.1,13.1.1,13.2.1,13.3.1,13.4.1,13.5.1,13.6.1,13.7.1",
    );
}

/// Upstream-first mode: Conman is reached before the client's 101, so the
/// subprotocol and permessage-deflate are negotiated end to end (Python
/// `websockets` on both sides) and compressed frames (RSV1) relay.
#[test]
fn upstream_first_negotiates_deflate_end_to_end() {
    let echo = EchoServer::start(&["--deflate", "--subprotocol", "chat.v2"]);
    let proxy = Proxy::start(
        &format!(
            "[token]\nallow_dev_key = true\n[websocket]\nmode = \"upstream_first\"\n[placement]\ndefault = \"ws://127.0.0.1:{}/\"\n",
            echo.port
        ),
        &["--shards", "1"],
    );
    let out = run_script(
        python("py_deflate_check.py").args([&proxy.url(&dev_token("r1")), "chat.v2"]),
        "py_deflate_check",
    );
    assert!(out.contains("permessage-deflate"), "{out}");
}

/// Upstream-first failures come before the 101, as HTTP statuses.
#[test]
fn upstream_first_failure_is_an_http_status() {
    let dead = refusing_addr();
    let proxy = Proxy::start(
        &format!(
            "[token]\nallow_dev_key = true\n[websocket]\nmode = \"upstream_first\"\n[limits]\nmax_attempts = 2\n[placement]\ndefault = \"ws://{dead}/\"\n"
        ),
        &["--shards", "1"],
    );
    let req = format!(
        "GET /wsv2/{} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        dev_token("r1")
    );
    let resp = raw_exchange(proxy.listen, req.as_bytes());
    assert_eq!(status_of(&resp), 502, "{}", String::from_utf8_lossy(&resp));
    assert!(String::from_utf8_lossy(&resp).contains("stage=conman_connect;reason=refused"));
}
