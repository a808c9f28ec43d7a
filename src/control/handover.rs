//! Listener handover: a running proxy gives its listening sockets to a new
//! binary (`eval-proxy --takeover`) over a Unix socket, so an upgrade never
//! refuses a connect: both processes hold the *same* sockets (the same
//! accept queues), the new one accepts on them before the old one stops,
//! and nothing is queued on a socket that closes.
//!
//! The exchange, one line each way (`\n`-terminated), on
//! `lifecycle.handover_socket` (mode 0600; the peer must be our user or
//! root, checked with `SO_PEERCRED`):
//!
//! ```text
//! new → old  HELLO listen=ADDR shards=N admin=ADDR|off     (the new config)
//! old → new  FDS pid=P n=N admin=0|1                      + SCM_RIGHTS: N listeners [+ admin]
//!        or  ERR message                                  (incompatible: the new process exits 2)
//! new → old  READY                                         (its shards run, it printed `ready`)
//! old → new  OK                                            (it drains: stops accepting at once)
//! ```
//!
//! The new process then binds the handover socket itself, for the next
//! upgrade. If the new process dies before `READY`, the old one goes on as
//! if nothing happened. After `OK` the same connection carries the old
//! process's live sessions (`handover.move_sessions`; `shard::handoff`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::drain::{DrainPhase, Lifecycle, Request};
use crate::shard::handoff::Hub;

/// Most listening sockets one handover carries (shards plus admin).
pub const MAX_FDS: usize = 256;
/// How long either side waits for the other's next line. The new process
/// starts its shards between `FDS` and `READY`: seconds at most.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What must match between the two processes for a handover: the new one
/// serves exactly the sockets the old one has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub listen: SocketAddr,
    pub shards: usize,
    /// The configured admin address, if the admin listener is on.
    pub admin: Option<SocketAddr>,
}

impl Hello {
    pub fn encode(&self) -> String {
        let admin = self.admin.map_or("off".to_string(), |a| a.to_string());
        format!(
            "HELLO listen={} shards={} admin={admin}\n",
            self.listen, self.shards
        )
    }

    pub fn decode(line: &str) -> Option<Hello> {
        let mut it = line.trim_end().strip_prefix("HELLO ")?.split(' ');
        let listen = it.next()?.strip_prefix("listen=")?.parse().ok()?;
        let shards = it.next()?.strip_prefix("shards=")?.parse().ok()?;
        let admin = match it.next()?.strip_prefix("admin=")? {
            "off" => None,
            a => Some(a.parse().ok()?),
        };
        Some(Hello {
            listen,
            shards,
            admin,
        })
    }

    /// Why `new` cannot take over from `self`, if it cannot.
    pub fn incompatible(&self, new: &Hello) -> Option<String> {
        if self.listen != new.listen {
            return Some(format!(
                "the running proxy listens on {} (listen.addr), the new config on {}",
                self.listen, new.listen
            ));
        }
        if self.shards != new.shards {
            return Some(format!(
                "the running proxy has {} shards (listen.shards), the new config {}; \
                 each shard owns one listening socket",
                self.shards, new.shards
            ));
        }
        None
    }
}

/// Sockets received from the old process.
pub struct Received {
    pub listeners: Vec<OwnedFd>,
    pub admin: Option<OwnedFd>,
    pub old_pid: u32,
    conn: UnixStream,
}

impl Received {
    /// Tells the old process we are ready and waits until it drains; the
    /// connection then carries its live sessions (`shard::handoff`).
    pub fn confirm(self) -> io::Result<(u32, UnixStream)> {
        let mut conn = self.conn;
        conn.write_all(b"READY\n")?;
        let line = read_line(&mut conn)?;
        if line.trim_end() != "OK" {
            return Err(io::Error::other(format!(
                "old process answered {line:?} to READY"
            )));
        }
        Ok((self.old_pid, conn))
    }
}

/// The outcome of asking for a handover.
pub enum Takeover {
    /// Nobody answered on the socket: start normally.
    NoOldProcess(String),
    Got(Received),
}

