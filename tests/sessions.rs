//! The session registry on the admin API, through the real binary: listing
//! with each filter, closing one session, evacuating a VM (static and
//! Controlplane placement) and restoring it, and the admin listener's
//! authentication. Fake Conmans tell which VM a session reached (`__vm__`)
//! and its session id (`__headers__`); raw clients read the exact Close.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eval_proxy::dev::conman::{Behavior, ConmanHandle};
use eval_proxy::token::{self, Claims};
use support::*;

const MASK: Option<[u8; 4]> = Some([7, 1, 3, 9]);

fn token_for(repl: &str, user: &str) -> String {
    let c = Claims {
        user: user.into(),
        ..claims(repl)
    };
    token::mint(&c, token::DEV_KID, &token::dev_signing_key())
}

/// One relaying session, and what its Conman says about it.
struct Sess {
    c: TcpStream,
    repl: String,
    user: String,
    vm: String,
    id: String,
}

/// Sends a Text message and returns the Text answer.
fn say(c: &mut TcpStream, msg: &str) -> String {
    c.write_all(&frame(true, 1, msg.as_bytes(), MASK)).unwrap();
    let (_, op, p) = read_frame(c);
    assert_eq!(op, 1, "expected a Text answer to {msg:?}, got opcode {op}");
    String::from_utf8(p).unwrap()
}

fn open(proxy: SocketAddr, repl: &str, user: &str) -> Sess {
    let mut c = raw_client(proxy, &token_for(repl, user));
    let vm = say(&mut c, "__vm__");
    let headers: serde_json::Value = serde_json::from_str(&say(&mut c, "__headers__")).unwrap();
    let id = headers["headers"]["x-eval-session"]
        .as_str()
        .expect("X-Eval-Session")
        .to_owned();
    Sess {
        c,
        repl: repl.into(),
        user: user.into(),
        vm,
        id,
    }
}

fn echoes(s: &mut Sess) -> bool {
    say(&mut s.c, "still here?") == "still here?"
}

fn conman(vm: &str) -> ConmanHandle {
    fake_conman(Behavior {
        vm_id: vm.into(),
        ..Default::default()
    })
}

/// Static placement over three fake Conmans, two shards, passive health
/// off (so only an evacuation moves a repl).
fn three_vms() -> (Vec<ConmanHandle>, String) {
    let vms: Vec<ConmanHandle> = ["vm-a", "vm-b", "vm-c"].iter().map(|v| conman(v)).collect();
    let mut cfg = String::from(
        "[token]\nallow_dev_key = true\n[listen]\nshards = 2\n[placement]\nfail_timeout_ms = 0\n[placement.vms]\n",
    );
    for (name, h) in ["vm-a", "vm-b", "vm-c"].iter().zip(&vms) {
        cfg.push_str(&format!("{name} = \"ws://{}/\"\n", h.local_addr));
    }
    (vms, cfg)
}

