//! Hostile clients against the real binary (issue 11, "What to build" 4):
//! request heads shaped for smuggling or confusion, bytes pipelined behind
//! the upgrade, per-address caps on sessions and handshakes, the per-shard
//! session cap, the Origin allowlist, and the PROXY protocol, both from a
//! real HAProxy in front (v1 and v2) and from peers that may not send it.
//!
//! Distinct client addresses are loopback addresses (127.0.0.2, …): a
//! client socket is bound to one before it connects.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};

use socket2::{Domain, Socket, Type};
use support::*;
use tungstenite::Message;

/// A TCP connection to `to` from loopback address `from`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let local: SocketAddr = format!("{from}:0").parse().expect("address");
    s.bind(&local.into()).expect("bind client address");
    s.connect(&to.into()).expect("connect");
    let s = TcpStream::from(s);
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn upgrade_head(extra: &str) -> String {
    format!(
        "GET /wsv2/{} HTTP/1.1\r\nHost: eval.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        dev_token("r1")
    )
}

/// An upgrade from `from` (with `extra` header lines); the status and head
/// of the answer, and the socket when it was a 101.
fn upgrade(to: SocketAddr, from: &str, extra: &str) -> (u16, String, Option<TcpStream>) {
    let mut s = connect_from(from, to);
    s.write_all(upgrade_head(extra).as_bytes()).expect("write");
    let head = read_head(&mut s);
    let status = status_of(head.as_bytes());
    (status, head, (status == 101).then_some(s))
}

/// The socket relays: a text frame comes back from the echoing Conman.
fn assert_relays(s: &mut TcpStream) {
    s.write_all(&frame(true, 1, b"ping?", Some([9, 8, 7, 6])))
        .unwrap();
    assert_eq!(read_frame(s), (true, 1, b"ping?".to_vec()));
}

/// The sessions that hold every place still relay; one client leaves, and
/// an upgrade from `from` passes again once the proxy has let that session
/// go (when its sockets are closed, a moment after the client left).
fn leave_and_come_back(mut open: Vec<TcpStream>, to: SocketAddr, from: &str) {
    for s in &mut open {
        assert_relays(s);
    }
    drop(open.pop());
    let mut upgraded = None;
    wait_until("a place to come free", WAIT, || {
        upgraded = upgrade(to, from, "").2;
        upgraded.is_some()
    });
    assert_relays(upgraded.as_mut().unwrap());
}

/// A proxy (`--shards N`) in front of an echoing Conman, `extra` added to
/// its config.
fn start(extra: &str, shards: &str) -> (Proxy, eval_proxy::dev::conman::ConmanHandle) {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, extra), &["--shards", shards]);
    (proxy, conman)
}

fn retry_after(head: &str) -> u64 {
    head.lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .unwrap_or_else(|| panic!("no Retry-After in {head:?}"))
        .parse()
        .expect("seconds")
}

fn failures(proxy: &Proxy, stage: &str, reason: &str) -> f64 {
    proxy.metric(
        "eval_session_setup_failures_total",
        &[
            &format!("stage=\"{stage}\""),
            &format!("reason=\"{reason}\""),
        ],
    )
}