/// `eval-proxy --takeover`: asks the process on `path` for its sockets.
/// An incompatible config is `InvalidInput` (exit 2).
pub fn take_over(path: &Path, hello: &Hello) -> io::Result<Takeover> {
    let mut conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Takeover::NoOldProcess(format!("{}: {e}", path.display())));
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    conn.set_read_timeout(Some(STEP_TIMEOUT))?;
    conn.write_all(hello.encode().as_bytes())?;
    let (line, mut fds) = recv_with_fds(&conn)?;
    if let Some(msg) = line.strip_prefix("ERR ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("takeover refused: {}", msg.trim_end()),
        ));
    }
    let bad = || io::Error::other(format!("bad handover answer {line:?}"));
    let mut it = line
        .trim_end()
        .strip_prefix("FDS ")
        .ok_or_else(bad)?
        .split(' ');
    let field = |v: Option<&str>, k: &str| -> Option<u64> { v?.strip_prefix(k)?.parse().ok() };
    let old_pid = field(it.next(), "pid=").ok_or_else(bad)? as u32;
    let n = field(it.next(), "n=").ok_or_else(bad)? as usize;
    let admin = field(it.next(), "admin=").ok_or_else(bad)? == 1;
    if fds.len() != n + usize::from(admin) {
        return Err(io::Error::other(format!(
            "handover carried {} descriptors, announced {n} + admin {admin}",
            fds.len()
        )));
    }
    let admin = admin.then(|| fds.pop()).flatten();
    Ok(Takeover::Got(Received {
        listeners: fds,
        admin,
        old_pid,
        conn,
    }))
}

/// Binds the handover socket (0600) and serves one takeover on its own
/// thread; `None` (with a warning) when the socket cannot be had: the
/// proxy runs on, without handover.
/// The sockets handed over are the lifecycle's spares
/// ([`Lifecycle::keep_spares`]); `hello` is this process's config.
pub fn serve(
    path: PathBuf,
    hello: Hello,
    lc: Arc<Lifecycle>,
    hub: Arc<Hub>,
) -> Option<std::thread::JoinHandle<()>> {
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), err = %e, "no handover socket: upgrades cannot take the listeners over");
            return None;
        }
    };
    info!(path = %path.display(), "handover socket ready");
    std::thread::Builder::new()
        .name("eval-handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(err = %e, "handover accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match handle(conn, &hello, &lc) {
                    Ok(Some(conn)) => {
                        // The new process owns the path now: leave it.
                        // Its connection carries the live sessions next.
                        if hub.enabled {
                            crate::shard::handoff::move_out(conn, &hub);
                        }
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => warn!(err = %e, "handover attempt failed; serving on"),
                }
                if lc.phase() >= DrainPhase::Draining {
                    let _ = std::fs::remove_file(&path);
                    return;
                }
            }
        })
        .ok()
}

/// One takeover attempt; the connection once the new process has the
/// sockets and this one drains.
fn handle(mut conn: UnixStream, hello: &Hello, lc: &Lifecycle) -> io::Result<Option<UnixStream>> {
    let (uid, pid) = peer_cred(&conn)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if uid != me && uid != 0 {
        warn!(uid, pid, "handover refused: peer is another user");
        conn.write_all(b"ERR the running proxy belongs to another user\n")?;
        return Ok(None);
    }
    conn.set_read_timeout(Some(STEP_TIMEOUT))?;
    let line = read_line(&mut conn)?;
    let Some(new) = Hello::decode(&line) else {
        conn.write_all(b"ERR bad HELLO\n")?;
        return Ok(None);
    };
    if let Some(why) = hello.incompatible(&new) {
        warn!(pid, %why, "handover refused: incompatible config");
        conn.write_all(format!("ERR {why}\n").as_bytes())?;
        return Ok(None);
    }
    let my_pid = std::process::id();
    // Under the spares' lock, so a drain cannot close them mid-send.
    let sent = lc.with_spares(|spares| {
        let admin = match (&spares.admin, new.admin == hello.admin) {
            (Some(a), true) => Some(a.as_raw_fd()),
            _ => None,
        };
        let mut fds: Vec<RawFd> = spares.listeners.iter().map(|f| f.as_raw_fd()).collect();
        fds.extend(admin);
        let head = format!(
            "FDS pid={my_pid} n={} admin={}\n",
            spares.listeners.len(),
            u8::from(admin.is_some())
        );
        send_with_fds(&conn, head.as_bytes(), &fds).map(|()| admin.is_some())
    });
    let Some(sent) = sent else {
        conn.write_all(
            b"ERR the running proxy is already draining; start normally once it is gone\n",
        )?;
        return Ok(None);
    };
    let admin = sent?;
    info!(pid, "listening sockets sent; waiting for the new process");
    let line = read_line(&mut conn)?;
    if line.trim_end() != "READY" {
        return Err(io::Error::other(format!("new process said {line:?}")));
    }
    if admin {
        // The new process answers /readyz on the same socket from now on.
        lc.stop_admin();
    }
    lc.request(Request::HandedOver);
    conn.write_all(b"OK\n")?;
    info!(
        pid,
        "handed over: the new process serves the port; draining"
    );
    Ok(Some(conn))
}

/// Binds `path` with mode 0600, replacing a stale socket nobody answers
/// on, never a live one.
fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process answers on it",
        ));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    // Peers are checked too (SO_PEERCRED); the mode keeps others from
    // even connecting.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Binds `path` for the next upgrade after a takeover: the old process's