/// An admin request with an optional bearer token: (status, head, body).
fn admin_req(
    admin: SocketAddr,
    method: &str,
    target: &str,
    bearer: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(admin).expect("connect admin");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read admin response");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn json(proxy: &Proxy, method: &str, target: &str, want: u16) -> serde_json::Value {
    let (status, _, body) = admin_req(proxy.admin.unwrap(), method, target, None);
    assert_eq!(status, want, "{method} {target}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

/// The ids `GET /sessions?QUERY` lists, and its `matched` count.
fn listed(proxy: &Proxy, query: &str) -> (Vec<String>, u64) {
    let v = json(proxy, "GET", &format!("/sessions?{query}"), 200);
    let mut ids: Vec<String> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    (ids, v["matched"].as_u64().unwrap())
}

fn ids_where(all: &[Sess], keep: impl Fn(&Sess) -> bool) -> Vec<String> {
    let mut ids: Vec<String> = all
        .iter()
        .filter(|s| keep(s))
        .map(|s| s.id.clone())
        .collect();
    ids.sort();
    ids
}

/// The first repl `repl-N` that static placement puts on `vm` (rendezvous
/// hashing is stable, so asking a fresh session is exact).
fn repl_homed_on(proxy: SocketAddr, vm: &str, skip: usize) -> String {
    (skip..skip + 200)
        .map(|i| format!("home-{i}"))
        .find(|r| {
            let mut s = open(proxy, r, "probe");
            s.c.write_all(&frame(true, 8, &1000u16.to_be_bytes(), MASK))
                .unwrap();
            s.vm == vm
        })
        .unwrap_or_else(|| panic!("no repl homed on {vm}"))
}

#[test]
fn each_filter_and_the_limit_list_exactly_the_matching_sessions() {
    let (_vms, cfg) = three_vms();
    let proxy = Proxy::start(&cfg, &[]);
    let mut all = Vec::new();
    for i in 0..9 {
        let user = if i % 3 == 0 { "bob" } else { "alice" };
        all.push(open(proxy.listen, &format!("repl-{}", i % 4), user));
    }
    let by_vm: BTreeMap<&str, usize> = all.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.vm.as_str()).or_default() += 1;
        m
    });
    assert!(by_vm.len() >= 2, "sessions on one VM only: {by_vm:?}");

    let (ids, matched) = listed(&proxy, "");
    assert_eq!(ids, ids_where(&all, |_| true));
    assert_eq!(matched, 9);
    let (ids, _) = listed(&proxy, "repl=repl-1");
    assert_eq!(ids, ids_where(&all, |s| s.repl == "repl-1"));
    let (ids, _) = listed(&proxy, "user=bob");
    assert_eq!(ids, ids_where(&all, |s| s.user == "bob"));
    for vm in by_vm.keys() {
        let (ids, matched) = listed(&proxy, &format!("vm={vm}"));
        assert_eq!(ids, ids_where(&all, |s| s.vm == *vm), "vm={vm}");
        assert_eq!(matched as usize, by_vm[vm]);
    }
    let (ids, _) = listed(&proxy, "repl=repl-0&user=bob");
    assert_eq!(
        ids,
        ids_where(&all, |s| s.repl == "repl-0" && s.user == "bob")
    );
    assert_eq!(listed(&proxy, "repl=nobody"), (vec![], 0));

    let v = json(&proxy, "GET", "/sessions?limit=4", 200);
    assert_eq!(v["returned"], 4);
    assert_eq!(v["matched"], 9);
    assert_eq!(v["sessions"].as_array().unwrap().len(), 4);

    // Every field, for one session.
    let s = &mut all[5];
    let v = json(
        &proxy,
        "GET",
        &format!("/sessions?repl={}&user={}", s.repl, s.user),
        200,
    );
    let row = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == s.id.as_str())
        .expect("listed")
        .clone();
    assert_eq!(row["repl"], s.repl.as_str());
    assert_eq!(row["user"], s.user.as_str());
    assert_eq!(row["vm"], s.vm.as_str());
    assert_eq!(row["phase"], "relay");
    assert!(row["shard"].as_u64().unwrap() < 2);
    assert!(row["age_ms"].as_u64().is_some());
    assert!(row["since_client_ms"].as_u64().is_some());
    assert!(row["since_conman_ms"].as_u64().is_some());
    // Two masked Text frames from the client so far, their answers back.
    let from_client = row["bytes_from_client"].as_u64().unwrap();
    assert_eq!(from_client, (6 + 6) + (6 + 11));
    assert!(row["bytes_from_conman"].as_u64().unwrap() > 2 + 4);
    assert!(echoes(s));
    let v = json(
        &proxy,
        "GET",
        &format!("/sessions?repl={}&user={}", s.repl, s.user),
        200,
    );
    let again = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == s.id.as_str())
        .unwrap()["bytes_from_client"]
        .as_u64()
        .unwrap();
    assert_eq!(again, from_client + 6 + 11);
}

#[test]
fn a_close_ends_exactly_that_session_with_its_code_and_the_rest_relay_on() {
    let (_vms, cfg) = three_vms();
    let proxy = Proxy::start(&cfg, &[]);
    let mut all: Vec<Sess> = (0..6)
        .map(|i| open(proxy.listen, &format!("repl-{i}"), "alice"))
        .collect();
    let admin = proxy.admin.unwrap();

    let victim = all.remove(2);
    let target = format!("/sessions/{}/close?code=4001", victim.id);
    assert_eq!(admin_req(admin, "GET", &target, None).0, 405);
    let v = json(&proxy, "POST", &target, 200);
    assert_eq!(v["closed"], victim.id.as_str());
    assert_eq!(v["code"], 4001);
    let mut c = victim.c;
    assert_eq!(
        read_close(&mut c),
        (4001, "stage=admin;reason=closed".into())
    );
    drop(c);
    for s in &mut all {
        assert!(echoes(s), "session {} stopped relaying", s.id);
    }
    wait_until("the closed session leaves the list", WAIT, || {
        listed(&proxy, "").0 == ids_where(&all, |_| true)
    });

    // The default code, and what is refused.
    let v = json(
        &proxy,
        "POST",
        &format!("/sessions/{}/close", all[0].id),
        200,
    );
    assert_eq!(v["code"], 1000);
    assert_eq!(read_close(&mut all[0].c).0, 1000);
    let missing = format!("/sessions/{}/close", "0123456789abcdef");
    assert_eq!(admin_req(admin, "POST", &missing, None).0, 404);
    let bad_code = format!("/sessions/{}/close?code=1006", all[1].id);
    assert_eq!(admin_req(admin, "POST", &bad_code, None).0, 400);
    assert!(echoes(&mut all[1]));
}

