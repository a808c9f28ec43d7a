//! Malformed and hostile upgrade requests against the real binary: each
//! gets its status (or its Close), and the proxy stays up.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;

use support::*;

fn good_head(token: &str, extra: &str) -> String {
    format!(
        "GET /wsv2/{token} HTTP/1.1\r\nHost: eval.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

#[test]
fn hostile_requests_get_their_status() {
    let conman = echo_conman();
    let proxy = Proxy::start(
        &config_for(conman.local_addr, "[limits]\nheader_timeout_ms = 1000\n"),
        &["--shards", "1"],
    );
    let t = dev_token("r1");
    let long_token = "a".repeat(16_000);
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "missing key",
            good_head(&t, "").replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            400,
        ),
        (
            "short key",
            good_head(&t, "").replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZA"),
            400,
        ),
        (
            "key not base64",
            good_head(&t, "").replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!!!!!!!!!!!!!!!!!!!!=="),
            400,
        ),
        (
            "duplicate key",
            good_head(&t, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
            400,
        ),
        (
            "wrong version",
            good_head(&t, "").replace("Version: 13", "Version: 8"),
            426,
        ),
        (
            // A missing required header is a bad request (RFC 6455 4.2.1);
            // 426 is for a version the proxy does not speak (issue 11).
            "no version",
            good_head(&t, "").replace("Sec-WebSocket-Version: 13\r\n", ""),
            400,
        ),
        ("POST", good_head(&t, "").replacen("GET", "POST", 1), 405),
        (
            "no upgrade header",
            good_head(&t, "").replace("Upgrade: websocket\r\n", ""),
            426,
        ),
        (
            "upgrade to h2c",
            good_head(&t, "").replace("Upgrade: websocket", "Upgrade: h2c"),
            426,
        ),
        (
            "connection keep-alive only",
            good_head(&t, "").replace("Connection: Upgrade", "Connection: keep-alive"),
            426,
        ),
        (
            "unknown path",
            good_head(&t, "").replace("/wsv2/", "/other/"),
            404,
        ),
        (
            "missing host",
            good_head(&t, "").replace("Host: eval.test\r\n", ""),
            400,
        ),
        ("duplicate host", good_head(&t, "Host: other\r\n"), 400),
        (
            "content-length",
            good_head(&t, "Content-Length: 5\r\n"),
            400,
        ),
        (
            "transfer-encoding",
            good_head(&t, "Transfer-Encoding: chunked\r\n"),
            400,
        ),
        ("obs-fold", good_head(&t, "X-A: b\r\n  folded\r\n"), 400),
        (
            "HTTP/1.0",
            good_head(&t, "").replace("HTTP/1.1", "HTTP/1.0"),
            400,
        ),
        ("NUL in header", good_head(&t, "X-A: b\0c\r\n"), 400),
        (
            "garbage",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03\r\n\r\n".to_string(),
            400,
        ),
        (
            "request line over 16 KiB",
            format!("GET /wsv2/{} HTTP/1.1\r\n", "a".repeat(17 * 1024)),
            414,
        ),
        (
            "head over 32 KiB",
            good_head(
                &t,
                &"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(700),
            ),
            431,
        ),
        (
            "too many headers",
            good_head(&t, &"X-A: b\r\n".repeat(100)),
            431,
        ),
        (
            "16 KiB request line with a bad token",
            good_head(&long_token, ""),
            101,
        ),
    ];
    assert!(cases.len() >= 15);
    for (name, req, status) in &cases {
        let resp = raw_exchange(proxy.listen, req.as_bytes());
        assert_eq!(
            status_of(&resp),
            *status,
            "{name}: {:?}",
            String::from_utf8_lossy(&resp[..resp.len().min(200)])
        );
        if *status == 426 {
            let text = String::from_utf8_lossy(&resp);
            assert!(text.contains("Sec-WebSocket-Version: 13"), "{name}: {text}");
        }
    }
    // The proxy is still serving.
    let mut ws = connect(&proxy.url(&t));
    ws.send(tungstenite::Message::text("still up")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("still up"));
    assert!(proxy.metric("eval_session_setup_failures_total", &["stage=\"request\""]) >= 15.0);
}

#[test]
fn slow_head_times_out() {
    let conman = echo_conman();
    let proxy = Proxy::start(
        &config_for(conman.local_addr, "[limits]\nheader_timeout_ms = 300\n"),
        &["--shards", "1"],
    );
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    // A slowloris: part of a head, then nothing.
    s.write_all(b"GET /wsv2/x HTTP/1.1\r\nHost: a\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("closed cleanly");
    assert_eq!(status_of(&out), 408);
    assert_eq!(
        proxy.metric(
            "eval_session_setup_failures_total",
            &["reason=\"header_timeout\""]
        ),
        1.0
    );
}

#[test]
fn public_healthz() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    let (status, body) = http(proxy.listen, "GET", "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[test]
fn bytes_after_the_head_are_relayed() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = good_head(&dev_token("r1"), "").into_bytes();
    bytes.extend(frame(true, 1, b"in the same packet", Some([3, 1, 4, 1])));
    s.write_all(&bytes).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_frame(&mut s).2, b"in the same packet");
}

#[test]
fn token_in_query_and_bearer_header() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    let t = dev_token("r1");
    let mut ws = connect(&format!("ws://{}/wsv2?token={t}", proxy.listen));
    ws.send(tungstenite::Message::text("q")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("q"));
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = good_head("", &format!("Authorization: Bearer {t}\r\n")).replace("/wsv2/ ", "/wsv2 ");
    s.write_all(req.as_bytes()).unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 101"));
    s.write_all(&frame(true, 1, b"b", Some([1, 2, 3, 4])))
        .unwrap();
    assert_eq!(read_frame(&mut s).2, b"b");
}

