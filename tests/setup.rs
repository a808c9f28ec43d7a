//! Session setup through the real binary: retries with re-placement, the
//! Controlplane (fake, real HTTP) slow / 503 / down, its breaker, single
//! flight, admission, and frames held through a slow setup.

mod support;

use std::io::Write;
use std::time::Duration;

use eval_proxy::dev::controlplane::{FakeControlplane, FakeMode};
use support::*;
use tungstenite::Message;

fn vm_of(ws: &mut Client) -> String {
    ws.send(Message::text("__vm__")).unwrap();
    ws.read().unwrap().into_text().unwrap().to_string()
}

#[test]
fn refusing_vm_is_retried_on_another_and_the_client_sees_nothing() {
    let good = fake_conman(eval_proxy::dev::conman::Behavior {
        vm_id: "vm-2".into(),
        ..Default::default()
    });
    let dead = refusing_addr();
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[placement.vms]\nvm-1 = \"ws://{}/\"\nvm-2 = \"ws://{}/\"\n[placement.repls]\nr1 = \"vm-1\"\n",
        dead,
        good.local_addr
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let mut ws = connect(&proxy.url(&dev_token("r1")));
    assert_eq!(vm_of(&mut ws), "vm-2");
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    let m = proxy.metrics();
    assert_eq!(
        metric_value(
            &m,
            "eval_conman_attempt_failures_total",
            &["reason=\"refused\""]
        ),
        1.0
    );
    assert_eq!(
        metric_value(&m, "eval_session_setup_failures_total", &[]),
        0.0
    );
    assert_eq!(
        metric_value(&m, "eval_sessions_established_total", &[]),
        1.0
    );
}

#[test]
fn all_vms_down_gives_1014_within_the_setup_deadline() {
    let (dead1, dead2) = (refusing_addr(), refusing_addr());
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[limits]\nsetup_timeout_ms = 3000\n[placement.vms]\nvm-1 = \"ws://{}/\"\nvm-2 = \"ws://{}/\"\n",
        dead1,
        dead2
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let t0 = std::time::Instant::now();
    let mut c = raw_client(proxy.listen, &dev_token("r1"));
    assert_eq!(
        read_close(&mut c),
        (1014, "stage=conman_connect;reason=refused".into())
    );
    // The deadline is 3 s; a second of slack for a loaded CI machine.
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    assert!(proxy.metric("eval_conman_attempt_failures_total", &[]) >= 2.0);
}

fn cp_config(cp: &FakeControlplane, extra: &str) -> String {
    format!(
        "[token]\nallow_dev_key = true\n[placement]\nmode = \"controlplane\"\n[controlplane]\nurls = [\"http://{}\"]\nrequest_timeout_ms = 300\nbreaker_failures = 3\nbreaker_open_ms = 400\n{extra}\n",
        cp.local_addr
    )
}

#[test]
fn controlplane_placement_and_single_flight() {
    let conman = echo_conman();
    let cp = controlplane_with(&[("vm-1", conman.local_addr)]);
    let proxy = Proxy::start(&cp_config(&cp, ""), &["--shards", "2"]);
    // 100 sessions for one repl at once: one Controlplane request.
    let url = proxy.url(&dev_token("hot-repl"));
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut ws = connect(&url);
                ws.send(Message::text("x")).unwrap();
                assert_eq!(ws.read().unwrap(), Message::text("x"));
                ws
            })
        })
        .collect();
    let _clients: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        cp.requests(),
        1,
        "Controlplane asked more than once for one repl"
    );
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 100.0);
}

#[test]
fn controlplane_down_gives_1013_breaker_opens_then_recovers() {
    let conman = echo_conman();
    let cp = controlplane_with(&[("vm-1", conman.local_addr)]);
    // Open long enough that ten sessions on a loaded machine fit in it, so
    // no second half-open probe slips in before the count below.
    let config = cp_config(&cp, "").replace("breaker_open_ms = 400", "breaker_open_ms = 2000");
    let proxy = Proxy::start(&config, &["--shards", "1"]);
    for mode in [
        FakeMode::Unavailable503,
        FakeMode::Down,
        FakeMode::Slow(Duration::from_secs(2)),
    ] {
        cp.set_mode(mode);
        // Each session is for a new repl, so nothing is cached.
        let before = cp.requests();
        for i in 0..10 {
            let mut c = raw_client(proxy.listen, &dev_token(&format!("{mode:?}-{i}")));
            let (code, reason) = read_close(&mut c);
            assert_eq!(code, 1013, "{mode:?}: {reason}");
            assert!(reason.starts_with("stage=controlplane;reason="), "{reason}");
        }
        // The breaker opened after 3 failures: the other 7 never reached it.
        let asked = cp.requests() - before;
        assert!(
            asked <= 4,
            "{mode:?}: {asked} requests reached a failing Controlplane"
        );
        // Recovery: once the open period passes, a probe closes it again.
        cp.set_mode(FakeMode::Normal);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut c = raw_client(proxy.listen, &dev_token(&format!("{mode:?}-ok")));
            c.write_all(&frame(true, 1, b"ok", Some([1, 2, 3, 4])))
                .unwrap();
            let (_, op, payload) = read_frame(&mut c);
            if op == 1 {
                assert_eq!(payload, b"ok");
                break;
            }
            let reason = String::from_utf8_lossy(&payload[2..]).to_string();
            assert!(reason.contains("circuit_open"), "{reason}");
            assert!(std::time::Instant::now() < deadline, "breaker never closed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        proxy.metric(
            "eval_controlplane_errors_total",
            &["reason=\"circuit_open\""]
        ) >= 1.0
    );
}

