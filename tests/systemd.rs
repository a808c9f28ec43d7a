//! systemd integration (issue 9, item 3), simulated as systemd does it:
//! socket activation hands the proxy its listening socket as descriptor 3
//! with `LISTEN_FDS` / `LISTEN_PID`, and `Type=notify` units learn of
//! readiness (and the main pid) on `NOTIFY_SOCKET`.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use support::*;

/// `bin()` started through `sh`, so that `LISTEN_PID` can name the pid
/// that `exec` keeps, with `listener` as descriptor 3.
fn activated(
    listener: &std::net::TcpListener,
    cfg: &std::path::Path,
    notify: &std::path::Path,
) -> Command {
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\""])
        .arg(bin())
        .arg("--config")
        .arg(cfg)
        .args(["--admin", "127.0.0.1:0", "--shards", "2"])
        .env("NOTIFY_SOCKET", notify)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; between fork and exec it only
    // places the listener at descriptor 3 (without close-on-exec), as
    // systemd does.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn a_socket_activated_proxy_serves_on_the_socket_systemd_passed_and_notifies() {
    let conman = echo_conman();
    let dir = tempdir::Dir::new("systemd");
    let cfg = dir.path().join("eval.toml");
    std::fs::write(
        &cfg,
        config_for(
            conman.local_addr,
            // No handover socket: listen.addr keeps its default fixed
            // port here, whose default socket would be under /run.
            "[drain]\nreadiness_delay_s = 0.2\nclose_spread_s = 0.2\n\n\
             [lifecycle]\nhandover_socket = \"\"\n",
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut proxy = Proxy::spawn(
        activated(&listener, &cfg, &notify_path),
        tempdir::Dir::new("systemd-proxy"),
    );
    // The socket systemd would keep is the one served: both shards on it.
    drop(listener);
    assert_eq!(proxy.listen, addr);
    for _ in 0..20 {
        assert_eq!(try_echo(addr, &dev_token("r1"), WAIT), Attempt::Served);
    }
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        format!("READY=1\nMAINPID={}", proxy.child.id())
    );
    proxy.signal(libc::SIGTERM);
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(proxy.wait_exit().code(), Some(0));
}

#[test]
fn listen_fds_meant_for_another_process_are_ignored() {
    let conman = echo_conman();
    // LISTEN_PID names someone else: a normal start on a port of its own.
    let mut cmd = Command::new(bin());
    cmd.args(["--dev", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--conman", &format!("ws://{}/", conman.local_addr)])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut proxy = Proxy::spawn(cmd, tempdir::Dir::new("not-ours"));
    assert_ne!(proxy.listen.port(), 0);
    // A second signal skips --dev's 10 s readiness delay (once the first
    // was taken: pending signals of one kind coalesce).
    proxy.signal(libc::SIGTERM);
    wait_until("readyz 503", WAIT, || proxy.admin_get("/readyz").0 == 503);
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit().code(), Some(0));
}
