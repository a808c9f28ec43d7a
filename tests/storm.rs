//! Issue 11, reconnect storm, bounded for CI: 200 sessions through the real
//! proxy onto two echo backends standing for two Conman VMs (static
//! placement). `eval-loadgen storm` kills one backend and reconnects every
//! session it carried at once. Each of them must learn of the loss from a
//! Close 1014 (never a bare reset), and every one must relay again, byte
//! for byte; none may fail. `bench/storm.sh` is the full-size version.

mod support;

use std::process::Command;

use serde_json::{json, Value};
use support::*;

#[test]
fn every_session_of_a_killed_conman_relays_again() {
    let sessions = 200;
    let vm_a = Listening::echo_server();
    let vm_b = Listening::echo_server();
    let proxy = Proxy::start(
        &format!(
            "[token]\nallow_dev_key = true\n\n[placement.vms]\nvm-a = \"ws://{}/\"\n\
             vm-b = \"ws://{}/\"\n\n[listen]\nshards = 1\n",
            vm_a.at, vm_b.at
        ),
        &[],
    );
    let out = Command::new(loadgen())
        .args(["storm", "--url", &format!("ws://{}/wsv2/", proxy.listen)])
        .args(["--sessions", &sessions.to_string(), "--json"])
        .args(["--token-per-conn", "--dev-key", "--repls", "50"])
        .args(["--kill-pid", &vm_b.child.id().to_string()])
        .args(["--watch-pid", &proxy.child.id().to_string()])
        .args(["--settle", "500ms", "--observe", "500ms"])
        .args(["--echo-every", "250ms", "--storm-timeout", "30s"])
        .output()
        .expect("run eval-loadgen storm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON report; stdout {stdout:?}, stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "loadgen exited {:?}: {report}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("killed {}", vm_b.child.id())),
        "{stdout}"
    );
    let storm = &report["storm"];
    let lost = storm["lost"].as_u64().expect("lost");
    assert!(
        lost > 0 && lost < sessions,
        "both VMs carried sessions and one was lost: {storm}"
    );
    assert_eq!(storm["lost_before_start"], 0, "{storm}");
    // Every loss was told with a Close, none with a reset or a bare FIN.
    assert_eq!(storm["lost_by"], json!({ "close_1014": lost }), "{storm}");
    // The proxy retried the dead VM's repls on the other VM by itself: no
    // client saw a failed attempt, and every lost session relays again.
    assert_eq!(storm["attempt_failures"], json!({}), "{storm}");
    assert_eq!(storm["recovered"], lost, "{storm}");
    assert_eq!(storm["failed_sessions"], 0, "{storm}");
    assert!(storm["all_relaying_ms"].as_f64().is_some(), "{storm}");
    assert!(
        storm["cpu"]["storm_cpu_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "the proxy's CPU over the storm was read: {storm}"
    );
    assert_eq!(
        proxy.metric("eval_sessions_established_total", &[]),
        (sessions + lost) as f64
    );
    assert_eq!(report["errors"], json!({}), "{report}");
}
