//! How the real binary reads request targets and the WebSocket version:
//! absolute-form targets (RFC 9112 §3.2.2), a missing Sec-WebSocket-Version
//! (400, not 426), and percent-encoded tokens. With `reject_with = "http"` a
//! token the proxy could not use is a plain 401, so a 101 here means the
//! token arrived intact.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use support::*;

fn head(target: &str, host: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A proxy in front of an echoing Conman that refuses bad tokens with 401.
fn start() -> (Proxy, eval_proxy::dev::conman::ConmanHandle) {
    let conman = echo_conman();
    let cfg = format!(
        "[token]\nallow_dev_key = true\nreject_with = \"http\"\n\n[placement]\ndefault = \"ws://{}/conman\"\n",
        conman.local_addr
    );
    (Proxy::start(&cfg, &["--shards", "1"]), conman)
}

/// Sends `req`; returns the response head, and the socket when it was a 101.
fn exchange(proxy: SocketAddr, req: &str) -> (String, Option<TcpStream>) {
    let mut s = TcpStream::connect(proxy).expect("connect proxy");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(req.as_bytes()).expect("write request");
    let head = read_head(&mut s);
    let upgraded = head.starts_with("HTTP/1.1 101 ");
    (head, upgraded.then_some(s))
}

fn status(head: &str) -> u16 {
    status_of(head.as_bytes())
}

/// The upgraded socket relays: a masked text frame comes back from Conman.
fn assert_echoes(mut s: TcpStream, what: &str) {
    s.write_all(&frame(true, 1, b"hello", Some([1, 2, 3, 4])))
        .unwrap();
    let (fin, opcode, payload) = read_frame(&mut s);
    assert_eq!(
        (fin, opcode, payload.as_slice()),
        (true, 1, &b"hello"[..]),
        "{what}"
    );
}

/// Percent-encodes every byte of `s`.
fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[test]
fn absolute_form_targets_are_accepted() {
    let (proxy, _conman) = start();
    let t = dev_token("r1");
    let port = proxy.listen.port();
    let cases = [
        (
            format!("http://eval.test/wsv2/{t}"),
            "eval.test".to_string(),
        ),
        (format!("ws://eval.test/wsv2/{t}"), "eval.test".to_string()),
        (
            format!("HTTP://Eval.Test:80/wsv2/{t}"),
            "eval.test".to_string(),
        ),
        (
            format!("http://127.0.0.1:{port}/wsv2?token={t}"),
            format!("127.0.0.1:{port}"),
        ),
    ];
    for (target, host) in &cases {
        let (head, upgraded) = exchange(proxy.listen, &head(target, host, ""));
        assert_eq!(status(&head), 101, "{target}: {head}");
        assert_echoes(upgraded.expect("upgraded"), target);
    }
    let (head, _) = exchange(
        proxy.listen,
        "GET http://eval.test/healthz HTTP/1.1\r\nHost: eval.test\r\n\r\n",
    );
    assert_eq!(status(&head), 200, "{head}");
}

#[test]
fn absolute_form_targets_that_cannot_be_ours_are_400() {
    let (proxy, _conman) = start();
    let t = dev_token("r1");
    let cases = [
        (
            "Host disagrees",
            format!("http://other.test/wsv2/{t}"),
            "eval.test",
        ),
        (
            "port disagrees",
            format!("http://eval.test:8080/wsv2/{t}"),
            "eval.test",
        ),
        ("https", format!("https://eval.test/wsv2/{t}"), "eval.test"),
        ("wss", format!("wss://eval.test/wsv2/{t}"), "eval.test"),
        ("ftp", format!("ftp://eval.test/wsv2/{t}"), "eval.test"),
        (
            "userinfo",
            format!("http://u@eval.test/wsv2/{t}"),
            "eval.test",
        ),
        ("no authority", format!("http:///wsv2/{t}"), "eval.test"),
    ];
    for (name, target, host) in &cases {
        let (head, _) = exchange(proxy.listen, &head(target, host, ""));
        assert_eq!(status(&head), 400, "{name}: {head}");
    }
    assert!(
        proxy.metric(
            "eval_session_setup_failures_total",
            &["stage=\"request\"", "reason=\"host_mismatch\""]
        ) >= 2.0,
        "{}",
        proxy.metrics()
    );
}

#[test]
fn missing_websocket_version_is_400_and_a_wrong_one_426() {
    let (proxy, _conman) = start();
    let t = dev_token("r1");
    let good = head(&format!("/wsv2/{t}"), "eval.test", "");
    let (missing, _) = exchange(
        proxy.listen,
        &good.replace("Sec-WebSocket-Version: 13\r\n", ""),
    );
    assert_eq!(status(&missing), 400, "{missing}");
    let (wrong, _) = exchange(proxy.listen, &good.replace("Version: 13", "Version: 8"));
    assert_eq!(status(&wrong), 426, "{wrong}");
    assert!(
        wrong.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{wrong}"
    );
}

#[test]
fn percent_encoded_tokens_are_decoded() {
    let (proxy, _conman) = start();
    let t = dev_token("r1");
    let dots = t.replace('.', "%2E");
    let cases = [
        ("path, dots encoded", format!("/wsv2/{dots}")),
        (
            "path, every byte encoded",
            format!("/wsv2/{}", encode_all(&t)),
        ),
        (
            "query, dots encoded",
            format!("/wsv2?x=1&token={}", t.replace('.', "%2e")),
        ),
        (
            "query, every byte encoded",
            format!("/wsv2?token={}", encode_all(&t)),
        ),
        ("absolute-form", format!("http://eval.test/wsv2/{dots}")),
    ];
    for (name, target) in &cases {
        let (head, upgraded) = exchange(proxy.listen, &head(target, "eval.test", ""));
        assert_eq!(status(&head), 101, "{name}: {head}");
        assert_echoes(upgraded.expect("upgraded"), name);
    }
}

#[test]
fn malformed_percent_escapes_in_the_token_are_400() {
    let (proxy, _conman) = start();
    let t = dev_token("r1");
    let cases = [
        ("path, not hex", format!("/wsv2/{t}%zz")),
        ("path, truncated", format!("/wsv2/{t}%2")),
        ("path, lone percent", format!("/wsv2/%{t}")),
        ("path, not UTF-8", format!("/wsv2/{t}%FF")),
        ("query, not hex", format!("/wsv2?token={t}%g0")),
        ("query, truncated", format!("/wsv2?token={t}%")),
    ];
    for (name, target) in &cases {
        let (head, _) = exchange(proxy.listen, &head(target, "eval.test", ""));
        assert_eq!(status(&head), 400, "{name}: {head}");
    }
    // The proxy is still serving.
    let (head, upgraded) = exchange(proxy.listen, &head(&format!("/wsv2/{t}"), "eval.test", ""));
    assert_eq!(status(&head), 101, "{head}");
    assert_echoes(upgraded.expect("upgraded"), "after the refusals");
}