#[test]
fn an_evacuated_vm_loses_its_sessions_with_1012_and_gets_none_until_restored() {
    let (_vms, cfg) = three_vms();
    let proxy = Proxy::start(&cfg, &[]);
    let admin = proxy.admin.unwrap();
    let mut all: Vec<Sess> = (0..12)
        .map(|i| open(proxy.listen, &format!("repl-{i}"), "alice"))
        .collect();
    let vm = all[0].vm.clone();
    let home = repl_homed_on(proxy.listen, &vm, 0);
    let (on_vm, mut others): (Vec<Sess>, Vec<Sess>) = all.drain(..).partition(|s| s.vm == vm);
    wait_until("the probes have ended", WAIT, || {
        listed(&proxy, "user=probe").1 == 0
    });
    assert!(!others.is_empty(), "every session on {vm}");

    assert_eq!(
        admin_req(admin, "GET", &format!("/vms/{vm}/evacuate"), None).0,
        405
    );
    let v = json(
        &proxy,
        "POST",
        &format!("/vms/{vm}/evacuate?spread_s=0.5"),
        202,
    );
    assert_eq!(v["closing"].as_u64().unwrap() as usize, on_vm.len(), "{v}");
    assert_eq!(v["spread_ms"], 500);
    for mut s in on_vm {
        let (code, reason) = read_close(&mut s.c);
        assert_eq!(code, 1012, "{reason}");
        let hint = reason
            .strip_prefix("stage=conman;reason=evacuate;retry_after_ms=")
            .unwrap_or_else(|| panic!("reason {reason:?}"));
        assert!(hint.parse::<u64>().unwrap() <= 500, "{reason}");
    }
    for s in &mut others {
        assert!(echoes(s), "a session on {} stopped relaying", s.vm);
    }
    assert_eq!(
        proxy.metric("eval_vm_evacuated", &[&format!("vm=\"{vm}\"")]),
        1.0
    );
    assert_eq!(
        json(&proxy, "GET", "/vms", 200)["evacuated"],
        serde_json::json!([vm])
    );
    assert_eq!(listed(&proxy, &format!("vm={vm}")).1, 0);
    // A repl that hashes to it goes elsewhere, again and again.
    for _ in 0..3 {
        let s = open(proxy.listen, &home, "alice");
        assert_ne!(s.vm, vm, "{home} placed on the evacuated VM");
    }
    // Evacuating again changes nothing.
    let v = json(&proxy, "POST", &format!("/vms/{vm}/evacuate"), 202);
    assert_eq!(v["already_evacuated"], true);
    assert_eq!(admin_req(admin, "POST", "/vms/vm-x/evacuate", None).0, 404);

    let v = json(&proxy, "POST", &format!("/vms/{vm}/restore"), 200);
    assert_eq!(v["was_evacuated"], true);
    assert_eq!(open(proxy.listen, &home, "alice").vm, vm);
    assert_eq!(
        proxy.metric("eval_vm_evacuated", &[&format!("vm=\"{vm}\"")]),
        0.0
    );
    for s in &mut others {
        assert!(echoes(s));
    }
}

#[test]
fn in_controlplane_mode_an_evacuated_vm_is_excluded_from_placements() {
    let (a, b) = (conman("vm-a"), conman("vm-b"));
    let cp = controlplane_with(&[("vm-a", a.local_addr), ("vm-b", b.local_addr)]);
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[placement]\nmode = \"controlplane\"\n[controlplane]\nurls = [\"http://{}\"]\n",
        cp.local_addr
    );
    let proxy = Proxy::start(&cfg, &[]);
    // The fake places a new repl on the least loaded VM, ties to vm-a.
    let mut first = open(proxy.listen, "cp-repl", "alice");
    assert_eq!(first.vm, "vm-a");
    let mut second = open(proxy.listen, "cp-other", "alice");
    assert_eq!(second.vm, "vm-b");

    let v = json(&proxy, "POST", "/vms/vm-a/evacuate?spread_s=0", 202);
    assert_eq!(v["closing"], 1);
    let (code, reason) = read_close(&mut first.c);
    assert_eq!(code, 1012);
    assert!(
        reason.starts_with("stage=conman;reason=evacuate;"),
        "{reason}"
    );
    assert!(echoes(&mut second));
    // The cached placement named vm-a: the Controlplane is asked again,
    // told to exclude it.
    let again = open(proxy.listen, "cp-repl", "alice");
    assert_eq!(again.vm, "vm-b");
    for i in 0..3 {
        assert_eq!(
            open(proxy.listen, &format!("cp-new-{i}"), "alice").vm,
            "vm-b"
        );
    }

    json(&proxy, "POST", "/vms/vm-a/restore", 200);
    // vm-a is the least loaded now: the next new repl goes there.
    assert_eq!(open(proxy.listen, "cp-after", "alice").vm, "vm-a");
}

