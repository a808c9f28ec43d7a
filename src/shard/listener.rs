//! Public listeners: one SO_REUSEPORT socket per shard, so the kernel spreads
//! connections across shards with no shared accept queue.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::KeepaliveConfig;

/// Binds `count` sockets to `addr`. With port 0 the first socket picks the
/// port and the others join it, so every shard serves the same port.
pub fn bind_all(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
) -> io::Result<(Vec<Socket>, SocketAddr)> {
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener on Linux,
        // which saves a setsockopt per connection.
        s.set_nodelay(true)?;
        s.set_cloexec(true)?;
        s.bind(&bound.into())?;
        s.listen(backlog.min(i32::MAX as u32) as i32)?;
        if bound.port() == 0 {
            bound = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listener has no inet address"))?;
        }
        out.push(s);
    }
    Ok((out, bound))
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Sockets passed by systemd socket activation (`sd_listen_fds(3)`):
/// `LISTEN_PID` names this process and `LISTEN_FDS` counts the descriptors
/// from 3 on. `None` when the variables are absent or meant for another
/// process. The variables are removed, so no child takes them for its own.
/// Other threads may already run (`--dev` starts its fakes first): std's
/// environment lock orders this with their `std::env` calls, and none of
/// them reads the environment through libc's `getenv` directly.
pub fn systemd_fds() -> io::Result<Option<Vec<OwnedFd>>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=1024).contains(n))
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("LISTEN_FDS={count:?}"))
        })?;
    let mut out = Vec::with_capacity(n as usize);
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n {
        let mut listening: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt on a descriptor number systemd says is ours;
        // it writes at most `len` bytes into a local of that size, and
        // fails cleanly if `fd` is not a socket.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut listening as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 || listening == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("LISTEN_FDS: descriptor {fd} is not a listening socket"),
            ));
        }
        // SAFETY: systemd passed us this descriptor (LISTEN_PID is our
        // pid) and nothing else in the process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        out.push(owned);
    }
    Ok(Some(out))
}

/// The address a listening socket is bound to.
pub fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    socket2::SockRef::from(fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no inet address"))
}

/// Fails when another socket already listens on `addr` (which our
/// SO_REUSEPORT bind would silently join): a probe bind without
/// SO_REUSEPORT is refused exactly then. Port 0 never conflicts.
pub fn already_served(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    let Ok(s) = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) else {
        return false;
    };
    let _ = s.set_reuse_address(true);
    matches!(s.bind(&addr.into()), Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE))
}

/// One listener per shard from `fds`: the same socket shared by every
/// shard when there is one (their accepts take turns on its queue), else
/// one each.
pub fn spread_over_shards(fds: Vec<OwnedFd>, shards: usize) -> io::Result<Vec<OwnedFd>> {
    match fds.len() {
        n if n == shards => Ok(fds),
        1 => {
            let mut out = Vec::with_capacity(shards);
            for _ in 1..shards {
                out.push(fds[0].try_clone()?);
            }
            out.extend(fds);
            Ok(out)
        }
        n => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{n} listening sockets passed for {shards} shards: pass one, or one per shard \
                 (listen.shards)"
            ),
        )),
    }
}

/// Raw descriptors of `socks`, for code that wants `OwnedFd`s.
pub fn into_owned(socks: Vec<Socket>) -> Vec<OwnedFd> {
    socks.into_iter().map(OwnedFd::from).collect()
}

