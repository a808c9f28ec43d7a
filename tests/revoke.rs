//! Revocation (issue 10, item 3), with real processes: `POST /revoke` by
//! jti, user and repl ends exactly the matching live sessions (Close 1008
//! `stage=token;reason=revoked` to the client, 1001 to Conman) while the
//! rest keep relaying; a revoked token is refused on reconnect, and still
//! after a restart (`token.revoked_file`); an expired revocation stops
//! refusing; a hand edit of the file is picked up; two proxies sharing one
//! fake Controlplane converge.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use eval_proxy::dev::controlplane::{self, FakeControlplane, FakeControlplaneConfig};
use eval_proxy::token::{self, Claims};
use support::*;
use tungstenite::Message;

const REVOKED: &str = "stage=token;reason=revoked";

fn token_for(jti: &str, user: &str, repl: &str) -> String {
    let c = Claims {
        jti: jti.into(),
        user: user.into(),
        ..claims(repl)
    };
    token::mint(&c, token::DEV_KID, &token::dev_signing_key())
}

fn config(conman: SocketAddr, revoked_file: Option<&Path>) -> String {
    let file = revoked_file.map_or(String::new(), |p| {
        format!("revoked_file = \"{}\"\n", p.display())
    });
    format!(
        "[token]\nallow_dev_key = true\n{file}\n[placement]\ndefault = \"ws://{conman}/conman\"\n"
    )
}

/// An admin request with a body; (status, body).
fn admin(proxy: &Proxy, method: &str, path: &str, body: &str) -> (u16, String) {
    http_body(proxy.admin.expect("admin"), method, path, body)
}

fn revoke(proxy: &Proxy, body: &str) {
    let (status, answer) = admin(proxy, "POST", "/revoke", body);
    assert_eq!(status, 200, "{answer}");
}