#[test]
fn bad_tokens_get_1008_or_401() {
    use eval_proxy::token;
    let conman = echo_conman();
    let proxy = Proxy::start_logged(
        &format!(
            "[token]\nallow_dev_key = true\ncluster = \"dev\"\nleeway_s = 5\n[placement]\ndefault = \"ws://{}/\"\n",
            conman.local_addr
        ),
        &["--shards", "1"],
    );
    let mut early = claims("r1");
    early.nbf = unix_now() + 3600;
    let early = token::mint(&early, token::DEV_KID, &token::dev_signing_key());
    let mut elsewhere = claims("r1");
    elsewhere.cluster = "eu-west".into();
    let elsewhere = token::mint(&elsewhere, token::DEV_KID, &token::dev_signing_key());
    let mut expired = claims("r1");
    expired.exp = unix_now() - 3600;
    let expired = token::mint(&expired, token::DEV_KID, &token::dev_signing_key());
    let other_key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let unknown_kid = token::mint(&claims("r1"), "nope", &other_key);
    let bad_sig = token::mint(&claims("r1"), token::DEV_KID, &other_key);
    for (t, reason) in [
        (expired.as_str(), "expired"),
        (unknown_kid.as_str(), "unknown_kid"),
        (bad_sig.as_str(), "bad_signature"),
        ("v4.public.garbage", "malformed"),
        (early.as_str(), "not_yet_valid"),
        (elsewhere.as_str(), "wrong_cluster"),
    ] {
        let mut c = raw_client(proxy.listen, t);
        assert_eq!(
            read_close(&mut c),
            (1008, format!("stage=token;reason={reason}"))
        );
        assert_eq!(
            proxy.metric(
                "eval_session_setup_failures_total",
                &["stage=\"token\"", &format!("reason=\"{reason}\"")]
            ),
            1.0
        );
    }
    // No token at all.
    let mut c = raw_client(proxy.listen, "");
    assert_eq!(
        read_close(&mut c),
        (1008, "stage=token;reason=missing".into())
    );
    // Rejections are the client's own fault: out of the SLO denominator.
    assert_eq!(
        proxy.metric("eval_session_client_fault_rejections_total", &[]),
        7.0
    );
    // A good session too, so the log has every kind of line.
    let mut ws = connect(&proxy.url(&dev_token("r1")));
    ws.send(tungstenite::Message::text("x")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("x"));
    ws.close(None).unwrap();
    // Until the closing handshake is through.
    while ws.read().is_ok() {}
    // Its access line comes once both its sockets are closed.
    wait_until("the access line of the good session", WAIT, || {
        proxy.log().contains("session ended")
    });
    // Tokens never reach the logs or the metrics.
    assert!(!proxy.metrics().contains("v4.public"));
    let log = std::fs::read_to_string(proxy.log_path()).unwrap();
    assert!(log.contains("token rejected"), "debug log was not captured");
    assert!(!log.contains("v4.public"), "a token leaked into the log");
    assert!(!log.contains('\x1b'), "colour codes in a log file");
    // One access line per session: each rejection with its stage and
    // reason, the good session with its ids.
    let rejected = log
        .lines()
        .filter(|l| l.contains("session setup failed") && l.contains("stage=\"token\""))
        .count();
    assert_eq!(rejected, 7, "{log}");
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session ended"))
        .collect();
    assert_eq!(ended.len(), 1, "{log}");
    for field in [
        "repl=\"r1\"",
        "user=\"alice\"",
        "vm=\"default\"",
        "client=127.0.0.1",
    ] {
        assert!(ended[0].contains(field), "{field} not in {}", ended[0]);
    }
    // The plain-HTTP switch.
    let cfg = format!(
        "[token]\nallow_dev_key = true\nreject_with = \"http\"\n[placement]\ndefault = \"ws://{}/\"\n",
        conman.local_addr
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let resp = raw_exchange(proxy.listen, good_head(&expired, "").as_bytes());
    assert_eq!(status_of(&resp), 401);
}

/// Claims that travel on to Conman (`X-Repl-Id`, `X-User`) and the
/// Controlplane (`cluster`) are refused when empty (`missing_claim`) or when
/// they hold a control character (`malformed`), instead of being forwarded
/// with the character blanked (`a\nb` used to reach Conman as `a b`, another
/// repl's id). Non-ASCII printable text is still accepted.
#[test]
fn claims_empty_or_with_control_characters_get_1008() {
    use eval_proxy::token::{self, Claims};
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    let mint = |edit: fn(&mut Claims)| {
        let mut c = claims("r1");
        edit(&mut c);
        token::mint(&c, token::DEV_KID, &token::dev_signing_key())
    };
    let cases = [
        ("repl a\\nb", mint(|c| c.repl = "a\nb".into()), "malformed"),
        (
            "repl empty",
            mint(|c| c.repl = String::new()),
            "missing_claim",
        ),
        (
            "user CRLF",
            mint(|c| c.user = "eve\r\nX-Admin: 1".into()),
            "malformed",
        ),
        ("user DEL", mint(|c| c.user = "a\x7f".into()), "malformed"),
        ("user C1", mint(|c| c.user = "a\u{85}".into()), "malformed"),
        (
            "cluster empty",
            mint(|c| c.cluster = String::new()),
            "missing_claim",
        ),
    ];
    for (name, t, reason) in &cases {
        let mut c = raw_client(proxy.listen, t);
        // An accepted token gets a session and no Close: fail fast.
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            read_close(&mut c),
            (1008, format!("stage=token;reason={reason}")),
            "{name}"
        );
    }
    for reason in ["malformed", "missing_claim"] {
        let want = cases.iter().filter(|(_, _, r)| *r == reason).count() as f64;
        assert_eq!(
            proxy.metric(
                "eval_session_setup_failures_total",
                &["stage=\"token\"", &format!("reason=\"{reason}\"")]
            ),
            want,
            "{reason}"
        );
    }
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 0.0);
    let mut ws = connect(&proxy.url(&mint(|c| c.repl = "répl-é".into())));
    ws.send(tungstenite::Message::text("é")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("é"));
}

