//! Clients that never read cannot starve a shard: while hundreds of
//! sessions have Conman streaming at them and a client that does not read,
//! other sessions on the same shard still echo and new handshakes still
//! succeed (issue 11, defect 1: the shard's provided buffers ran dry and
//! every session froze).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tungstenite::handshake::server::{Request, Response};
use tungstenite::Message;

/// A Conman that streams 16 × 1,000-byte frames per write at sessions whose
/// repl starts with `flood` (until the socket breaks) and echoes the others.
struct Streamer {
    addr: SocketAddr,
    streaming: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Streamer {
    fn start() -> Streamer {
        Streamer::start_with(None)
    }

    /// With `sndbuf`, each stream's socket buffer is that small, so that
    /// thousands of stuck streams do not spend the kernel's TCP memory
    /// (`net.ipv4.tcp_mem`), past which it resets connections.
    fn start_with(sndbuf: Option<usize>) -> Streamer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let streaming = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (streaming2, stop2) = (streaming.clone(), stop.clone());
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                if let Some(n) = sndbuf {
                    socket2::SockRef::from(&tcp)
                        .set_send_buffer_size(n)
                        .unwrap();
                }
                if stop2.load(Relaxed) {
                    return;
                }
                let (streaming, stop) = (streaming2.clone(), stop2.clone());
                thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || serve(tcp, &streaming, &stop))
                    .unwrap();
            }
        });
        Streamer {
            addr,
            streaming,
            stop,
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(tcp: TcpStream, streaming: &AtomicUsize, stop: &AtomicBool) {
    let mut repl = String::new();
    // tungstenite's callback signature fixes the error type.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        repl = req
            .headers()
            .get("x-repl-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(tcp, callback) else {
        return;
    };
    if repl.starts_with("flood") {
        let mut burst = Vec::new();
        for i in 0..16u8 {
            burst.extend_from_slice(&[0x82, 126, 0x03, 0xe8]);
            burst.extend_from_slice(&[i; 1000]);
        }
        let tcp = ws.get_mut();
        streaming.fetch_add(1, Relaxed);
        // About 6 MB per session, far more than any buffer on the way.
        for _ in 0..400 {
            if stop.load(Relaxed) || tcp.write_all(&burst).is_err() {
                return;
            }
        }
        return;
    }
    while let Ok(m) = ws.read() {
        if (m.is_text() || m.is_binary()) && ws.send(m).is_err() {
            return;
        }
    }
}

/// A client whose receive buffer is tiny and who never reads after the 101.
fn flood_client(proxy: SocketAddr, n: usize) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&proxy.into()).unwrap();
    let mut s: TcpStream = sock.into();
    let token = dev_token(&format!("flood-{n}"));
    write!(
        s,
        "GET /wsv2/{token} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "proxy closed before its 101");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

#[test]
fn clients_that_never_read_do_not_starve_the_shard() {
    let floods: usize = std::env::var("FLOOD_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let conman = Streamer::start();
    // A small ring (4 MiB) so that, without a bound on what backlogged
    // sessions hold, a few dozen of them would drain it.
    let proxy = Proxy::start(
        &config_for(
            conman.addr,
            "[listen]\nshards = 1\n\n[buffers]\ncount = 256\n",
        ),
        &[],
    );
    let flooded: Vec<TcpStream> = (0..floods).map(|n| flood_client(proxy.listen, n)).collect();
    wait_until("every flood to stream", Duration::from_secs(30), || {
        conman.streaming.load(Relaxed) == floods
    });
    // Every flooded session has filled what the proxy queues for it and
    // stopped reading Conman: the worst state it can reach.
    wait_until(
        "backpressure on every flood",
        Duration::from_secs(60),
        || proxy.metric("eval_backpressure_pauses_total", &[]) >= floods as f64,
    );

    let echoers: Vec<_> = (0..50)
        .map(|i| {
            let url = proxy.url(&dev_token(&format!("echo-{i}")));
            thread::spawn(move || {
                let mut ws = connect(&url);
                let mut worst = Duration::ZERO;
                for k in 0..10 {
                    let text = format!("{i}-{k}");
                    let t0 = Instant::now();
                    ws.send(Message::text(text.clone())).unwrap();
                    match ws.read().expect("an echo while floods are stuck") {
                        Message::Text(t) => assert_eq!(t.as_str(), text),
                        other => panic!("{other:?}"),
                    }
                    worst = worst.max(t0.elapsed());
                }
                worst
            })
        })
        .collect();
    for e in echoers {
        let worst = e.join().expect("echo session");
        assert!(worst < Duration::from_secs(2), "an echo took {worst:?}");
    }
    let ring_exhausted = proxy.metric("eval_buffer_ring_exhausted_total", &[]);
    eprintln!("floods={floods} ring_exhausted={ring_exhausted}");
    drop(flooded);
    drop(conman);
}

/// Issue 11, memory exhaustion: thousands of clients that never read while
/// Conman streams at them. Each session may queue `limits.send_queue_bytes`
/// (256 KiB) toward its client, so without a shard-wide bound 1,000 of them
/// would hold 250 MiB; with `limits.shard_buffer_bytes` at 16 MiB, sides
/// stop being read instead, and the proxy's RSS stays within the process
/// and its ring, the budget, and about one buffer per slow reader (what it
/// received last). `SLOW_READERS=5000` for the figure.
#[test]
fn slow_readers_are_held_to_the_shard_buffer_budget() {
    let floods: usize = std::env::var("SLOW_READERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let conman = Streamer::start_with(Some(64 << 10));
    let budget: u64 = 16 << 20;
    let proxy = Proxy::start_captured(
        &config_for(
            conman.addr,
            &format!("[listen]\nshards = 1\n\n[limits]\nshard_buffer_bytes = {budget}\n"),
        ),
        &[],
    );
    let flooded: Vec<TcpStream> = (0..floods).map(|n| flood_client(proxy.listen, n)).collect();
    wait_until("every flood to stream", Duration::from_secs(60), || {
        conman.streaming.load(Relaxed) == floods
    });
    let pauses = || {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| proxy.metrics())).is_err() {
            panic!(
                "admin failed; fds {} log: {}",
                fd_count(proxy.child.id()),
                proxy.log()
            );
        }
        proxy.metric("eval_backpressure_pauses_total", &[])
            + proxy.metric("eval_buffer_budget_pauses_total", &[])
    };
    wait_until("every flood paused", Duration::from_secs(120), || {
        pauses() >= floods as f64
    });
    let buffered = proxy.metric("eval_buffered_bytes", &[]);
    let rss = rss_kib(proxy.child.id());
    eprintln!(
        "slow readers={floods} rss={rss} KiB buffered={buffered} budget_pauses={}",
        proxy.metric("eval_buffer_budget_pauses_total", &[])
    );
    assert!(proxy.metric("eval_buffer_budget_pauses_total", &[]) > 0.0);
    // The process itself and its ring (48 MiB, debug build included), the
    // budget, and per slow reader about the one buffer it last received.
    let bound_kib = 48 * 1024 + budget / 1024 + floods as u64 * 24;
    assert!(
        rss < bound_kib,
        "proxy RSS {rss} KiB with {floods} slow readers (bound {bound_kib} KiB)"
    );
    // Once the clients go, everything they held is given back.
    drop(flooded);
    wait_until("buffers given back", Duration::from_secs(60), || {
        proxy.metric("eval_buffered_bytes", &[]) == 0.0
    });
    drop(conman);
}