/// Accepts every connection already queued on `listener`, without
/// blocking, so that closing it afterwards loses none (close(2) resets
/// whatever is still in the queue). Stops at `EAGAIN`, or at another error,
/// which it returns beside what it took.
pub fn take_queued(listener: RawFd) -> (Vec<RawFd>, Option<io::Error>) {
    // SAFETY: fcntl on a listener the caller owns. O_NONBLOCK is on the
    // shared open file: harmless to anyone else accepting on it (io_uring
    // polls for readiness), and the loop below must not block.
    unsafe {
        let fl = libc::fcntl(listener, libc::F_GETFL);
        libc::fcntl(listener, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let mut out = Vec::new();
    loop {
        // SAFETY: accept4 on the caller's listener; no address is asked for.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd >= 0 {
            out.push(fd);
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => return (out, None),
            Some(libc::EINTR | libc::ECONNABORTED) => continue,
            _ => return (out, Some(err)),
        }
    }
}

/// A non-blocking TCP socket for a Conman connection. With `opts`, also
/// Nagle off and, given `keepalive`, the configured TCP keepalive, a
/// setsockopt(2) each; a shard whose ring can set options passes `false`
/// and puts [`conman_sockopts`] in the ring instead, ahead of the connect.
pub fn conman_socket(
    addr: &SocketAddr,
    keepalive: Option<&KeepaliveConfig>,
    opts: bool,
    congestion: Option<&str>,
) -> io::Result<RawFd> {
    let s = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    if let Some(cc) = congestion {
        // Checked at start (`check_congestion`); should it fail now (a
        // module unloaded since), the kernel's default serves the session
        // no worse than without the setting.
        let _ = s.set_tcp_congestion(cc.as_bytes());
    }
    if opts {
        s.set_nodelay(true)?;
        if let Some(k) = keepalive {
            set_keepalive(SockRef::from(&s), k)?;
        }
    }
    Ok(s.into_raw_fd())
}

/// Most options [`conman_sockopts`] gives.
pub const CONMAN_SOCKOPTS: usize = 6;

/// One socket option: level, name, value.
pub type SockOpt = (libc::c_int, libc::c_int, libc::c_int);

/// What [`conman_socket`] with `opts` sets, as (level, name, value), for a
/// shard that sets them through its ring; `len` of them are used.
pub fn conman_sockopts(keepalive: Option<&KeepaliveConfig>) -> ([SockOpt; CONMAN_SOCKOPTS], usize) {
    let mut out = [(0, 0, 0); CONMAN_SOCKOPTS];
    let mut n = 0;
    let mut add = |o: SockOpt| {
        out[n] = o;
        n += 1;
    };
    let int = |v: u32| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
    add((libc::IPPROTO_TCP, libc::TCP_NODELAY, 1));
    let Some(k) = keepalive else {
        return (out, n);
    };
    if k.tcp_keepalive {
        add((libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1));
        add((libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, int(k.tcp_keepidle_s)));
        add((
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            int(k.tcp_keepintvl_s),
        ));
        add((libc::IPPROTO_TCP, libc::TCP_KEEPCNT, int(k.tcp_keepcnt)));
    }
    if k.tcp_user_timeout_ms > 0 {
        add((
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            int(k.tcp_user_timeout_ms),
        ));
    }
    (out, n)
}

/// SO_KEEPALIVE (with its idle time, interval and count) and
/// TCP_USER_TIMEOUT as configured. Set on a listening socket, they are
/// inherited by every socket it accepts (Linux copies them at accept), so
/// client sockets cost no setsockopt each.
pub fn set_keepalive(s: SockRef<'_>, k: &KeepaliveConfig) -> io::Result<()> {
    if k.tcp_keepalive {
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(u64::from(k.tcp_keepidle_s)))
            .with_interval(Duration::from_secs(u64::from(k.tcp_keepintvl_s)))
            .with_retries(k.tcp_keepcnt);
        s.set_tcp_keepalive(&ka)?;
    }
    if k.tcp_user_timeout_ms > 0 {
        s.set_tcp_user_timeout(Some(Duration::from_millis(u64::from(
            k.tcp_user_timeout_ms,
        ))))?;
    }
    Ok(())
}

/// [`set_keepalive`] on a socket the shard owns by descriptor: a listener,
/// or a session's Conman socket (`Op::TcpKeepalive`).
pub fn set_keepalive_fd(fd: RawFd, k: &KeepaliveConfig) -> io::Result<()> {
    // SAFETY: borrowed only for these calls, of a socket open now: a
    // listener lives as long as its shard; a session asks for this only
    // while its socket is open, and the shard performs a session's ops in
    // order, so its `Op::Close` of that socket comes after.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    set_keepalive(SockRef::from(&fd), k)
}

/// `TCP_DEFER_ACCEPT` on a listening socket the shard owns: a connection
/// is accepted once its first bytes arrive (or, if none come, after about
/// `secs`), so a shard is not woken for an accept and again for the
/// request. 0 turns it off.
pub fn set_defer_accept_fd(fd: RawFd, secs: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: TCP_DEFER_ACCEPT takes one c_int, and holds no pointer.
    unsafe { setsockopt_fd(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, &v) }
}