/// Everything the peer sends until it closes; a reset ends it too.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Each head is refused with 400 and its reason, and none of them leads to
/// a connection to Conman: what two parsers could read two ways is never
/// forwarded.
#[test]
fn smuggling_and_confusion_heads_are_400() {
    let (proxy, conman) = start("", "1");
    let t = dev_token("r1");
    let good = upgrade_head("");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "duplicate Content-Length",
            upgrade_head("Content-Length: 0\r\nContent-Length: 5\r\n") + "hello",
            "body_on_upgrade",
        ),
        (
            "Content-Length with a body",
            upgrade_head("Content-Length: 5\r\n") + "hello",
            "body_on_upgrade",
        ),
        (
            "Transfer-Encoding",
            upgrade_head("Transfer-Encoding: chunked\r\n") + "0\r\n\r\n",
            "body_on_upgrade",
        ),
        (
            "Content-Length and Transfer-Encoding",
            upgrade_head("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n") + "0\r\n\r\n",
            "body_on_upgrade",
        ),
        ("obs-fold", upgrade_head("X-A: b\r\n c\r\n"), "malformed"),
        ("NUL in a value", upgrade_head("X-A: b\0c\r\n"), "malformed"),
        (
            "duplicate Host",
            upgrade_head("Host: other.test\r\n"),
            "duplicate_host",
        ),
        (
            "duplicate Sec-WebSocket-Key",
            upgrade_head("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
            "duplicate_key",
        ),
        (
            "absolute-form target naming another host",
            good.replacen(
                &format!("/wsv2/{t}"),
                &format!("http://other.test/wsv2/{t}"),
                1,
            ),
            "host_mismatch",
        ),
        (
            "bare LF line endings",
            good.replace("\r\n", "\n"),
            "malformed",
        ),
        (
            "one bare LF among CRLFs",
            good.replacen("Host: eval.test\r\n", "Host: eval.test\n", 1),
            "malformed",
        ),
    ];
    for (name, req, reason) in &cases {
        let before = failures(&proxy, "request", reason);
        let resp = raw_exchange(proxy.listen, req.as_bytes());
        assert_eq!(
            status_of(&resp),
            400,
            "{name}: {:?}",
            String::from_utf8_lossy(&resp[..resp.len().min(200)])
        );
        assert_eq!(failures(&proxy, "request", reason), before + 1.0, "{name}");
    }
    assert_eq!(conman.connections(), 0, "a refused head reached Conman");
}

/// A second HTTP request pipelined behind the upgrade is taken as the
/// client's first WebSocket bytes (see `session/setup.rs`): it cannot be a
/// masked frame, so the client gets 1002, and Conman gets the proxy's own
/// upgrade and then a Close, never the pipelined request.
#[test]
fn a_pipelined_request_never_reaches_conman_as_http() {
    for mode in ["client_first", "upstream_first"] {
        let (addr, conman) = raw_conman(|mut s, head| {
            let after = read_until_closed(&mut s);
            (head, after)
        });
        let proxy = Proxy::start(
            &config_for(addr, &format!("[websocket]\nmode = \"{mode}\"\n")),
            &["--shards", "1"],
        );
        let pipelined = "GET /wsv2/other HTTP/1.1\r\nHost: eval.test\r\nX-Smuggled: 1\r\n\r\n";
        let mut s = TcpStream::connect(proxy.listen).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all((upgrade_head("") + pipelined).as_bytes())
            .unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101 "), "{mode}: {head}");
        let (code, reason) = read_close(&mut s);
        assert_eq!(code, 1002, "{mode}: {reason}");
        assert!(
            reason.starts_with("stage=relay;reason="),
            "{mode}: {reason}"
        );
        drop(s);

        let (conman_head, after) = conman.join().expect("fake conman");
        assert!(
            conman_head.starts_with("GET /conman HTTP/1.1\r\n"),
            "{mode}: {conman_head}"
        );
        assert!(!conman_head.contains("X-Smuggled"), "{mode}: {conman_head}");
        let text = String::from_utf8_lossy(&after);
        assert!(
            !text.contains("GET ") && !text.contains("X-Smuggled"),
            "{mode}: {text:?}"
        );
        // One masked Close frame, and nothing else.
        assert_eq!(after.first(), Some(&0x88), "{mode}: {after:?}");
        let len = usize::from(after[1] & 0x7f);
        assert_eq!(after[1] & 0x80, 0x80, "{mode}: unmasked");
        assert_eq!(after.len(), 2 + 4 + len, "{mode}: {after:?}");
        let payload: Vec<u8> = after[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ after[2 + i % 4])
            .collect();
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001, "{mode}");
    }
}

