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
        &config_for(conman.local_addr, "[limits]\nheader_timeout_ms = 200\n"),
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
