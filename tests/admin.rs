//! The admin listener under hostile connections: idle ones cannot pile up
//! threads or starve a scrape for longer than the request deadline, and a
//! slow-drip sender is cut when the whole-request deadline runs out.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use eval_proxy::admin::{MAX_CONNS, REQUEST_DEADLINE};
use support::{config_for, echo_conman, Proxy};

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/PID/task")
        .count()
}

/// One GET on a fresh connection; `None` if it was refused, reset or not
/// answered within `timeout`.
fn try_get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_string()))
}

#[test]
fn idle_connections_are_capped_and_a_scrape_gets_through_after_the_deadline() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &[]);
    let admin = proxy.admin.expect("admin enabled");
    let pid = proxy.child.id();
    let baseline = threads(pid);

    let opened = Instant::now();
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(admin).expect("connect admin"))
        .collect();

    let mut most = 0;
    for _ in 0..10 {
        most = most.max(threads(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let bound = baseline + MAX_CONNS + 8;
    assert!(
        most < bound,
        "{most} threads with 300 idle admin connections (baseline {baseline}, bound {bound})"
    );

    // The accept loop works through the backlog in order: a connection
    // opened after the 300 finds the cap full and is told so at once.
    let mut probe = TcpStream::connect(admin).expect("connect admin");
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut head = String::new();
    let _ = probe.read_to_string(&mut head);
    assert!(
        head.starts_with("HTTP/1.1 503") && head.contains("Connection: close"),
        "a connection over the cap should get an immediate 503, got {head:?}"
    );

    // The deadline frees the slots the idle connections hold (they stay
    // open on our side): a scrape answers within it, plus a margin.
    let by = opened + REQUEST_DEADLINE + Duration::from_secs(3);
    let metrics = loop {
        if let Some((200, body)) = try_get(admin, "/metrics", Duration::from_secs(1)) {
            break body;
        }
        assert!(Instant::now() < by, "/metrics starved by idle connections");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(metrics.contains("# TYPE "), "{metrics}");
    assert_eq!(
        try_get(admin, "/healthz", Duration::from_secs(2)),
        Some((200, "ok\n".into()))
    );
    drop(idle);
}

#[test]
fn a_slow_drip_sender_is_cut_at_the_whole_request_deadline() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &[]);
    let admin = proxy.admin.expect("admin enabled");

    let mut s = TcpStream::connect(admin).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let start = Instant::now();
    // A request head that never ends: one byte a second, each well inside
    // any per-read timeout.
    let drip = b"GET /healthz HTTP/1.1\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let limit = REQUEST_DEADLINE + Duration::from_secs(3);
    let mut cut = None;
    for &b in drip {
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
        if s.write_all(&[b]).is_err() {
            cut = Some(start.elapsed());
            break;
        }
        let mut one = [0u8; 64];
        match s.read(&mut one) {
            Ok(_) => {
                cut = Some(start.elapsed());
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                cut = Some(start.elapsed());
                break;
            }
        }
    }
    let cut = cut.expect("a 1 byte/s sender was still connected after 10 s");
    assert!(
        cut >= REQUEST_DEADLINE - Duration::from_millis(500) && cut <= limit,
        "cut after {cut:?}; the deadline is {REQUEST_DEADLINE:?}"
    );
}
