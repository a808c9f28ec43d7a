//! Retries through the real binary: a session excludes every VM that failed
//! in its attempts, not only the last, so with two of three VMs refusing it
//! never bounces back to the first one and reaches the third.

mod support;

use std::io::Write;
use std::net::SocketAddr;

use support::*;

/// What the session's Conman says it is, or the Close the proxy sent
/// instead. A raw client, since tungstenite takes 1014 for a protocol
/// violation and would hide the proxy's reason.
fn vm_of(proxy: SocketAddr, repl: &str) -> String {
    let mut c = raw_client(proxy, &dev_token(repl));
    c.write_all(&frame(true, 1, b"__vm__", Some([1, 2, 3, 4])))
        .unwrap();
    match read_frame(&mut c) {
        (true, 1, vm) => String::from_utf8(vm).unwrap(),
        (_, 8, p) if p.len() >= 2 => format!(
            "Close {} {}",
            u16::from_be_bytes([p[0], p[1]]),
            String::from_utf8_lossy(&p[2..])
        ),
        other => format!("{other:?}"),
    }
}

/// Static placement over vm-1, vm-2 and vm-3, of which vm-1 and vm-3
/// refuse connections (passive health off, so each session meets them). By rendezvous order (pinned in `control::rendezvous`'s tests,
/// so stable across builds) the repls below rank the VMs:
/// - `retry-0`: vm-2 first, no retry;
/// - `retry-4`: vm-1, vm-2: one retry;
/// - `retry-5`: vm-3, vm-2: one retry;
/// - `retry-2`, `retry-3`: vm-3, vm-1, vm-2: two retries. Excluding only the
///   last failed VM, the third attempt excluded vm-1 and went back to vm-3,
///   and with `max_attempts = 3` the session failed.
#[test]
fn two_refusing_vms_of_three_are_both_excluded_and_the_third_is_reached() {
    let good = fake_conman(eval_proxy::dev::conman::Behavior {
        vm_id: "vm-2".into(),
        ..Default::default()
    });
    let (dead1, dead3) = (refusing_addr(), refusing_addr());
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[limits]\nmax_attempts = 3\n[placement]\nfail_timeout_ms = 0\n[placement.vms]\nvm-1 = \"ws://{}/\"\nvm-2 = \"ws://{}/\"\nvm-3 = \"ws://{}/\"\n",
        dead1, good.local_addr, dead3
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let repls = [
        ("retry-0", 0),
        ("retry-4", 1),
        ("retry-5", 1),
        ("retry-2", 2),
        ("retry-3", 2),
    ];
    let mut wrong = Vec::new();
    for (repl, _) in repls {
        let vm = vm_of(proxy.listen, repl);
        if vm != "vm-2" {
            wrong.push(format!("{repl}: {vm}"));
        }
    }
    assert!(wrong.is_empty(), "sessions not on vm-2: {wrong:?}");
    let m = proxy.metrics();
    let retries: usize = repls.iter().map(|&(_, n)| n).sum();
    assert_eq!(
        metric_value(
            &m,
            "eval_conman_attempt_failures_total",
            &["reason=\"refused\""]
        ),
        retries as f64
    );
    assert_eq!(
        metric_value(&m, "eval_session_setup_failures_total", &[]),
        0.0
    );
    assert_eq!(
        metric_value(&m, "eval_sessions_established_total", &[]),
        repls.len() as f64
    );
}

/// Passive health (`placement.fail_timeout_ms`): once a session's attempt
/// on a VM fails, later sessions are placed elsewhere at once instead of
/// each dialing the dead VM first, which is what a reconnect storm after a
/// VM dies looks like (bench/storm.sh measured one failed dial per session
/// without it).
#[test]
fn a_vm_that_failed_is_passed_over_by_the_sessions_after() {
    let good = fake_conman(eval_proxy::dev::conman::Behavior {
        vm_id: "vm-2".into(),
        ..Default::default()
    });
    let (dead1, dead3) = (refusing_addr(), refusing_addr());
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[placement.vms]\nvm-1 = \"ws://{}/\"\nvm-2 = \"ws://{}/\"\nvm-3 = \"ws://{}/\"\n",
        dead1, good.local_addr, dead3
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let repls: Vec<String> = (0..40).map(|i| format!("storm-{i}")).collect();
    for repl in &repls {
        assert_eq!(vm_of(proxy.listen, repl), "vm-2", "{repl}");
    }
    // Without passive health about two thirds of these sessions would fail
    // one or two attempts first; with it, each dead VM fails once.
    let failed = proxy.metric("eval_conman_attempt_failures_total", &[]);
    assert!(failed <= 2.0, "{failed} failed attempts for 40 sessions");
}
