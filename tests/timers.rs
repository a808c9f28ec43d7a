//! Every wait has a deadline, including the ones a deadline starts: after
//! a timer fires, the next one (linger, backoff, the next attempt) must
//! still fire.

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use support::*;

#[test]
fn a_timed_out_head_is_closed_after_linger_though_the_client_stays() {
    let conman = echo_conman();
    let proxy = Proxy::start(
        &config_for(
            conman.local_addr,
            "[limits]\nheader_timeout_ms = 200\nlinger_ms = 300\n",
        ),
        &["--shards", "1"],
    );
    let pid = proxy.child.id();
    let base = fd_count(pid);
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut s, b"GET /wsv2/x HTTP/1.1\r\nHost: a\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("408, then FIN");
    assert_eq!(status_of(&out), 408);
    // The client neither closes nor reads: after the linger time the
    // proxy forces the socket shut and frees it.
    wait_until(
        "the proxy to free the socket of a timed-out head",
        Duration::from_secs(15),
        || fd_count(pid) <= base,
    );
    drop(s);
}

#[test]
fn a_stalled_conman_handshake_is_retried_until_the_attempts_run_out() {
    let conman = fake_conman(eval_proxy::dev::conman::Behavior {
        stall_before_101: true,
        ..Default::default()
    });
    let proxy = Proxy::start(
        &config_for(
            conman.local_addr,
            "[limits]\nconnect_timeout_ms = 300\nsetup_timeout_ms = 8000\nmax_attempts = 3\nretry_base_ms = 10\nretry_cap_ms = 20\n",
        ),
        &["--shards", "1"],
    );
    let mut s = raw_client(proxy.listen, &dev_token("r1"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (code, reason) = read_close(&mut s);
    assert_eq!(code, 1014);
    assert_eq!(reason, "stage=conman_handshake;reason=timeout");
    assert_eq!(
        conman.connections(),
        3,
        "each attempt gets its own deadline"
    );
}

#[test]
fn a_close_conman_never_answers_ends_the_session() {
    // Conman reads on and never answers the client's Close.
    let (addr, conman) = raw_conman(|mut s, _| {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        sink
    });
    let proxy = Proxy::start(
        &config_for(addr, "[limits]\nclose_timeout_ms = 300\nlinger_ms = 300\n"),
        &["--shards", "1"],
    );
    let mut s = raw_client(proxy.listen, &dev_token("r1"));
    std::io::Write::write_all(&mut s, &frame(true, 0x8, &[3, 232], Some([1, 2, 3, 4]))).unwrap();
    // The client waits for an answer that never comes: the proxy ends the
    // session, and both sockets close, within the close and linger times.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest);
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the proxy kept the client's socket: {r:?}"
    );
    let got = conman.join().unwrap();
    assert_eq!(got[0], 0x88, "Conman got the client's Close first");
}

#[test]
fn a_connect_that_hangs_is_given_up_at_its_timeout_and_retried() {
    // A Conman whose accept queue is full: its kernel drops further SYNs,
    // so a connect to it hangs (SYN retransmissions) until given up.
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    // Backlog 0 still queues one: fill it.
    let _queued = TcpStream::connect(addr).unwrap();
    let proxy = Proxy::start(
        &config_for(
            addr,
            "[limits]\nconnect_timeout_ms = 300\nsetup_timeout_ms = 8000\nmax_attempts = 2\nretry_base_ms = 10\nretry_cap_ms = 20\n",
        ),
        &["--shards", "1"],
    );
    let t0 = std::time::Instant::now();
    let mut s = raw_client(proxy.listen, &dev_token("hang"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (code, reason) = read_close(&mut s);
    assert_eq!(code, 1014);
    assert_eq!(reason, "stage=conman_connect;reason=timeout");
    // Two attempts of 300 ms each, not the 8 s setup deadline.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert!(
        proxy.metric(
            "eval_session_setup_failures_total",
            &["stage=\"conman_connect\"", "reason=\"timeout\""]
        ) >= 1.0
    );
}
