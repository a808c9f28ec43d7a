//! Public listeners: one SO_REUSEPORT socket per shard, so the kernel spreads
//! connections across shards with no shared accept queue.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

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

/// A non-blocking TCP socket for a Conman connection, Nagle off.
pub fn conman_socket(addr: &SocketAddr) -> io::Result<RawFd> {
    let s = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_nodelay(true)?;
    Ok(s.into_raw_fd())
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

    #[test]
    fn port_zero_gives_every_shard_the_same_port() {
        let (socks, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        for s in &socks {
            assert_eq!(s.local_addr().unwrap().as_socket().unwrap(), addr);
        }
    }
}
