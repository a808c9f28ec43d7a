//! Sockets for many clients on one host: the open-files limit, source
//! addresses spread over 127.0.0.0/8, non-blocking connect.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Descriptors a process keeps for itself (epoll, timerfd, stdio, the
/// listener, threads' odds and ends) on top of one per connection.
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft open-files limit to the hard one and returns it.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit read just above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Hands out client source addresses `127.A.B.C`, where `A` is per thread,
/// so that every (source, destination) pair has a whole ephemeral port range
/// to itself: a handshake storm leaves tens of thousands of sockets in
/// TIME_WAIT, more than one source address has ports for.
#[derive(Debug)]
pub struct SourceAddrs {
    enabled: bool,
    second_octet: u8,
    next: u32,
}

/// Host parts per thread: B in 0..=255, C in 1..=254 (no .0 or .255, which
/// look like network and broadcast addresses to some tools).
const HOSTS_PER_THREAD: u32 = 256 * 254;

impl SourceAddrs {
    /// Spreading only applies when the target itself is on IPv4 loopback;
    /// elsewhere a 127.x source could not reach it.
    pub fn new(target: SocketAddr, thread: usize, spread: bool) -> Self {
        let enabled = spread && matches!(target, SocketAddr::V4(v4) if v4.ip().is_loopback());
        Self {
            enabled,
            second_octet: 1 + (thread % 254) as u8,
            next: 0,
        }
    }

    pub fn next_addr(&mut self) -> Option<Ipv4Addr> {
        if !self.enabled {
            return None;
        }
        let n = self.next % HOSTS_PER_THREAD;
        self.next = self.next.wrapping_add(1);
        let b = (n / 254) as u8;
        let c = (n % 254) as u8 + 1;
        Some(Ipv4Addr::new(127, self.second_octet, b, c))
    }
}

/// Starts a non-blocking connect from `source` (any address if `None`).
/// The connection is established when the socket turns writable.
pub fn start_connect(
    target: SocketAddr,
    source: Option<Ipv4Addr>,
) -> io::Result<mio::net::TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(mio::net::TcpStream::from_std(socket.into()))
}

/// Defers the choice of source port from bind() to connect(), where the
/// kernel can reuse a port already taken towards other destinations.
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is open for the lifetime of `socket`; the option value
    // points to a live c_int whose size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A listener for `addr` with `SO_REUSEPORT`, so each echo-server thread can
/// own one and the kernel spreads connections over them.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    // The kernel caps this at net.core.somaxconn.
    socket.listen(65535)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_skip_network_and_broadcast_and_wrap() {
        let target: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let mut src = SourceAddrs::new(target, 0, true);
        assert_eq!(src.next_addr(), Some(Ipv4Addr::new(127, 1, 0, 1)));
        for _ in 1..254 {
            src.next_addr();
        }
        assert_eq!(src.next_addr(), Some(Ipv4Addr::new(127, 1, 1, 1)));
        for _ in 255..HOSTS_PER_THREAD {
            src.next_addr();
        }
        assert_eq!(src.next_addr(), Some(Ipv4Addr::new(127, 1, 0, 1)));
    }

    #[test]
    fn no_spreading_off_loopback_or_when_disabled() {
        let loopback: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let v6: SocketAddr = "[::1]:9".parse().expect("addr");
        assert_eq!(SourceAddrs::new(loopback, 3, false).next_addr(), None);
        assert_eq!(SourceAddrs::new(v6, 3, true).next_addr(), None);
        assert_eq!(
            SourceAddrs::new(loopback, 3, true).next_addr(),
            Some(Ipv4Addr::new(127, 4, 0, 1))
        );
    }
}