/// setsockopt(2) of option `name` at `level` to `*value` on socket `fd`,
/// which the caller keeps open for the call.
///
/// # Safety
/// `T` is the type the option takes, and every pointer inside `*value`
/// points to memory that lives through the call (the kernel copies what
/// it needs before returning).
unsafe fn setsockopt_fd<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live reference of exactly `size_of::<T>()`
    // bytes; the caller vouches for the option's type and its pointers.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches a socket filter to a listening socket that drops new
/// connection attempts (segments with SYN and without ACK) and lets
/// everything else through, so handshakes already under way still complete
/// into the accept queue. A shard closing its listener in a plain drain
/// does this first and keeps accepting for a moment: the queue then
/// empties for good before the close, instead of racing the close (the
/// kernel resets what completed between the last accept and the close).
/// A dropped SYN is sent again by the client after about a second, when
/// the port refuses it (or another listener of the group serves it).
pub fn refuse_new_connections(fd: RawFd) -> io::Result<()> {
    // Classic BPF run on the segment with `data` at the TCP header (the
    // filter of a TCP socket sees the transport header first): byte 13
    // holds the flags.
    let code = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 13,
        },
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0x12,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: 0x02,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        },
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: SO_ATTACH_FILTER takes a sock_fprog; the array it points to
    // is a live local, copied into the kernel during the call.
    unsafe { setsockopt_fd(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog) }
}

/// TCP congestion control `name` (`TCP_CONGESTION`) on a listening socket
/// the shard owns by descriptor; accepted sockets inherit it.
pub fn set_congestion_fd(fd: RawFd, name: &str) -> io::Result<()> {
    // SAFETY: the shard's listener, open for the shard's life; borrowed
    // only for this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    SockRef::from(&fd).set_tcp_congestion(name.as_bytes())
}

/// Whether this process may use congestion control `name`: tried on a
/// throwaway socket, so a typo or a module the kernel lacks stops the
/// start with the list of what it offers, rather than every session
/// silently running on the default.
pub fn check_congestion(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    // TCP_CA_NAME_MAX is 16, with the NUL.
    if name.is_empty() || name.len() > 15 || !name.chars().all(ok) {
        return Err(format!("{name:?} is not a congestion control name"));
    }
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("cannot make a socket to try {name:?}: {e}"))?;
    s.set_tcp_congestion(name.as_bytes()).map_err(|e| {
        let list = |f: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        format!(
            "{name:?} cannot be set ({e}); this kernel offers {}, of which unprivileged \
             processes may use {}",
            list("tcp_available_congestion_control"),
            list("tcp_allowed_congestion_control")
        )
    })
}

