//! Dead-peer detection through the real binary (issue 10, item 1): a client
//! that stops answering without a FIN is found dead within
//! `keepalive.timeout_s` and its Conman gets Close 1001; the proxy's Pings
//! land only between frames, however long or fragmented, and their Pongs
//! never reach the other side; the peers' own Pings and Pongs still go
//! end to end.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// The payload of the proxy's Pings starts with this (`session::live`).
const PROXY_PING: &[u8] = b"evalping";

/// One frame: (fin, opcode, payload unmasked, masked).
fn read_frame_m(s: &mut impl Read) -> std::io::Result<(bool, u8, Vec<u8>, bool)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    assert_eq!(h[0] & 0x70, 0, "RSV bits set: a frame boundary was lost");
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b)?;
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    assert!(
        len <= 1 << 24,
        "absurd frame length {len}: a boundary was lost"
    );
    let masked = h[1] & 0x80 != 0;
    let mut k = [0u8; 4];
    if masked {
        s.read_exact(&mut k)?;
    }
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p)?;
    if masked {
        for (i, b) in p.iter_mut().enumerate() {
            *b ^= k[i % 4];
        }
    }
    Ok((h[0] & 0x80 != 0, h[0] & 0x0f, p, masked))
}

fn proxy_with(conman: std::net::SocketAddr, keepalive: &str) -> Proxy {
    let cfg = config_for(conman, &format!("[keepalive]\n{keepalive}\n"));
    Proxy::start(&cfg, &["--shards", "1"])
}

#[test]
fn a_client_that_stops_answering_is_dead_within_the_timeout() {
    // Conman answers the proxy's Pings (so only the client is silent) and
    // reports the Close it gets, and when.
    let (conman, done) = raw_conman(|mut s, _| {
        let mut masked_pings = 0;
        loop {
            let (_, op, p, masked) = read_frame_m(&mut s).expect("conman read");
            match op {
                9 => {
                    assert!(masked, "the proxy's Ping to Conman must be masked");
                    masked_pings += 1;
                    s.write_all(&frame(true, 10, &p, None)).unwrap();
                }
                8 => {
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    let reason = String::from_utf8(p[2..].to_vec()).unwrap();
                    return (code, reason, Instant::now(), masked_pings);
                }
                _ => s.write_all(&frame(true, op, &p, None)).unwrap(),
            }
        }
    });
    let proxy = proxy_with(conman, "interval_s = 0.5\ntimeout_s = 1.5");
    let pid = proxy.child.id();
    let base_fds = fd_count(pid);
    let mut client = raw_client(proxy.listen, &dev_token("r1"));
    client
        .write_all(&frame(true, 1, b"hello", Some([1, 2, 3, 4])))
        .unwrap();
    let (_, op, p) = read_frame(&mut client);
    assert_eq!((op, p.as_slice()), (1, &b"hello"[..]));
    assert_eq!(proxy.metric("eval_sessions_active", &[]), 1.0);
    // From here the client neither reads nor writes nor closes: a laptop
    // whose lid shut.
    let stopped = Instant::now();
    let (code, reason, at, conman_pings) = done.join().unwrap();
    let detected = at - stopped;
    eprintln!(
        "vanished client detected after {:.3} s (timeout_s = 1.5, interval_s = 0.5)",
        detected.as_secs_f64()
    );
    assert_eq!(
        (code, reason.as_str()),
        (1001, "stage=relay;reason=client_timeout")
    );
    assert!(
        detected >= Duration::from_millis(1400) && detected <= Duration::from_millis(2500),
        "detected after {detected:?}"
    );
    assert!(conman_pings >= 1, "Conman, silent too, was pinged");
    // The client got the proxy's unmasked Pings, then a reset.
    let mut pings = 0;
    loop {
        match read_frame_m(&mut client) {
            Ok((_, 9, p, masked)) => {
                assert!(p.starts_with(PROXY_PING) && !masked);
                pings += 1;
            }
            Ok(other) => panic!("unexpected frame to a dead client: {other:?}"),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                break;
            }
        }
    }
    assert!(pings >= 1, "no Ping before the client was given up");
    wait_until("session gone", WAIT, || {
        proxy.metric("eval_sessions_active", &[]) == 0.0 && fd_count(pid) == base_fds
    });
    assert_eq!(
        proxy.metric("eval_peer_timeouts_total", &["reason=\"client_timeout\""]),
        1.0
    );
    assert!(proxy.metric("eval_keepalive_pings_total", &["to=\"client\""]) >= 1.0);
}