#[test]
fn frames_during_a_slow_setup_arrive_complete_and_in_order() {
    let (addr, h) = raw_conman(|mut s, _| {
        let mut got = Vec::new();
        for _ in 0..200 {
            got.push(read_frame(&mut s).2);
        }
        got
    });
    let cp = controlplane_with(&[("vm-1", addr)]);
    cp.set_mode(FakeMode::Slow(Duration::from_millis(150)));
    let proxy = Proxy::start(&cp_config(&cp, ""), &["--shards", "1"]);
    let mut c = raw_client(proxy.listen, &dev_token("r1"));
    // The 101 is back; Conman is not reached yet. Write while it is slow.
    let mut bytes = Vec::new();
    for i in 0..200u32 {
        let payload: Vec<u8> = format!("frame-{i}-")
            .bytes()
            .chain(std::iter::repeat_n(b'z', (i as usize * 37) % 300))
            .collect();
        bytes.extend(frame(true, 2, &payload, Some(i.to_be_bytes())));
    }
    c.write_all(&bytes).unwrap();
    let got = h.join().unwrap();
    for (i, p) in got.iter().enumerate() {
        assert!(
            p.starts_with(format!("frame-{i}-").as_bytes()),
            "frame {i} out of order"
        );
        assert_eq!(p.len(), format!("frame-{i}-").len() + (i * 37) % 300);
    }
}

#[test]
fn admission_limit_gives_1013_with_retry_hint() {
    let conman = echo_conman();
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://{}/\"\n[admission]\nper_repl_rate = 0.5\nper_repl_burst = 3\n",
        conman.local_addr
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    let mut ok = Vec::new();
    for _ in 0..3 {
        ok.push(connect(&proxy.url(&dev_token("busy"))));
    }
    let mut c = raw_client(proxy.listen, &dev_token("busy"));
    let (code, reason) = read_close(&mut c);
    assert_eq!(code, 1013);
    assert!(
        reason.starts_with("stage=controlplane;reason=admission;retry_after_ms="),
        "{reason}"
    );
    // Another repl is not affected.
    let mut ws = connect(&proxy.url(&dev_token("quiet")));
    ws.send(Message::text("y")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("y"));
}

/// The SLO under a bad VM: 1 of 3 Conmans refuses every connection, yet
/// every session is established (re-placed away from it).
#[test]
fn one_refusing_conman_of_three_keeps_success_at_100_percent() {
    let a = fake_conman(eval_proxy::dev::conman::Behavior {
        vm_id: "vm-a".into(),
        ..Default::default()
    });
    let b = fake_conman(eval_proxy::dev::conman::Behavior {
        vm_id: "vm-b".into(),
        ..Default::default()
    });
    let dead = refusing_addr();
    let cp = controlplane_with(&[
        ("vm-a", a.local_addr),
        ("vm-b", b.local_addr),
        ("vm-bad", dead.addr),
    ]);
    let proxy = Proxy::start(&cp_config(&cp, ""), &["--shards", "2"]);
    for i in 0..60 {
        let mut ws = connect(&proxy.url(&dev_token(&format!("repl-{i}"))));
        let vm = vm_of(&mut ws);
        assert!(vm == "vm-a" || vm == "vm-b", "{vm}");
    }
    let m = proxy.metrics();
    assert_eq!(
        metric_value(&m, "eval_sessions_established_total", &[]),
        60.0
    );
    assert_eq!(
        metric_value(&m, "eval_session_setup_failures_total", &[]),
        0.0
    );
    assert!(
        metric_value(&m, "eval_conman_attempt_failures_total", &[]) >= 1.0,
        "the bad VM was never tried"
    );
}