/// `limits.per_ip_sessions` holds across shards (SO_REUSEPORT spreads one
/// address's connections over both), counts only that address, and gives
/// its place back when a session ends.
#[test]
fn sessions_per_address_are_capped_across_shards() {
    let (proxy, _conman) = start("[limits]\nper_ip_sessions = 2\n", "2");
    let open: Vec<TcpStream> = (0..2)
        .map(|i| {
            let (status, head, s) = upgrade(proxy.listen, "127.0.0.1", "");
            assert_eq!(status, 101, "session {i}: {head}");
            s.unwrap()
        })
        .collect();
    // Each attempt lands on either shard; a count per shard would let
    // some through.
    for i in 0..8 {
        let (status, head, _) = upgrade(proxy.listen, "127.0.0.1", "");
        assert_eq!(status, 429, "attempt {i}: {head}");
        assert!((1..=5).contains(&retry_after(&head)), "{head}");
        assert!(
            head.ends_with("\r\n\r\n") && !head.contains("Upgrade: websocket"),
            "{head}"
        );
    }
    assert_eq!(failures(&proxy, "admission", "per_ip_sessions"), 8.0);
    let (status, head, other) = upgrade(proxy.listen, "127.0.0.2", "");
    assert_eq!(status, 101, "another address: {head}");
    assert_relays(&mut other.unwrap());
    leave_and_come_back(open, proxy.listen, "127.0.0.1");
}

/// `limits.per_ip_handshake_rate`: a burst, then 429 with the wait until
/// the next token, for that address only, whichever shard it reaches.
#[test]
fn handshakes_per_address_are_rate_limited() {
    let (proxy, _conman) = start(
        "[limits]\nper_ip_handshake_rate = 0.01\nper_ip_handshake_burst = 3\n",
        "2",
    );
    for i in 0..3 {
        let (status, head, s) = upgrade(proxy.listen, "127.0.0.1", "");
        assert_eq!(status, 101, "handshake {i}: {head}");
        assert_relays(&mut s.unwrap());
    }
    for i in 0..6 {
        let (status, head, _) = upgrade(proxy.listen, "127.0.0.1", "");
        assert_eq!(status, 429, "handshake {}: {head}", i + 3);
        // One token per 100 s.
        let after = retry_after(&head);
        assert!((50..=100).contains(&after), "{head}");
    }
    assert_eq!(failures(&proxy, "admission", "per_ip_rate"), 6.0);
    let (status, head, _) = upgrade(proxy.listen, "127.0.0.2", "");
    assert_eq!(status, 101, "another address: {head}");
    // The client's own doing: out of the success rate's denominator.
    assert_eq!(
        proxy.metric("eval_session_client_fault_rejections_total", &[]),
        6.0
    );
}

/// `limits.max_sessions_per_shard`: 503 with Retry-After past the cap,
/// counted against the success rate (the proxy's capacity, not the
/// client's fault); /healthz is no session; a place comes back when a
/// session ends.
#[test]
fn a_full_shard_answers_503() {
    let (proxy, _conman) = start("[limits]\nmax_sessions_per_shard = 2\n", "1");
    let open: Vec<TcpStream> = ["127.0.0.1", "127.0.0.2"]
        .iter()
        .map(|from| upgrade(proxy.listen, from, "").2.expect("101"))
        .collect();
    let mut s = connect_from("127.0.0.3", proxy.listen);
    s.write_all(upgrade_head("").as_bytes()).unwrap();
    let resp = read_until_closed(&mut s);
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(status_of(&resp), 503, "{text}");
    assert!((1..=5).contains(&retry_after(&text)), "{text}");
    assert!(
        text.ends_with("stage=admission;reason=shard_full\n"),
        "{text}"
    );
    assert_eq!(failures(&proxy, "admission", "shard_full"), 1.0);
    assert_eq!(
        proxy.metric("eval_session_client_fault_rejections_total", &[]),
        0.0
    );
    assert_eq!(http(proxy.listen, "GET", "/healthz").0, 200);
    leave_and_come_back(open, proxy.listen, "127.0.0.3");
}

