//! The soak (`bench/soak.py`), bounded for CI: one minute of mixed load
//! through the real proxy binary, with faults injected — Conmans killed and
//! restarted, clients that reset mid-frame, the Controlplane down for 10 s —
//! and every survival and flatness criterion checked on what it measured.
//! `bench/soak.sh MINUTES` is the long run.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

#[test]
fn one_minute_soak_with_faults_loses_no_session_and_comes_back_flat() {
    let proxy = support::bin();
    let loadgen = std::env::var_os("EVAL_LOADGEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(support::loadgen);
    let out = support::tempdir::Dir::new("soak");
    let run = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/soak.py"))
        .arg("1")
        .arg("--proxy-bin")
        .arg(&proxy)
        .arg("--loadgen-bin")
        .arg(&loadgen)
        .arg("--out")
        .arg(out.path())
        .args(["--idle", "100", "--echo-conns", "10", "--echo-rate", "100"])
        .args([
            "--mixed-conns",
            "10",
            "--bulk-conns",
            "1",
            "--bulk-rate",
            "2",
        ])
        .args(["--victims", "4", "--handshake-rate", "4"])
        // Leaves room for a second Conman kill on a slow machine: with the
        // default 6 s gap, a restart that takes a few seconds longer pushes
        // it past the cool-down and it is skipped.
        .args(["--gap", "4"])
        .output()
        .expect("python3 bench/soak.py (python3 3.11+ and taskset are needed)");
    let log = String::from_utf8_lossy(&run.stderr);
    let text = std::fs::read_to_string(out.path().join("soak.json"))
        .unwrap_or_else(|e| panic!("soak.py ({}) wrote no soak.json: {e}\n{log}", run.status));
    let soak: Value = serde_json::from_str(&text).expect("soak.json is JSON");
    let fig = &soak["figures"];
    let report = std::fs::read_to_string(out.path().join("soak.md")).unwrap_or_default();

    // The faults that the criteria are about did happen, and hit someone.
    let faults = &fig["faults"];
    assert!(faults["conman_kill"].as_u64() >= Some(2), "{faults}");
    assert!(faults["controlplane_down"].as_u64() >= Some(1), "{faults}");
    assert!(faults["torn_clients"].as_u64() >= Some(1), "{faults}");
    assert!(
        fig["victims"]["deliberately_killed"].as_u64() >= Some(4),
        "every kill after the first takes all victims with it: {}",
        fig["victims"]
    );
    for s in fig["survivors"].as_array().expect("survivors") {
        assert!(
            s["established"] == s["conns"] && s["messages"].as_u64() > Some(0),
            "survivor load did not run: {s}"
        );
    }
    for c in fig["criteria"].as_array().expect("criteria") {
        assert_eq!(c["ok"], true, "soak criterion failed: {c}\n\n{report}");
    }
    assert!(
        run.status.success(),
        "soak.py exited {}\n{log}\n{report}",
        run.status
    );
}