/// The same with a real client that answers Pings as WebSocket clients
/// do (eval-loadgen), then is paused with SIGSTOP: no FIN, no RST, nothing.
#[test]
fn a_paused_real_client_is_dead_within_the_timeout() {
    use std::io::BufRead;
    let (conman, done) = raw_conman(|mut s, _| loop {
        let (_, op, p, _) = read_frame_m(&mut s).expect("conman read");
        match op {
            9 => s.write_all(&frame(true, 10, &p, None)).unwrap(),
            8 => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                let reason = String::from_utf8(p[2..].to_vec()).unwrap();
                return (code, reason, Instant::now());
            }
            _ => s.write_all(&frame(true, op, &p, None)).unwrap(),
        }
    });
    let proxy = proxy_with(conman, "interval_s = 0.2\ntimeout_s = 1");
    let pid = proxy.child.id();
    let base_fds = fd_count(pid);
    /// Killed (even if stopped) however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut client = Killed(
        std::process::Command::new(loadgen())
            .args(["idle", "--conns", "1", "--no-spread", "--url"])
            .arg(proxy.url(&dev_token("r1")))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn eval-loadgen"),
    );
    let mut lines = std::io::BufReader::new(client.0.stdout.take().unwrap()).lines();
    let held = lines.find_map(|l| l.ok().filter(|l| l.starts_with("holding")));
    assert!(held.is_some(), "eval-loadgen never held its session");
    // A Ping goes again only once the last was answered: four to the client
    // means it answered three, and is alive while it runs.
    wait_until("the client answering Pings", WAIT, || {
        proxy.metric("eval_keepalive_pings_total", &["to=\"client\""]) >= 4.0
    });
    assert_eq!(proxy.metric("eval_sessions_active", &[]), 1.0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(client.0.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let (code, reason, at) = done.join().unwrap();
    let detected = at - stopped;
    eprintln!(
        "paused client detected after {:.3} s (timeout_s = 1)",
        detected.as_secs_f64()
    );
    assert_eq!(
        (code, reason.as_str()),
        (1001, "stage=relay;reason=client_timeout")
    );
    // Its last Pong may have come up to one interval before the pause.
    assert!(
        detected >= Duration::from_millis(750) && detected <= Duration::from_millis(2000),
        "detected after {detected:?}"
    );
    wait_until("session gone", WAIT, || {
        proxy.metric("eval_sessions_active", &[]) == 0.0 && fd_count(pid) == base_fds
    });
}

#[test]
fn a_conman_that_stops_answering_gives_the_client_1014() {
    // Conman upgrades, then neither reads nor writes nor closes until the
    // test is over (a VM frozen, its TCP stack still up).
    let (release, frozen) = std::sync::mpsc::channel::<()>();
    let (conman, held) = raw_conman(move |s, _| {
        let _ = frozen.recv();
        drop(s);
    });
    let proxy = proxy_with(conman, "interval_s = 0.3\ntimeout_s = 1");
    let mut client = raw_client(proxy.listen, &dev_token("r1"));
    let key = Some([4, 3, 2, 1]);
    let start = Instant::now();
    // The client keeps answering the proxy's Pings; what ends it is Conman.
    let (code, reason) = loop {
        let (_, op, p, masked) = read_frame_m(&mut client).expect("client read");
        assert!(!masked);
        match op {
            9 => client.write_all(&frame(true, 10, &p, key)).unwrap(),
            8 => {
                break (
                    u16::from_be_bytes([p[0], p[1]]),
                    String::from_utf8(p[2..].to_vec()).unwrap(),
                )
            }
            other => panic!("unexpected opcode {other}"),
        }
    };
    let took = start.elapsed();
    assert_eq!(
        (code, reason.as_str()),
        (1014, "stage=relay;reason=conman_timeout")
    );
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(
        proxy.metric("eval_peer_timeouts_total", &["reason=\"conman_timeout\""]),
        1.0
    );
    release.send(()).unwrap();
    held.join().unwrap();
}

#[test]
fn a_client_that_answers_stays_and_peers_pings_go_end_to_end() {
    let (conman, done) = raw_conman(|mut s, _| {
        // Conman's own Ping, answered by the client through the proxy.
        s.write_all(&frame(true, 9, b"conman ping", None)).unwrap();
        let mut got_pong = false;
        loop {
            let (_, op, p, masked) = read_frame_m(&mut s).expect("conman read");
            match op {
                9 if p.starts_with(PROXY_PING) => {
                    assert!(masked);
                    s.write_all(&frame(true, 10, &p, None)).unwrap();
                }
                // The client's Ping: answered by Conman, as an endpoint does.
                9 => s.write_all(&frame(true, 10, &p, None)).unwrap(),
                10 => {
                    assert_eq!(p, b"conman ping", "only the peer's own Pong arrives");
                    got_pong = true;
                }
                8 => return got_pong,
                _ => s.write_all(&frame(true, op, &p, None)).unwrap(),
            }
        }
    });
    let proxy = proxy_with(conman, "interval_s = 0.3\ntimeout_s = 1");
    let mut client = raw_client(proxy.listen, &dev_token("r1"));
    let key = Some([5, 6, 7, 8]);
    client
        .write_all(&frame(true, 9, b"client ping", key))
        .unwrap();
    let (mut proxy_pings, mut pong, mut conman_ping) = (0, false, false);
    // Three timeouts long, answering the proxy's Pings as a client does.
    let until = Instant::now() + Duration::from_secs(3);
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < until {
        match read_frame_m(&mut client) {
            Ok((_, 9, p, masked)) => {
                assert!(!masked);
                if p.starts_with(PROXY_PING) {
                    proxy_pings += 1;
                } else {
                    assert_eq!(p, b"conman ping");
                    conman_ping = true;
                }
                client.write_all(&frame(true, 10, &p, key)).unwrap();
            }
            Ok((_, 10, p, _)) => {
                assert_eq!(p, b"client ping", "a Pong the proxy meant to swallow");
                pong = true;
            }
            Ok(other) => panic!("unexpected frame {other:?}"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("session ended: {e}"),
        }
    }
    assert!(pong && conman_ping, "peers' Pings round-trip");
    assert!(proxy_pings >= 3, "{proxy_pings} Pings in 3 s at 0.3 s");
    assert_eq!(proxy.metric("eval_sessions_active", &[]), 1.0);
    client
        .write_all(&[frame(true, 8, &1000u16.to_be_bytes(), key)].concat())
        .unwrap();
    assert!(done.join().unwrap(), "Conman's Pong came back");
    assert!(proxy.metric("eval_keepalive_pongs_total", &[]) >= 3.0);
}

/// A message stream of every shape: short frames, frames far above
/// `relay.hold_max` (streamed, and spliced above `buffers.splice_min`),
/// fragmented messages. Each data frame's payload is unique.
fn messages() -> Vec<(bool, u8, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..12u32 {
        let fill = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8)
                .collect()
        };
        out.push((true, 2, fill(100)));
        out.push((true, 2, fill(300_000 + i as usize * 1000)));
        out.push((false, 1, fill(20_000)));
        out.push((false, 0, fill(150_000)));
        out.push((true, 0, fill(7)));
    }
    out
}

