//! SIGHUP reloads the config (issue 9, item 5): a placement change applies
//! to the next session while a live one keeps relaying to where it was; a
//! bad file, or a change that needs a restart, is refused with the key at
//! fault and the old config stays; `/metrics` counts both.

mod support;

use support::*;
use tungstenite::Message;

fn vm_of(ws: &mut Client) -> String {
    ws.send(Message::text("__vm__")).unwrap();
    ws.read().unwrap().into_text().unwrap().to_string()
}

fn conman(vm: &str) -> eval_proxy::dev::conman::ConmanHandle {
    fake_conman(eval_proxy::dev::conman::Behavior {
        vm_id: vm.into(),
        ..Default::default()
    })
}

#[test]
fn sighup_moves_new_sessions_and_keeps_live_ones_and_refuses_bad_files() {
    let (a, b) = (conman("vm-a"), conman("vm-b"));
    let proxy = Proxy::start_captured(&config_for(a.local_addr, ""), &["--shards", "2"]);
    let file = proxy.dir.path().join("eval.toml");
    let url = proxy.url(&dev_token("r1"));
    let mut live = connect(&url);
    assert_eq!(vm_of(&mut live), "vm-a");

    std::fs::write(&file, config_for(b.local_addr, "")).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until("a config reload", WAIT, || {
        proxy.metric("eval_config_reloads_total", &[]) == 1.0
    });
    let mut next = connect(&url);
    assert_eq!(
        vm_of(&mut next),
        "vm-b",
        "the next session uses the new placement"
    );
    assert_eq!(vm_of(&mut live), "vm-a", "the live session relays on");
    live.send(Message::text("still here")).unwrap();
    assert_eq!(live.read().unwrap(), Message::text("still here"));

    // An unknown key: refused, named, the old (new) config stays.
    std::fs::write(&file, config_for(a.local_addr, "[drain]\nbogus_key = 1\n")).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until("a refused reload", WAIT, || {
        proxy.metric("eval_config_reload_failures_total", &[]) == 1.0
    });
    // A key that needs a restart: refused the same way.
    std::fs::write(&file, config_for(a.local_addr, "[buffers]\ncount = 2048\n")).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until("a second refused reload", WAIT, || {
        proxy.metric("eval_config_reload_failures_total", &[]) == 2.0
    });
    assert_eq!(proxy.metric("eval_config_reloads_total", &[]), 1.0);
    let mut third = connect(&url);
    assert_eq!(
        vm_of(&mut third),
        "vm-b",
        "the refused files changed nothing"
    );
    let log = proxy.log();
    assert!(log.contains("bogus_key"), "the log names the key: {log}");
    assert!(log.contains("buffers"), "the log names the key: {log}");
    for ws in [live, next, third] {
        drop(ws);
    }
}
