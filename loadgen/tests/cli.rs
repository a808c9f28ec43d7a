//! The real binary against the real backends, started as processes and
//! awaited through their `listening ADDR` / `holding N` lines, never sleeps.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::thread;

use serde_json::Value;
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_eval-loadgen");

/// A child process killed when the test ends, pass or fail.
struct Proc {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start eval-loadgen");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, stdout }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read stdout");
        line.trim_end().to_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Starts a backend subcommand on a free port; returns it and its ws:// URL.
fn backend(args: &[&str]) -> (Proc, String) {
    let mut proc = Proc::start(args);
    let line = proc.line();
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("expected `listening ADDR`, got {line:?}"));
    let url = format!("ws://{addr}/");
    (proc, url)
}

fn echo_server() -> (Proc, String) {
    backend(&["echo-server", "--listen", "127.0.0.1:0"])
}

fn load(args: &[&str]) -> (Output, Value) {
    let output = Command::new(BIN)
        .args(args)
        .arg("--json")
        .stderr(Stdio::piped())
        .output()
        .expect("run eval-loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "expected one JSON object ({e}); stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, json)
}

fn assert_clean(output: &Output, json: &Value) {
    assert!(
        output.status.success(),
        "exit {:?}: {json}; stderr {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(json["errors"], serde_json::json!({}), "{json}");
}

#[test]
fn echo_against_the_echo_server() {
    let (_server, url) = echo_server();
    let (output, json) = load(&[
        "echo",
        "--url",
        &url,
        "--conns",
        "8",
        "--size",
        "64",
        "--pipeline",
        "4",
        "--messages",
        "4000",
    ]);
    assert_clean(&output, &json);
    assert_eq!(json["mode"], "echo");
    assert_eq!(json["messages"], 4000);
    assert_eq!(json["bytes"], 4000 * 64);
    assert_eq!(json["established"], 8);
    assert!(json["msgs_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{json}");
}

#[test]
fn two_threads_and_odd_sizes() {
    let (_server, url) = backend(&["echo-server", "--listen", "127.0.0.1:0", "--threads", "2"]);
    for size in ["1", "7", "126", "70000"] {
        let (output, json) = load(&[
            "echo",
            "--url",
            &url,
            "--conns",
            "3",
            "--threads",
            "2",
            "--size",
            size,
            "--pipeline",
            "3",
            "--messages",
            "60",
        ]);
        assert_clean(&output, &json);
        assert_eq!(json["messages"], 60, "size {size}");
    }
}

/// Echoes Binary messages, but flips one bit in the third.
fn corrupting_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(tcp) else {
                    return;
                };
                let mut seen = 0;
                while let Ok(message) = ws.read() {
                    let Message::Binary(mut data) = message else {
                        continue;
                    };
                    seen += 1;
                    if seen == 3 {
                        let mid = data.len() / 2;
                        data[mid] ^= 0x01;
                    }
                    if ws.send(Message::Binary(data)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("ws://{addr}/")
}

/// Echoes each Binary message in two fragments with a Ping between them, as
/// a relay that re-frames and injects keepalives would.
fn fragmenting_server() -> String {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(tcp) else {
                    return;
                };
                while let Ok(message) = ws.read() {
                    let Message::Binary(data) = message else {
                        continue;
                    };
                    let (head, tail) = data.split_at(data.len() / 2);
                    let frames = [
                        Frame::message(head.to_vec(), OpCode::Data(Data::Binary), false),
                        Frame::ping(b"keepalive".to_vec()),
                        Frame::message(tail.to_vec(), OpCode::Data(Data::Continue), true),
                    ];
                    for frame in frames {
                        if ws.write(Message::Frame(frame)).is_err() {
                            return;
                        }
                    }
                    if ws.flush().is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("ws://{addr}/")
}

#[test]
fn fragmented_echoes_with_pings_in_between_verify() {
    let url = fragmenting_server();
    let (output, json) = load(&[
        "echo",
        "--url",
        &url,
        "--conns",
        "2",
        "--pipeline",
        "2",
        "--messages",
        "100",
    ]);
    assert_clean(&output, &json);
    assert_eq!(json["messages"], 100);
}

#[test]
fn a_corrupted_echo_fails_the_run() {
    let url = corrupting_server();
    let (output, json) = load(&["echo", "--url", &url, "--conns", "1", "--messages", "10"]);
    assert!(!output.status.success(), "{json}");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(json["errors"]["mismatch"], 1, "{json}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("message 2 differs from what was sent at byte 32"),
        "{stderr}"
    );
}

#[test]
fn a_connection_dropped_without_close_fails_the_run() {
    let (_conman, url) = backend(&["conman", "--listen", "127.0.0.1:0", "--die-after", "640"]);
    let (output, json) = load(&["echo", "--url", &url, "--conns", "2", "--messages", "100"]);
    assert_eq!(output.status.code(), Some(1), "{json}");
    assert_eq!(json["errors"]["eof_without_close"], 2, "{json}");
}

#[test]
fn a_refused_upgrade_is_counted_by_status() {
    let (_conman, url) = backend(&[
        "conman",
        "--listen",
        "127.0.0.1:0",
        "--reject-status",
        "503",
    ]);
    let (output, json) = load(&["echo", "--url", &url, "--conns", "3", "--messages", "3"]);
    assert_eq!(output.status.code(), Some(1), "{json}");
    assert_eq!(json["errors"]["http_503"], 3, "{json}");
}

#[test]
fn echo_through_the_fake_conman_with_minted_tokens() {
    let (_conman, url) = backend(&["conman", "--listen", "127.0.0.1:0"]);
    let url = format!("{url}wsv2/");
    let (output, json) = load(&[
        "echo",
        "--url",
        &url,
        "--token-per-conn",
        "--dev-key",
        "--conns",
        "4",
        "--messages",
        "200",
    ]);
    assert_clean(&output, &json);
    assert_eq!(json["messages"], 200);
}

#[test]
fn idle_prints_holding_and_holds_until_killed() {
    let (_server, url) = echo_server();
    let mut idle = Proc::start(&["idle", "--url", &url, "--conns", "300", "--threads", "2"]);
    assert_eq!(idle.line(), "holding 300");
}

#[test]
fn idle_with_hold_reports_and_exits() {
    let (_server, url) = echo_server();
    let output = Command::new(BIN)
        .args([
            "idle", "--url", &url, "--conns", "20", "--hold", "100ms", "--json",
        ])
        .output()
        .expect("run");
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("holding 20"));
    let json: Value = serde_json::from_str(lines.next().expect("report")).expect("json");
    assert_eq!(json["established"], 20);
    assert_eq!(json["messages"], 20);
}

#[test]
fn rate_reports_percentiles() {
    let (_server, url) = echo_server();
    let (output, json) = load(&[
        "rate",
        "--url",
        &url,
        "--conns",
        "10",
        "--rate",
        "2000",
        "--duration",
        "1s",
    ]);
    assert_clean(&output, &json);
    // Messages are due at k/R for k = 0..R·duration: exactly 2000.
    assert_eq!(json["messages"], 2000);
    let latency = &json["latency_us"];
    let p = |q: &str| latency[q].as_f64().unwrap_or(f64::NAN);
    assert!(p("p50") > 0.0, "{json}");
    assert!(p("p50") <= p("p90") && p("p90") <= p("p99"), "{json}");
    assert!(p("p99") <= p("p999") && p("p999") <= p("max"), "{json}");
}

#[test]
fn handshake_storm_cycles() {
    let (_server, url) = echo_server();
    let (output, json) = load(&[
        "handshake",
        "--url",
        &url,
        "--workers",
        "4",
        "--duration",
        "300ms",
    ]);
    assert_clean(&output, &json);
    let handshakes = json["handshakes"].as_u64().unwrap_or(0);
    assert!(handshakes > 4, "{json}");
    assert_eq!(json["messages"].as_u64(), Some(handshakes));
    assert!(json["handshakes_per_s"].as_f64().unwrap_or(0.0) > 0.0);
}

#[test]
fn bulk_moves_mebibytes() {
    let (_server, url) = echo_server();
    let (output, json) = load(&["bulk", "--url", &url, "--size", "1MiB", "--messages", "5"]);
    assert_clean(&output, &json);
    assert_eq!(json["bytes"], 5 << 20);
    assert!(json["mib_per_s"].as_f64().unwrap_or(0.0) > 0.0);
}

#[test]
fn mixed_keystrokes_and_bursts() {
    let (_server, url) = echo_server();
    let (output, json) = load(&[
        "mixed",
        "--url",
        &url,
        "--conns",
        "20",
        "--duration",
        "500ms",
        "--key-rate",
        "100",
        "--burst-every",
        "5",
    ]);
    assert_clean(&output, &json);
    assert!(json["messages"].as_u64().unwrap_or(0) > 100, "{json}");
}

#[test]
fn token_flags_without_token_per_conn_are_a_usage_error() {
    let output = Command::new(BIN)
        .args(["echo", "--url", "ws://127.0.0.1:9/", "--dev-key"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn controlplane_serves_the_placement_contract() {
    use std::io::{Read, Write};
    let (_cp, url) = backend(&[
        "controlplane",
        "--listen",
        "127.0.0.1:0",
        "--conman",
        "vm-1=ws://127.0.0.1:1/",
        "--conman",
        "vm-2=ws://127.0.0.1:2/",
        "--pin",
        "keep-=vm-2",
        "--ttl-ms",
        "5000",
    ]);
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_string();
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let ok = get("/v1/placement?repl=r1");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("\"vm\":\"vm-1\"") && ok.contains("\"ttl_ms\":5000"),
        "{ok}"
    );
    assert!(get("/v1/placement?repl=unknown-1").starts_with("HTTP/1.1 404"));
    // With r1 on vm-1 and keep-a on vm-2, least loaded would send keep-b
    // to vm-1; the pin holds it on vm-2, and refuses rather than leave vm-2.
    for repl in ["keep-a", "keep-b"] {
        let pinned = get(&format!("/v1/placement?repl={repl}"));
        assert!(pinned.contains("\"vm\":\"vm-2\""), "{pinned}");
    }
    assert!(get("/v1/placement?repl=keep-a&exclude=vm-2").starts_with("HTTP/1.1 503"));
}

#[test]
fn controlplane_pin_to_an_unknown_vm_is_a_usage_error() {
    let output = Command::new(BIN)
        .args(["controlplane", "--listen", "127.0.0.1:0"])
        .args(["--conman", "vm-1=ws://127.0.0.1:1/", "--pin", "a-=vm-9"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

/// Runs `storm` with `args` (plus `--json`); returns its exit status, its
/// stdout lines before the report, and the report.
fn storm(args: &[&str]) -> (std::process::ExitStatus, Vec<String>, Value) {
    let output = Command::new(BIN)
        .arg("storm")
        .args(args)
        .arg("--json")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines: Vec<String> = stdout.lines().map(str::to_owned).collect();
    let report = lines.pop().unwrap_or_default();
    let json = serde_json::from_str(&report).unwrap_or_else(|e| {
        panic!(
            "expected a JSON report last ({e}); stdout {stdout:?}, stderr {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status, lines, json)
}

#[test]
fn storm_reconnects_what_a_killed_backend_held_to_its_twin() {
    // Two echo servers share one port (SO_REUSEPORT): when one dies, the
    // kernel sends every reconnect to the other.
    let (_a, url) = echo_server();
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let (b, _) = backend(&["echo-server", "--listen", addr]);
    let pid = b.child.id().to_string();
    let (status, lines, json) = storm(&[
        "--url",
        &url,
        "--sessions",
        "100",
        "--kill-pid",
        &pid,
        "--settle",
        "300ms",
        "--observe",
        "300ms",
        "--echo-every",
        "100ms",
    ]);
    assert!(status.success(), "{json}");
    assert_eq!(lines, ["holding 100".to_owned(), format!("killed {pid}")]);
    let s = &json["storm"];
    let lost = s["lost"].as_u64().unwrap_or(0);
    assert!(lost > 0 && lost < 100, "both servers held sessions: {s}");
    // A killed process's sockets close without a WebSocket Close (a FIN,
    // a reset, or EPIPE for an echo written after the reset came in).
    let kinds = s["lost_by"].as_object().expect("lost_by");
    assert!(
        kinds
            .keys()
            .all(|k| ["eof_without_close", "reset", "io"].contains(&k.as_str())),
        "{s}"
    );
    assert_eq!(s["recovered"], lost, "{s}");
    assert_eq!(s["failed_sessions"], 0, "{s}");
    assert_eq!(s["started_by"], "kill", "{s}");
    assert!(s["all_relaying_ms"].as_f64().is_some(), "{s}");
    assert_eq!(json["established"], 100 + lost, "{json}");
    assert!(
        json["messages"].as_u64().unwrap_or(0) >= 100 + lost,
        "periodic echoes and one per (re)connect: {json}"
    );
}

#[test]
fn a_storm_that_loses_nothing_fails() {
    let (_server, url) = echo_server();
    let (status, lines, json) = storm(&[
        "--url",
        &url,
        "--sessions",
        "4",
        "--settle",
        "100ms",
        "--storm-timeout",
        "300ms",
    ]);
    assert_eq!(status.code(), Some(1), "{json}");
    assert_eq!(lines, ["holding 4"]);
    assert_eq!(json["errors"], serde_json::json!({"no_session_lost": 1}));
    assert_eq!(json["storm"]["started_by"], "nothing");
}
