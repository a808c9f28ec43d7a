//! The proxy out of file descriptors: accept backs off instead of spinning
//! and flooding the log, live sessions keep relaying, a Conman dial that
//! finds no descriptor is the proxy's fault (1011), and service comes back
//! when descriptors free up.

mod support;

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tungstenite::Message;

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The lowest descriptor number `pid` has not open.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

fn set_nofile(pid: u32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: 20000,
    };
    // SAFETY: prlimit only reads `lim`.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn echo(ws: &mut Client, text: &str) {
    ws.send(Message::Text(text.into())).unwrap();
    match ws.read().unwrap() {
        Message::Text(t) => assert_eq!(t.as_str(), text),
        other => panic!("{other:?}"),
    }
}

/// The proxy started with `RLIMIT_NOFILE` at `nofile` (an io_uring accept
/// takes the limit in force when it is armed, so it must be low from the
/// start), warnings captured in its log.
fn start_with_nofile(config: &str, nofile: u64) -> Proxy {
    let dir = tempdir::Dir::new("nofile");
    let cfg = dir.path().join("eval.toml");
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: 20000,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Proxy::spawn(cmd, dir)
}

#[test]
fn out_of_fds_accept_backs_off_live_sessions_go_on_and_service_recovers() {
    let conman = echo_conman();
    let proxy = start_with_nofile(&config_for(conman.local_addr, "[listen]\nshards = 1\n"), 64);
    let pid = proxy.child.id();
    let mut live = connect(&proxy.url(&dev_token("live")));
    echo(&mut live, "before");
    let extra: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(proxy.listen).expect("connect (backlog)"))
        .collect();
    // The admin port is out of descriptors too: the log says when.
    wait_until("a failed accept", Duration::from_secs(10), || {
        proxy.log().contains("accept failed")
    });
    // The window in which old code spun at 100 % of a core.
    let (t0, cpu0) = (Instant::now(), cpu_ticks(pid));
    echo(&mut live, "during");
    // Longer than the key directory's poll interval (2 s).
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid) - cpu0;
    let wall_ticks = t0.elapsed().as_millis() as u64 / 10;
    echo(&mut live, "still");
    assert!(
        ticks * 4 < wall_ticks,
        "proxy used {ticks} of {wall_ticks} ticks while out of descriptors"
    );
    let log = proxy.log();
    let lines = log.lines().filter(|l| l.contains("accept failed")).count();
    // One line per interval from the shard, one from the admin port.
    assert!((1..=3).contains(&lines), "{lines} accept warnings:\n{log}");
    assert!(!log.contains("key reload failed"), "{log}");

    drop(extra);
    set_nofile(pid, 20000);
    wait_until("a new session", Duration::from_secs(10), || {
        let req = tungstenite::client::IntoClientRequest::into_client_request(
            proxy.url(&dev_token("after")),
        )
        .unwrap();
        match tungstenite::connect(req) {
            Ok((mut ws, _)) => {
                echo(&mut ws, "after");
                true
            }
            Err(_) => false,
        }
    });
    echo(&mut live, "end");
    let errors = proxy.metric("eval_accept_errors_total", &[]);
    assert!(
        (1.0..=30.0).contains(&errors),
        "{errors} accept errors: not counted, or not backing off"
    );
}

#[test]
fn conman_dial_without_a_descriptor_is_the_proxys_fault_1011() {
    let conman = echo_conman();
    let proxy = Proxy::start(
        &config_for(conman.local_addr, "[listen]\nshards = 1\n"),
        &[],
    );
    let pid = proxy.child.id();
    // Room for the client's socket, none for Conman's: a new descriptor
    // takes the lowest free number, so the limit is that number plus one.
    // (Not the count plus one: descriptors above a hole, such as an
    // inherited jobserver pipe, leave more than one number free. The count
    // used to work only while the admin thread sat in a blocking accept(2),
    // which holds a free number for the descriptor it will return; the
    // admin loop now polls, so it holds none.)
    set_nofile(pid, lowest_free_fd(pid) + 1);
    let mut ws = connect(&proxy.url(&dev_token("r")));
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 1011);
            assert_eq!(&*f.reason, "stage=conman_connect;reason=out_of_fds");
        }
        other => panic!("{other:?}"),
    }
    set_nofile(pid, 20000);
    let failures = proxy.metric(
        "eval_session_setup_failures_total",
        &["stage=\"conman_connect\"", "reason=\"out_of_fds\""],
    );
    assert_eq!(failures, 1.0);
}

/// Issue 11, provided buffers: 5,000 sessions send at once through a shard
/// whose ring has 64 buffers of 4 KiB (256 KiB for 5,000 sockets). Receives
/// that find the ring empty wait and are re-armed as buffers come back:
/// loadgen checks every echo byte for byte and in order (exit 0), the
/// stalls are counted, and a new session echoes afterwards.
#[test]
fn five_thousand_sessions_on_a_tiny_ring_lose_nothing() {
    let conns: usize = std::env::var("RING_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let backend = Listening::echo_server();
    let addr = backend.addr();
    let proxy = Proxy::start(
        &config_for(
            addr,
            "[listen]\nshards = 1\n\n[buffers]\ncount = 64\nsize = 4096\n\n\
             [limits]\nconnect_timeout_ms = 30000\nsetup_timeout_ms = 60000\n",
        ),
        &[],
    );
    // 3,000-byte messages straddle the 4 KiB buffers, so frames are split
    // across receives (and held whole) all the time.
    let out = Command::new(loadgen())
        .args(["echo", "--url", &format!("ws://{}/wsv2/", proxy.listen)])
        .args(["--token-per-conn", "--dev-key", "--json"])
        .args(["--conns", &conns.to_string(), "--size", "3000"])
        .args(["--pipeline", "2", "--messages", &(conns * 4).to_string()])
        .args([
            "--max-connecting",
            "128",
            "--timeout",
            "60s",
            "--connect-timeout",
            "60s",
        ])
        .output()
        .unwrap();
    drop(backend);
    assert!(
        out.status.success(),
        "loadgen: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stalls = proxy.metric("eval_buffer_ring_exhausted_total", &[]);
    eprintln!(
        "{conns} sessions, ring stalls {stalls}: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        stalls > 0.0,
        "the ring never ran dry: the test proves nothing"
    );
    assert_eq!(
        proxy.metric("eval_sessions_established_total", &[]),
        conns as f64
    );
}
