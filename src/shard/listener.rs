//! Public listeners: one SO_REUSEPORT socket per shard, so the kernel spreads
//! connections across shards with no shared accept queue.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, IntoRawFd, RawFd};
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

/// A non-blocking TCP socket for a Conman connection, Nagle off, with the
/// configured TCP keepalive.
pub fn conman_socket(addr: &SocketAddr, k: &KeepaliveConfig) -> io::Result<RawFd> {
    let s = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_nodelay(true)?;
    set_keepalive(SockRef::from(&s), k)?;
    Ok(s.into_raw_fd())
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

/// [`set_keepalive`] on a listening socket the shard owns by descriptor.
pub fn set_keepalive_fd(fd: RawFd, k: &KeepaliveConfig) -> io::Result<()> {
    // SAFETY: the shard's listener, open for the shard's life; borrowed
    // only for these calls.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    set_keepalive(SockRef::from(&fd), k)
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
        let fd = conman_socket(&addr, &KeepaliveConfig::default()).unwrap();
        // SAFETY: the socket just created, owned from here on.
        let s = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(75)));
        let off = KeepaliveConfig {
            tcp_keepalive: false,
            tcp_user_timeout_ms: 0,
            ..KeepaliveConfig::default()
        };
        let fd = conman_socket(&addr, &off).unwrap();
        // SAFETY: as above.
        let s = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn port_zero_gives_every_shard_the_same_port() {
        let (socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        for s in &socks {
            assert_eq!(s.local_addr().unwrap().as_socket().unwrap(), addr);
        }
    }
}