/// `websocket.allowed_origins`: 403 for an Origin not listed; listed ones
/// (in any case) and requests without an Origin (not browsers) pass.
#[test]
fn origins_off_the_list_get_403() {
    let (proxy, conman) = start(
        "[websocket]\nallowed_origins = [\"https://replit.com\", \"http://localhost:3000\"]\n",
        "1",
    );
    for origin in [
        "https://evil.example",
        "https://replit.com.evil.example",
        "http://replit.com",
        "null",
    ] {
        let resp = raw_exchange(
            proxy.listen,
            upgrade_head(&format!("Origin: {origin}\r\n")).as_bytes(),
        );
        let text = String::from_utf8_lossy(&resp);
        assert_eq!(status_of(&resp), 403, "{origin}: {text}");
        assert!(
            text.ends_with("stage=request;reason=origin_not_allowed\n"),
            "{text}"
        );
    }
    assert_eq!(failures(&proxy, "request", "origin_not_allowed"), 4.0);
    assert_eq!(conman.connections(), 0);
    for extra in [
        "Origin: https://replit.com\r\n",
        "Origin: HTTPS://Replit.com\r\n",
        "Origin: http://localhost:3000\r\n",
        "",
    ] {
        let (status, head, s) = upgrade(proxy.listen, "127.0.0.1", extra);
        assert_eq!(status, 101, "{extra:?}: {head}");
        assert_relays(&mut s.unwrap());
    }
}

// ---- PROXY protocol ---------------------------------------------------------

/// The load balancer's address, the only one in `listen.trusted_proxies`.
const BALANCER: &str = "127.0.0.3";

/// Config lines for a listener behind [`BALANCER`], plus `extra`.
fn behind_balancer(extra: &str) -> String {
    format!("[listen]\nproxy_protocol = true\ntrusted_proxies = [\"{BALANCER}\"]\n\n{extra}")
}

/// X-Forwarded-For as the echoing Conman received it.
fn forwarded_for<S: Read + Write>(ws: &mut tungstenite::WebSocket<S>) -> String {
    ws.send(Message::text("__headers__")).unwrap();
    let text = ws.read().unwrap().into_text().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["headers"]["x-forwarded-for"]
        .as_str()
        .unwrap_or_else(|| panic!("no x-forwarded-for: {text}"))
        .to_owned()
}