/// Reads `want` data frames, answering the proxy's Pings; every frame must
/// be exactly the next one expected. Returns the Pings seen.
fn read_stream(s: &mut TcpStream, want: &[(bool, u8, Vec<u8>)], mask: Option<[u8; 4]>) -> usize {
    let mut pings = 0;
    let mut i = 0;
    while i < want.len() {
        let (fin, op, p, masked) = read_frame_m(s).expect("read stream");
        if op == 9 {
            assert!(p.starts_with(PROXY_PING), "{p:?}");
            assert_eq!(masked, mask.is_none(), "mask bit of the proxy's Ping");
            pings += 1;
            s.write_all(&frame(true, 10, &p, mask)).unwrap();
            continue;
        }
        let (wfin, wop, wp) = &want[i];
        assert!(
            fin == *wfin && op == *wop && p == *wp,
            "frame {i} differs (a Ping inside a frame?)"
        );
        i += 1;
    }
    pings
}

/// Writes the frames as a program producing output would: in pieces over
/// time, so that Pings fall due while a long frame is half through.
fn write_stream(s: &mut TcpStream, msgs: &[(bool, u8, Vec<u8>)], mask: Option<[u8; 4]>) {
    for (fin, op, p) in msgs {
        for piece in frame(*fin, *op, p, mask).chunks(16 * 1024) {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[test]
fn pings_go_only_between_frames_of_long_and_fragmented_streams() {
    let msgs = messages();
    let to_client = msgs.clone();
    // Phase 1: Conman streams, the client only reads (and answers the
    // proxy's Pings). Phase 2: the other way round.
    let (conman, done) = raw_conman(move |mut s, _| {
        write_stream(&mut s, &to_client, None);
        read_stream(&mut s, &to_client, None)
    });
    let proxy = proxy_with(conman, "interval_s = 0.05\ntimeout_s = 10");
    let mut client = raw_client(proxy.listen, &dev_token("r1"));
    let pings_to_client = read_stream(&mut client, &msgs, Some([3, 1, 4, 1]));
    let writer = {
        let mut s = client.try_clone().unwrap();
        let msgs = msgs.clone();
        std::thread::spawn(move || write_stream(&mut s, &msgs, Some([2, 7, 1, 8])))
    };
    let pings_to_conman = done.join().unwrap();
    writer.join().unwrap();
    eprintln!(
        "Pings inside the streams: {pings_to_client} to the client, {pings_to_conman} to Conman"
    );
    assert!(
        pings_to_client >= 3,
        "{pings_to_client} Pings to the client"
    );
    assert!(pings_to_conman >= 1, "{pings_to_conman} Pings to Conman");
    assert_eq!(proxy.metric("eval_sessions_active", &[]), 1.0);
}