/// The peer's IP, for X-Forwarded-For.
pub fn peer_ip(fd: RawFd) -> Option<std::net::IpAddr> {
    // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buffers sized for any address family.
    let r = unsafe { libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    if r != 0 {
        return None;
    }
    // SAFETY: getpeername filled `len` bytes of a sockaddr_storage.
    let addr = unsafe { socket2::SockAddr::new(ss, len) };
    addr.as_socket().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_control_is_checked_and_set() {
        assert!(check_congestion("reno").is_ok());
        let e = check_congestion("nosuchcc").unwrap_err();
        assert!(e.contains("offers"), "{e}");
        for bad in ["", "a b", "sixteen_chars_xx", "x\0"] {
            assert!(check_congestion(bad).is_err(), "{bad:?}");
        }
        let fd = conman_socket(
            &"127.0.0.1:1".parse().unwrap(),
            Some(&KeepaliveConfig::default()),
            true,
            Some("reno"),
        )
        .unwrap();
        // SAFETY: the socket was just made and nothing else owns it.
        let s = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = SockRef::from(&s).tcp_congestion().unwrap();
        assert!(name.starts_with(b"reno\0"), "{name:?}");
    }

    /// With the filter on, a new connect is not answered (its SYN is
    /// dropped: neither accepted nor refused), while a connection whose
    /// handshake was done before is still queued and its bytes arrive.
    #[test]
    fn a_refusing_listener_drops_new_syns_and_keeps_what_it_has() {
        let (mut socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 1, 16).unwrap();
        let listener: std::net::TcpListener = socks.remove(0).into();
        let mut before = std::net::TcpStream::connect(addr).unwrap();
        refuse_new_connections(std::os::fd::AsRawFd::as_raw_fd(&listener)).unwrap();
        std::io::Write::write_all(&mut before, b"hi").unwrap();
        let e =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let (mut accepted, _) = listener.accept().unwrap();
        let mut got = [0u8; 2];
        std::io::Read::read_exact(&mut accepted, &mut got).unwrap();
        assert_eq!(&got, b"hi");
        listener.set_nonblocking(true).unwrap();
        let e = listener.accept().unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::WouldBlock,
            "only the first connect was queued"
        );
    }

    /// The shard relies on this instead of a setsockopt per connection.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let (mut socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 1, 16).unwrap();
        let listener: std::net::TcpListener = socks.remove(0).into();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY was not inherited");
    }

    /// Client sockets get their keepalive options this way, without a
    /// setsockopt per connection.
    #[test]
    fn accepted_sockets_inherit_keepalive_and_user_timeout() {
        let (mut socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 1, 16).unwrap();
        let k = KeepaliveConfig {
            tcp_keepidle_s: 17,
            tcp_keepintvl_s: 3,
            tcp_keepcnt: 4,
            tcp_user_timeout_ms: 4321,
            ..KeepaliveConfig::default()
        };
        set_keepalive(SockRef::from(&socks[0]), &k).unwrap();
        let listener: std::net::TcpListener = socks.remove(0).into();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(17));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(s.keepalive_retries().unwrap(), 4);
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(4321))
        );
    }

    #[test]
    fn conman_sockets_get_keepalive_unless_turned_off() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let fd = conman_socket(&addr, Some(&KeepaliveConfig::default()), true, None).unwrap();
        // SAFETY: the socket just created, owned from here on.
        let s = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(75)));
        let off = KeepaliveConfig {
            tcp_keepalive: false,
            tcp_user_timeout_ms: 0,
            ..KeepaliveConfig::default()
        };
        let fd = conman_socket(&addr, Some(&off), true, None).unwrap();
        // SAFETY: as above.
        let s = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
        // Deferred to the session's first liveness look: Nagle off only.
        let fd = conman_socket(&addr, None, true, None).unwrap();
        // SAFETY: as above.
        let s = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(s.nodelay().unwrap());
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
        set_keepalive_fd(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            &KeepaliveConfig::default(),
        )
        .unwrap();
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(75)));
    }

    #[test]
    fn one_passed_socket_is_shared_by_every_shard_and_a_wrong_count_refused() {
        let (socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 1, 16).unwrap();
        let shared = spread_over_shards(into_owned(socks), 3).unwrap();
        assert_eq!(shared.len(), 3);
        for s in &shared {
            assert_eq!(local_addr(s).unwrap(), addr);
        }
        let (two, _) = bind_all("127.0.0.1:0".parse().unwrap(), 2, 16).unwrap();
        let e = spread_over_shards(into_owned(two), 3).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    /// The drain's promise at the socket level: everything the kernel
    /// queued is taken before the close, so no queued client is reset.
    #[test]
    fn queued_connections_are_all_taken_before_the_close() {
        use std::io::Read;
        let (mut socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 1, 64).unwrap();
        let fd = socks.remove(0).into_raw_fd();
        let clients: Vec<_> = (0..20)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let (taken, err) = take_queued(fd);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(taken.len(), 20);
        // SAFETY: the listener, ours and no longer used.
        unsafe { libc::close(fd) };
        for mut c in clients {
            c.set_read_timeout(Some(std::time::Duration::from_millis(50)))
                .unwrap();
            // Alive (nothing to read yet), not reset by the close.
            let e = c.read(&mut [0u8; 1]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        }
        for t in taken {
            // SAFETY: accepted above, owned here.
            unsafe { libc::close(t) };
        }
    }

    #[test]
    fn a_served_address_is_seen_and_port_zero_never_is() {
        let (_socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 1, 16).unwrap();
        assert!(already_served(addr));
        assert!(!already_served("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn port_zero_gives_every_shard_the_same_port() {
        let (socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        for s in &socks {
            assert_eq!(s.local_addr().unwrap().as_socket().unwrap(), addr);
        }
    }
}