fn echo(ws: &mut Client, text: &str) {
    ws.send(Message::Text(text.into())).expect("send");
    loop {
        match ws.read().expect("echo") {
            Message::Text(t) => {
                assert_eq!(t.as_str(), text);
                return;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}

/// The next Close, which must be the revocation's.
fn assert_revoked(ws: Client) {
    assert_eq!(ws_close(ws), (1008, REVOKED.to_string()));
}

/// A handshake with a revoked token: 101, then Close 1008 with the reason.
fn assert_refused(proxy: &Proxy, token: &str) {
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /wsv2/{token} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_close(&mut s), (1008, REVOKED.to_string()));
}

/// Whether a fresh session with `token` relays (101 and an echo).
fn serves(proxy: &Proxy, token: &str) -> bool {
    try_echo(proxy.listen, token, WAIT) == Attempt::Served
}

#[test]
fn revoke_by_jti_user_and_repl_ends_exactly_the_matching_sessions() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config(conman.local_addr, None), &["--shards", "2"]);
    let mut a = connect(&proxy.url(&token_for("j-a", "alice", "r-a")));
    let mut b = connect(&proxy.url(&token_for("j-b", "bob", "r-b")));
    let mut b2 = connect(&proxy.url(&token_for("j-b2", "bob", "r-b2")));
    let mut c = connect(&proxy.url(&token_for("j-c", "carol", "r-c")));
    // Same user and repl as revoked ones' neighbours, other values.
    let mut d = connect(&proxy.url(&token_for("j-d", "dave", "r-d")));
    for ws in [&mut a, &mut b, &mut b2, &mut c, &mut d] {
        echo(ws, "before");
    }

    revoke(&proxy, r#"{"jti":"j-a","ttl_s":600}"#);
    assert_revoked(a);
    for ws in [&mut b, &mut b2, &mut c, &mut d] {
        echo(ws, "after jti");
    }

    let (status, _) = admin(&proxy, "POST", "/revoke?user=bob&ttl_s=600", "");
    assert_eq!(status, 200);
    assert_revoked(b);
    assert_revoked(b2);
    for ws in [&mut c, &mut d] {
        echo(ws, "after user");
    }

    let until = unix_now() + 600;
    revoke(&proxy, &format!(r#"{{"repl":"r-c","until":{until}}}"#));
    assert_revoked(c);
    echo(&mut d, "after repl");

    assert_eq!(proxy.metric("eval_sessions_revoked_total", &[]), 4.0);
    assert_eq!(proxy.metric("eval_revocations_in_force", &[]), 3.0);
    let (status, list) = admin(&proxy, "GET", "/revocations", "");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let list = list["revocations"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(list
        .iter()
        .any(|r| r["jti"] == "j-a" && r["until"].is_string()));
    assert!(list.iter().any(|r| r["user"] == "bob"));
    assert!(list.iter().any(|r| r["repl"] == "r-c"));

    // New sessions of every revoked kind are refused, the others served.
    assert_refused(&proxy, &token_for("j-a", "zed", "r-z"));
    assert_refused(&proxy, &token_for("j-new", "bob", "r-z"));
    assert_refused(&proxy, &token_for("j-new", "zed", "r-c"));
    assert!(serves(&proxy, &token_for("j-new", "zed", "r-z")));
    assert_eq!(
        proxy.metric(
            "eval_session_setup_failures_total",
            &["stage=\"token\"", "reason=\"revoked\""]
        ),
        3.0
    );
    echo(&mut d, "still here");
    close_by_client(d);
}

/// Client-initiated close, answered by the proxy (Conman's echo of it).
fn close_by_client(mut ws: Client) {
    ws.close(None).expect("send Close");
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => return,
            Err(e) => panic!("closing: {e}"),
        }
    }
}

#[test]
fn conman_hears_1001_and_the_reason() {
    let (addr, conman) = raw_conman(|mut s, _head| {
        let (_, _, p) = read_frame(&mut s);
        s.write_all(&frame(true, 1, &p, None)).unwrap();
        read_close(&mut s)
    });
    let proxy = Proxy::start(&config(addr, None), &[]);
    let mut ws = connect(&proxy.url(&token_for("j-1", "alice", "r-1")));
    // Relaying for sure (client-first: the 101 comes before Conman's).
    echo(&mut ws, "hi");
    revoke(&proxy, r#"{"jti":"j-1","ttl_s":60}"#);
    assert_revoked(ws);
    assert_eq!(conman.join().unwrap(), (1001, REVOKED.to_string()));
}

#[test]
fn junk_is_refused_with_400() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config(conman.local_addr, None), &[]);
    for (path, body) in [
        ("/revoke", "{not json"),
        ("/revoke", r#"{"ttl_s":60}"#),
        ("/revoke", r#"{"jti":"a","user":"b","ttl_s":60}"#),
        ("/revoke", r#"{"jti":"a"}"#),
        ("/revoke", r#"{"jti":"a","ttl_s":-5}"#),
        ("/revoke", r#"{"jti":"a","until":"yesterday"}"#),
        ("/revoke", r#"{"jti":"a","ttl_s":60,"extra":1}"#),
        ("/revoke?jti=a&ttl_s=x", ""),
        ("/revoke?jti=a&ttl_s=60", r#"{"jti":"a","ttl_s":60}"#),
    ] {
        let (status, answer) = admin(&proxy, "POST", path, body);
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert!(answer.contains("\"error\""), "{answer}");
    }
    assert_eq!(admin(&proxy, "GET", "/revoke", "").0, 405);
    assert_eq!(admin(&proxy, "POST", "/revocations", "").0, 405);
    assert_eq!(proxy.metric("eval_revocations_in_force", &[]), 0.0);
}

#[test]
fn a_revoked_token_is_refused_on_reconnect_and_after_a_restart() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("revoked");
    let file = dir.path().join("revoked.json");
    let cfg = config(conman.local_addr, Some(&file));
    let tok = token_for("leaked", "alice", "r-1");
    // One shard: the reconnect surely finds the token in its cache.
    let mut proxy = Proxy::start(&cfg, &["--shards", "1"]);
    // Verified once, so the shard's verification cache holds it.
    let ws = connect(&proxy.url(&tok));
    revoke(&proxy, r#"{"jti":"leaked","ttl_s":3600}"#);
    assert_revoked(ws);
    assert_refused(&proxy, &tok);
    let text = std::fs::read_to_string(&file).expect("revoked_file written");
    assert!(text.contains("\"jti\":\"leaked\""), "{text}");

    proxy.signal(libc::SIGKILL);
    proxy.wait_exit();
    let proxy = Proxy::start(&cfg, &[]);
    assert_refused(&proxy, &tok);
    assert_eq!(proxy.metric("eval_revocations_in_force", &[]), 1.0);
    assert!(serves(&proxy, &token_for("other", "alice", "r-1")));
}

#[test]
fn reject_with_http_says_401_revoked() {
    let conman = echo_conman();
    let cfg = format!(
        "[token]\nallow_dev_key = true\nreject_with = \"http\"\n[placement]\ndefault = \"ws://{}/\"\n",
        conman.local_addr
    );
    let proxy = Proxy::start(&cfg, &[]);
    revoke(&proxy, r#"{"user":"mallory","ttl_s":60}"#);
    let resp = raw_exchange(
        proxy.listen,
        format!(
            "GET /wsv2/{} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            token_for("j", "mallory", "r")
        )
        .as_bytes(),
    );
    assert_eq!(status_of(&resp), 401);
    assert!(String::from_utf8_lossy(&resp).contains("revoked"));
}

#[test]
fn an_expired_revocation_stops_refusing() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config(conman.local_addr, None), &[]);
    let tok = token_for("short", "alice", "r-1");
    assert!(serves(&proxy, &tok));
    // Three seconds: long enough for the refusal to be seen first even on
    // a loaded machine.
    revoke(&proxy, r#"{"jti":"short","ttl_s":3}"#);
    assert_refused(&proxy, &tok);
    // Served again once `until` has passed (by the wall clock, so polled).
    wait_until("the revocation expires", WAIT, || serves(&proxy, &tok));
    assert_eq!(proxy.metric("eval_revocations_in_force", &[]), 0.0);
}

#[test]
fn a_hand_edit_of_the_file_is_picked_up() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("revoked-edit");
    let file = dir.path().join("revoked.json");
    let proxy = Proxy::start_captured(&config(conman.local_addr, Some(&file)), &[]);
    let ws = connect(&proxy.url(&token_for("j-1", "eve", "r-1")));
    let mut other = connect(&proxy.url(&token_for("j-2", "frank", "r-2")));
    let until = unix_now() + 600;
    let edit = |text: &str| {
        // As an editor saves: a new file renamed over the old one.
        let tmp = dir.path().join("edit.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    edit(&format!(
        r#"{{"revocations":[{{"user":"eve","until":"{until}"}}]}}"#
    ));
    assert_revoked(ws);
    echo(&mut other, "untouched");
    assert_refused(&proxy, &token_for("j-3", "eve", "r-3"));

    // A broken edit keeps what is in force.
    edit("{ oops");
    edit_wait(&proxy);
    assert_refused(&proxy, &token_for("j-3", "eve", "r-3"));

    // Removing the entry un-revokes.
    edit(r#"{"revocations":[]}"#);
    wait_until("the removal is picked up", WAIT, || {
        serves(&proxy, &token_for("j-4", "eve", "r-4"))
    });
    echo(&mut other, "still untouched");
}

/// Waits until the watcher has had a look at the file (it polls every
/// second; the log says when a bad file was seen).
fn edit_wait(proxy: &Proxy) {
    wait_until("the broken file is reported", WAIT, || {
        proxy.log().contains("does not read")
    });
}

fn controlplane_for(conman: SocketAddr) -> FakeControlplane {
    controlplane::spawn(FakeControlplaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        conmans: vec![("vm-1".into(), format!("ws://{conman}/"))],
        ttl_ms: 60_000,
        pins: Vec::new(),
    })
    .expect("fake controlplane")
}

#[test]
fn a_fleet_converges_through_the_controlplane() {
    const POLL_MS: u64 = 300;
    let conman = echo_conman();
    let cp = controlplane_for(conman.local_addr);
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[placement]\nmode = \"controlplane\"\n[controlplane]\nurls = [\"http://{}\"]\nrevocations_poll_ms = {POLL_MS}\n",
        cp.local_addr
    );
    let one = Proxy::start(&cfg, &["--shards", "2"]);
    let two = Proxy::start(&cfg, &["--shards", "2"]);
    let bad = token_for("j-m", "mallory", "r-m");
    let good = token_for("j-g", "grace", "r-g");
    let (m1, m2) = (connect(&one.url(&bad)), connect(&two.url(&bad)));
    let (mut g1, mut g2) = (connect(&one.url(&good)), connect(&two.url(&good)));

    let t0 = Instant::now();
    revoke(&one, r#"{"user":"mallory","ttl_s":600}"#);
    let closer = |ws: Client| {
        std::thread::spawn(move || {
            assert_revoked(ws);
            Instant::now()
        })
    };
    let (h1, h2) = (closer(m1), closer(m2));
    let (t1, t2) = (h1.join().unwrap(), h2.join().unwrap());
    let took = t1.max(t2) - t0;
    eprintln!(
        "revocation on both proxies after {:?} / {:?} (poll {POLL_MS} ms)",
        t1 - t0,
        t2 - t0
    );
    // Forwarded within 0.1 s, pulled at the second proxy's next poll: the
    // issue allows two periods; a second of slack for a loaded box.
    assert!(
        took < Duration::from_millis(2 * POLL_MS + 1000),
        "took {took:?}"
    );
    echo(&mut g1, "fleet");
    echo(&mut g2, "fleet");
    assert_eq!(cp.revocations().len(), 1, "forwarded once");
    assert_refused(&two, &token_for("j-m2", "mallory", "r-x"));
    assert_eq!(two.metric("eval_revocations_in_force", &[]), 1.0);
    assert_eq!(one.metric("eval_revocation_sync_failures_total", &[]), 0.0);
}

#[test]
fn sync_failures_are_counted_retried_and_placement_goes_on() {
    let conman = echo_conman();
    let cp = controlplane_for(conman.local_addr);
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[placement]\nmode = \"controlplane\"\n[controlplane]\nurls = [\"http://{}\"]\nrevocations_poll_ms = 100\nbreaker_failures = 2\n",
        cp.local_addr
    );
    let proxy = Proxy::start(&cfg, &[]);
    // Every poll fails; none may count against placement's breaker
    // (two failures would open it).
    cp.set_mode(controlplane::FakeMode::Unavailable503);
    wait_until("poll failures counted", WAIT, || {
        proxy.metric("eval_revocation_sync_failures_total", &["op=\"poll\""]) >= 5.0
    });
    // A revocation made meanwhile is in force here at once, and its
    // forward, failing, is kept and retried.
    revoke(&proxy, r#"{"repl":"r-x","ttl_s":60}"#);
    assert_refused(&proxy, &token_for("j", "u", "r-x"));
    wait_until("a forward failure counted", WAIT, || {
        proxy.metric("eval_revocation_sync_failures_total", &["op=\"forward\""]) >= 1.0
    });
    assert!(cp.revocations().is_empty());
    cp.set_mode(controlplane::FakeMode::Normal);
    wait_until("the forward retried", WAIT, || cp.revocations().len() == 1);
    assert_eq!(cp.revocations()[0]["repl"], "r-x");
    assert_eq!(proxy.metric("eval_controlplane_breaker_state", &[]), 0.0);
    assert!(serves(&proxy, &token_for("j", "u", "r")));
}

#[test]
fn a_broken_or_unwritable_revoked_file_stops_the_start_naming_the_key() {
    let dir = tempdir::Dir::new("revoked-bad");
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"revocations\": [ oops").unwrap();
    let unwritable = dir.path().join("no-such-dir").join("revoked.json");
    for file in [&broken, &unwritable] {
        let cfg_path = dir.path().join("eval.toml");
        std::fs::write(
            &cfg_path,
            config("127.0.0.1:1".parse().unwrap(), Some(file)),
        )
        .unwrap();
        let out = std::process::Command::new(bin())
            .arg("--config")
            .arg(&cfg_path)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .output()
            .expect("run eval-proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("token.revoked_file"), "{stderr}");
    }
}
