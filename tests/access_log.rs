//! The access log (issue 10, item 4) through the real binary, in JSON: one
//! line per session, with its ids, sizes and how each side ended, or the
//! stage and reason of its failed setup; never a token; never two lines for
//! one session.

mod support;

use std::io::Write;

use support::*;

/// The access lines of a JSON log, as their `fields` objects.
fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "eval_proxy::access")
        .map(|v| v["fields"].clone())
        .collect()
}

#[test]
fn one_json_line_per_session_with_ids_sizes_and_ends() {
    let conman = echo_conman();
    let refusing = refusing_addr();
    let cfg = format!(
        "[token]\nallow_dev_key = true\n\n[placement]\n[placement.vms]\nvm-good = \"ws://{}/\"\nvm-bad = \"ws://{}/\"\n[placement.repls]\ngood = \"vm-good\"\nbad = \"vm-bad\"\n\n[limits]\nmax_attempts = 1\n\n[log]\nformat = \"json\"\n",
        conman.local_addr, refusing.addr
    );
    let proxy = Proxy::start_logged(&cfg, &["--shards", "1"]);

    // A session that relays, then closes from the client's side.
    let token = dev_token("good");
    let mut c = raw_client(proxy.listen, &token);
    let key = Some([1, 2, 3, 4]);
    c.write_all(&frame(true, 1, b"__headers__", key)).unwrap();
    let headers = read_frame(&mut c).2;
    let v: serde_json::Value = serde_json::from_slice(&headers).unwrap();
    let x_eval_session = v["headers"]["x-eval-session"].clone();
    c.write_all(&frame(true, 8, &1000u16.to_be_bytes(), key))
        .unwrap();
    assert_eq!(read_close(&mut c).0, 1000);
    drop(c);
    // A session whose Conman refuses.
    let mut bad = raw_client(proxy.listen, &dev_token("bad"));
    assert_eq!(read_close(&mut bad).0, 1014);
    drop(bad);

    wait_until("two access lines", WAIT, || {
        access_lines(&proxy.log()).len() >= 2
    });
    let log = proxy.log();
    assert!(!log.contains("v4.public"), "a token in the log");
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let ended = lines
        .iter()
        .find(|f| f["message"] == "session ended")
        .expect("the relayed session's line");
    assert_eq!(ended["repl"], "good");
    assert_eq!(ended["user"], "alice");
    assert_eq!(ended["vm"], "vm-good");
    assert_eq!(ended["shard"], 0);
    assert_eq!(ended["client"], "127.0.0.1");
    // Frames as they went: 6 + 11 bytes of text and 8 of Close from the
    // client (masked headers), the answer and a Close of 4 back.
    let answer = headers.len() + if headers.len() < 126 { 2 } else { 4 };
    assert_eq!(ended["bytes_from_client"], 6 + 11 + 8);
    assert_eq!(ended["bytes_from_conman"], answer + 4);
    assert_eq!(ended["client_close"], 1000);
    assert_eq!(ended["client_close_by"], "conman");
    assert_eq!(ended["conman_close"], 1000);
    assert_eq!(ended["conman_close_by"], "client");
    assert_eq!(ended["end"], "client_close");
    assert_eq!(ended["ended_by"], "client");
    assert!(ended["duration_ms"].as_u64().is_some());
    // As Conman got it.
    assert_eq!(ended["session"], x_eval_session);

    let failed = lines
        .iter()
        .find(|f| f["message"] == "session setup failed")
        .expect("the failed session's line");
    assert_eq!(failed["repl"], "bad");
    assert_eq!(failed["vm"], "vm-bad");
    assert_eq!(failed["stage"], "conman_connect");
    assert_eq!(failed["reason"], "refused");
    assert_ne!(failed["session"], ended["session"]);
}