/// A WebSocket client from loopback address `from` to `to`.
fn ws_from(from: &str, to: SocketAddr) -> tungstenite::WebSocket<TcpStream> {
    let url = format!("ws://{to}/wsv2/{}", dev_token("r1"));
    let (ws, resp) =
        tungstenite::client::client(url, connect_from(from, to)).expect("upgrade through HAProxy");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// A real HAProxy in TCP mode in front of the proxy, connecting to it from
/// [`BALANCER`] with `send-proxy` or `send-proxy-v2`. Its listening socket
/// is bound here on port 0 and handed over (`bind fd@N`), so there is no
/// port to guess and no start-up to wait for: connections queue on the
/// socket until HAProxy accepts them.
struct Haproxy {
    child: Child,
    listen: SocketAddr,
    dir: tempdir::Dir,
}

impl Haproxy {
    fn start(backend: SocketAddr, send_proxy: &str) -> Haproxy {
        let bin = [
            "/usr/sbin/haproxy",
            "/usr/local/sbin/haproxy",
            "/usr/bin/haproxy",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("haproxy is not installed: run .ci/install-deps.sh");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap();
        let fd = listener.as_raw_fd();
        let dir = tempdir::Dir::new("haproxy");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n    maxconn 256\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
                 frontend public\n    bind fd@{fd}\n    default_backend eval\n\n\
                 backend eval\n    server eval {backend} {send_proxy} source {BALANCER}\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: fcntl(2) is async-signal-safe and touches only the
        // child's copy of the descriptor table; the listener stays open in
        // the parent until `spawn` has returned.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start haproxy");
        drop(listener);
        Haproxy { child, listen, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through a real HAProxy with PROXY v1 or v2: Conman sees the client
/// behind the balancer in X-Forwarded-For, and the per-address cap counts
/// that client, not the balancer all clients share.
fn through_haproxy(send_proxy: &str) {
    let (proxy, _conman) = start(&behind_balancer("[limits]\nper_ip_sessions = 1\n"), "2");
    let lb = Haproxy::start(proxy.listen, send_proxy);
    let mut first = ws_from("127.0.0.2", lb.listen);
    assert_eq!(forwarded_for(&mut first), "127.0.0.2", "{}", lb.log());
    let mut second = ws_from("127.0.0.4", lb.listen);
    assert_eq!(forwarded_for(&mut second), "127.0.0.4");
    let (status, head, _) = upgrade(lb.listen, "127.0.0.2", "");
    assert_eq!(status, 429, "{send_proxy}: {head}");
    assert_eq!(failures(&proxy, "admission", "per_ip_sessions"), 1.0);
    assert_eq!(failures(&proxy, "request", "proxy_untrusted"), 0.0);
    first.send(Message::text("still here")).unwrap();
    assert_eq!(first.read().unwrap(), Message::text("still here"));
}

#[test]
fn haproxy_send_proxy_v1_shows_the_real_client() {
    through_haproxy("send-proxy");
}

#[test]
fn haproxy_send_proxy_v2_shows_the_real_client() {
    through_haproxy("send-proxy-v2");
}

/// A PROXY v2 header by hand: PROXY command, INET, STREAM, no TLVs.
fn v2_header(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    out.extend_from_slice(&src);
    out.extend_from_slice(&[127, 0, 0, 1]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&8080u16.to_be_bytes());
    out
}

/// Only a trusted peer's header is read; anything else on a PROXY
/// listener is closed without a byte in answer and counted, and none of it
/// is a session attempt.
#[test]
fn proxy_headers_are_taken_only_from_trusted_peers() {
    let (proxy, conman) = start(&behind_balancer(""), "1");
    let request = upgrade_head("");
    let v1 = format!("PROXY TCP4 6.6.6.6 127.0.0.1 4000 8080\r\n{request}");
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "untrusted peer, v1",
            "127.0.0.2",
            v1.clone().into_bytes(),
            "proxy_untrusted",
        ),
        (
            "untrusted peer, v2",
            "127.0.0.2",
            [v2_header([6, 6, 6, 6], 4000), request.clone().into_bytes()].concat(),
            "proxy_untrusted",
        ),
        (
            "no header",
            BALANCER,
            request.clone().into_bytes(),
            "proxy_header_missing",
        ),
        (
            "malformed v1",
            BALANCER,
            format!("PROXY TCP4 6.6.6.6 127.0.0.1 4000\r\n{request}").into_bytes(),
            "proxy_header_malformed",
        ),
        (
            "v2 of another version",
            BALANCER,
            [b"\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c".as_slice(), &[0; 12]].concat(),
            "proxy_header_malformed",
        ),
    ];
    for (name, from, bytes, reason) in &cases {
        let before = failures(&proxy, "request", reason);
        let mut s = connect_from(from, proxy.listen);
        // The proxy may close before it has everything: a refused peer is
        // not read at all.
        let _ = s.write_all(bytes);
        let answer = read_until_closed(&mut s);
        assert!(
            answer.is_empty(),
            "{name}: answered {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert_eq!(failures(&proxy, "request", reason), before + 1.0, "{name}");
    }
    assert_eq!(conman.connections(), 0);
    assert_eq!(proxy.metric("eval_session_attempts_total", &[]), 0.0);

    // From the balancer, a v2 header names the client; UNKNOWN names
    // none, so the balancer itself is the client.
    let cases: [(Vec<u8>, &str); 2] = [
        (v2_header([203, 0, 113, 9], 4000), "203.0.113.9"),
        (b"PROXY UNKNOWN\r\n".to_vec(), BALANCER),
    ];
    for (header, client) in cases {
        let mut s = connect_from(BALANCER, proxy.listen);
        s.write_all(&[header, request.clone().into_bytes()].concat())
            .unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101 "), "{client}: {head}");
        let mut ws =
            tungstenite::WebSocket::from_raw_socket(s, tungstenite::protocol::Role::Client, None);
        assert_eq!(forwarded_for(&mut ws), client);
    }
}