/// Fresh tokens arriving together (verified as one batch when they land in
/// one loop turn): the good ones get their sessions, the forged one in their
/// midst still gets its 1008, whatever the batching.
#[test]
fn a_forged_token_among_fresh_ones_is_refused_alone() {
    use eval_proxy::token;
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    let other_key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let tokens: Vec<(String, bool)> = (0..12)
        .map(|i| {
            let mut c = claims(&format!("r{i}"));
            c.jti = format!("batch-{i}");
            if i == 5 {
                (token::mint(&c, token::DEV_KID, &other_key), false)
            } else {
                (
                    token::mint(&c, token::DEV_KID, &token::dev_signing_key()),
                    true,
                )
            }
        })
        .collect();
    let mut conns: Vec<TcpStream> = tokens
        .iter()
        .map(|_| {
            let s = TcpStream::connect(proxy.listen).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            s
        })
        .collect();
    // All heads first, answers after: they reach the proxy together.
    for (c, (t, _)) in conns.iter_mut().zip(&tokens) {
        c.write_all(good_head(t, "").as_bytes()).unwrap();
    }
    for (c, (_, good)) in conns.iter_mut().zip(&tokens) {
        let head = read_head(c);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        if *good {
            c.write_all(&frame(true, 0x1, b"hi", Some([1, 2, 3, 4])))
                .unwrap();
            let (_, op, payload) = read_frame(c);
            assert_eq!((op, payload.as_slice()), (0x1, &b"hi"[..]));
        } else {
            assert_eq!(
                read_close(c),
                (1008, "stage=token;reason=bad_signature".to_string())
            );
        }
    }
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 11.0);
}
