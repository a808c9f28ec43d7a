//! What Conman's answer may and may not do: pick only what was offered
//! (RFC 6455 4.1), and nothing reaches Conman after the proxy's own Close,
//! not even client frames held during setup (RFC 6455 5.5.1).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;

use support::*;

/// A Conman for one connection: answers the upgrade with a 101 carrying
/// `extra_headers`, followed by `after` in the same write, then returns
/// every byte it receives after the request head until EOF.
fn conman_once(extra_headers: &'static str, after: Vec<u8>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let head = read_head(&mut s);
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("key");
        let accept = eval_proxy::proto::handshake::accept_key(key);
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{extra_headers}\r\n"
        )
        .into_bytes();
        out.extend_from_slice(&after);
        s.write_all(&out).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    (addr, h)
}

/// Frames in a byte stream: (opcode, unmasked payload).
fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(Some((h, n))) = eval_proxy::proto::frame::FrameHeader::parse(b) {
        let len = h.payload_len as usize;
        let mut p = b[n..n + len].to_vec();
        if let Some(m) = h.mask {
            eval_proxy::proto::frame::apply_mask(&mut p, m, 0);
        }
        out.push((h.opcode.bits(), p));
        b = &b[n + len..];
    }
    out
}

fn one_attempt(conman: SocketAddr) -> Proxy {
    Proxy::start(
        &config_for(conman, "[limits]\nmax_attempts = 1\n"),
        &["--shards", "1"],
    )
}

#[test]
fn held_client_frames_never_follow_the_close_sent_to_conman() {
    // Conman's 101 and a frame it must not send (masked) in one segment.
    let (addr, conman) = conman_once("", frame(true, 0x1, b"bad", Some([1, 2, 3, 4])));
    let proxy = one_attempt(addr);
    // Frames sent with the head are held until Conman has answered.
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    let mut bytes = format!(
        "GET /wsv2/{} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        dev_token("r1")
    )
    .into_bytes();
    for i in 0..3u8 {
        bytes.extend(frame(true, 0x1, &[b'a' + i; 10], Some([9, 9, 9, 9])));
    }
    s.write_all(&bytes).unwrap();
    let got = conman.join().unwrap();
    let f = frames(&got);
    assert_eq!(f.len(), 1, "Conman got more than the Close: {f:?}");
    assert_eq!(f[0].0, 0x8);
    assert_eq!(u16::from_be_bytes([f[0].1[0], f[0].1[1]]), 1002);
    assert_eq!(&f[0].1[2..], b"stage=relay;reason=masked_frame");
}

#[rstest::rstest]
#[case::extension(
    "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    "unoffered_extension"
)]
#[case::protocol("Sec-WebSocket-Protocol: bogus\r\n", "unoffered_protocol")]
fn conman_picking_what_was_not_offered_fails_its_handshake(
    #[case] header: &'static str,
    #[case] reason: &str,
) {
    let (addr, _conman) = conman_once(header, frame(true, 0x1, b"hi", None));
    let proxy = one_attempt(addr);
    let mut s = raw_client(proxy.listen, &dev_token("r1"));
    let (code, text) = read_close(&mut s);
    assert_eq!(code, 1014);
    assert_eq!(text, format!("stage=conman_handshake;reason={reason}"));
}