/// Runs the proxy with `args` and waits for it to exit (it must, at once).
fn refused_start(args: &[&str], config: &str) -> (i32, String) {
    let dir = tempdir::Dir::new("admin-auth");
    let cfg = dir.path().join("eval.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the proxy started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

#[test]
fn off_loopback_the_admin_api_needs_a_token_and_checks_it() {
    let conman = echo_conman();
    let base = config_for(conman.local_addr, "");
    let (code, err) = refused_start(&["--admin", "0.0.0.0:0"], &base);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("admin.token_file") && err.contains("not a loopback address"),
        "{err}"
    );

    let dir = tempdir::Dir::new("admin-token");
    let short = dir.path().join("short");
    std::fs::write(&short, "tooshort\n").unwrap();
    let cfg = format!("{base}\n[admin]\ntoken_file = \"{}\"\n", short.display());
    let (code, err) = refused_start(&["--admin", "0.0.0.0:0"], &cfg);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("admin.token_file") && err.contains("at least 16"),
        "{err}"
    );

    let token = "s3cret-admin-token-0123456789";
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let cfg = format!("{base}\n[admin]\ntoken_file = \"{}\"\n", file.display());
    let pdir = tempdir::Dir::new("proxy");
    let cfg_path = pdir.path().join("eval.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(&cfg_path)
        .args(["--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let proxy = Proxy::spawn(cmd, pdir);
    let port = proxy.admin.expect("admin address").port();
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    assert_eq!(admin_req(admin, "GET", "/metrics", None).0, 401);
    let (status, head, _) = admin_req(admin, "GET", "/healthz", Some("not-the-token-0123456789"));
    assert_eq!(status, 401);
    assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    assert_eq!(admin_req(admin, "POST", "/drain", Some(&token[1..])).0, 401);
    let (status, _, body) = admin_req(admin, "GET", "/metrics", Some(token));
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE eval_vm_evacuated gauge"), "{body}");
    assert_eq!(admin_req(admin, "GET", "/sessions", Some(token)).0, 200);
    // Changes are POST only, and the answer says so.
    for target in ["/drain", "/vms/default/evacuate", "/sessions/00/close"] {
        let (status, head, _) = admin_req(admin, "GET", target, Some(token));
        assert_eq!(status, 405, "{target}");
        assert!(head.contains("Allow: POST"), "{head}");
    }
    let (status, head, _) = admin_req(admin, "POST", "/metrics", Some(token));
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET"), "{head}");
    // Still the proxy's readiness, once authenticated.
    assert_eq!(admin_req(admin, "GET", "/readyz", Some(token)).0, 200);
}

#[test]
fn conman_gets_1001_and_the_only_vm_evacuated_refuses_new_sessions() {
    // A raw Conman: it reads what the proxy sends it after the 101.
    let (addr, conman) = raw_conman(|mut s, _head| {
        let (_, op, p) = read_frame(&mut s);
        assert_eq!(op, 8, "a Close");
        (
            u16::from_be_bytes([p[0], p[1]]),
            String::from_utf8(p[2..].to_vec()).unwrap(),
        )
    });
    let proxy = Proxy::start(&config_for(addr, ""), &[]);
    let mut c = raw_client(proxy.listen, &dev_token("only"));
    // Relaying once the raw Conman's 101 is through: it is then listed so.
    wait_until("the session relays", WAIT, || {
        json(&proxy, "GET", "/sessions", 200)["sessions"][0]["phase"] == "relay"
    });
    let v = json(&proxy, "POST", "/vms/default/evacuate?spread_s=0", 202);
    assert_eq!(v["closing"], 1);
    let reason = read_close(&mut c);
    assert_eq!(reason.0, 1012);
    assert!(reason
        .1
        .starts_with("stage=conman;reason=evacuate;retry_after_ms="));
    assert_eq!(conman.join().unwrap(), (1001, reason.1));
    drop(c);
    // Its only VM evacuated, static placement has nowhere to send a repl.
    let mut c = raw_client(proxy.listen, &dev_token("only"));
    assert_eq!(
        read_close(&mut c),
        (1013, "stage=controlplane;reason=no_capacity".into())
    );
    json(&proxy, "POST", "/vms/default/restore", 200);
}