/// socket file is replaced (it no longer serves it).
pub fn serve_after_takeover(
    path: PathBuf,
    hello: Hello,
    lc: Arc<Lifecycle>,
    hub: Arc<Hub>,
) -> Option<std::thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(&path);
    serve(path, hello, lc, hub)
}

fn peer_cred(conn: &UnixStream) -> io::Result<(u32, i32)> {
    // SAFETY: ucred is plain data; all-zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a local of
    // exactly that size.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

/// Reads one `\n`-terminated line, byte by byte, so that nothing after it
/// (a message carrying descriptors) is consumed.
pub fn read_line(conn: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        if conn.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "handover peer closed",
            ));
        }
        line.push(b[0]);
        if line.len() > 4096 {
            return Err(io::Error::other("handover line too long"));
        }
    }
    String::from_utf8(line).map_err(|_| io::Error::other("handover line not UTF-8"))
}

/// Sends `data` with `fds` attached (SCM_RIGHTS) in one message.
pub fn send_with_fds(conn: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 elements: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid (no name, no flags).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is `space` bytes, aligned, and holds
        // exactly one header with `fd_bytes` of data (CMSG_SPACE), so the
        // first header and its data are inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                fd_bytes as usize,
            );
        }
    }
    // SAFETY: every pointer in `msg` refers to locals that outlive the call.
    let r = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r as usize != data.len() {
        return Err(io::Error::other("handover message sent in part"));
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it (close-on-exec).
pub fn recv_with_fds(conn: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut data = vec![0u8; 4096];
    let (n, fds) = recv_fds_into(conn, &mut data)?;
    data.truncate(n);
    let mut text = String::from_utf8(data).map_err(|_| io::Error::other("not UTF-8"))?;
    // The line may continue in a later read (a stream socket).
    if !text.ends_with('\n') && n > 0 {
        let mut r = BufReader::new(conn);
        r.read_line(&mut text)?;
    }
    Ok((text, fds))
}

/// One recvmsg(2) into `data`: the bytes read and the descriptors that
/// came with them (close-on-exec, at most [`MAX_FDS`]).
pub fn recv_fds_into(conn: &UnixStream, data: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: every pointer in `msg` refers to locals of the sizes given.
    let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with
    // well-formed headers; CMSG_FIRSTHDR/NXTHDR stay inside them, and each
    // SCM_RIGHTS payload is an array of descriptors now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("handover descriptors truncated"));
    }
    Ok((n as usize, fds))
}

/// The pid of another process listening on `addr`'s port (TCP, LISTEN),
/// from `/proc/net/tcp{,6}` and `/proc/PID/fd`; `None` if not found.
pub fn who_listens(addr: SocketAddr) -> Option<u32> {
    let port = format!("{:04X}", addr.port());
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is f[1] (HEXIP:PORT), st is f[3], inode f[9].
            if f.len() > 9 && f[3] == "0A" && f[1].rsplit(':').next() == Some(port.as_str()) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let me = std::process::id();
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_names_what_differs() {
        let h = Hello {
            listen: "127.0.0.1:8080".parse().unwrap(),
            shards: 4,
            admin: Some("127.0.0.1:9090".parse().unwrap()),
        };
        assert_eq!(Hello::decode(&h.encode()), Some(h.clone()));
        let off = Hello {
            admin: None,
            ..h.clone()
        };
        assert_eq!(Hello::decode(&off.encode()), Some(off.clone()));
        assert_eq!(h.incompatible(&off), None, "admin may differ");
        let other = Hello {
            listen: "127.0.0.1:8081".parse().unwrap(),
            ..h.clone()
        };
        assert!(h.incompatible(&other).unwrap().contains("127.0.0.1:8081"));
        let fewer = Hello {
            shards: 2,
            ..h.clone()
        };
        assert!(h.incompatible(&fewer).unwrap().contains("shards"));
        assert_eq!(Hello::decode("HELLO listen=x shards=1 admin=off"), None);
    }

    #[test]
    fn descriptors_cross_a_socketpair_and_still_name_the_same_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        send_with_fds(&a, b"FDS pid=1 n=1 admin=0\n", &[l.as_raw_fd()]).unwrap();
        let (line, fds) = recv_with_fds(&b).unwrap();
        assert_eq!(line, "FDS pid=1 n=1 admin=0\n");
        assert_eq!(fds.len(), 1);
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
        // Same socket, same queue: a connect is accepted through the copy.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        drop(l);
        assert!(got.accept().is_ok());
    }

    #[test]
    fn the_listener_of_a_port_is_found_by_pid() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Our own process is skipped (a second instance asks about others).
        assert_eq!(who_listens(l.local_addr().unwrap()), None);
    }
}
