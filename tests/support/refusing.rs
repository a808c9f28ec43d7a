//! An address that refuses connections, shared by `support` and
//! `control_support`.

use std::fmt;
use std::net::{SocketAddr, TcpStream};

/// A loopback address that refuses connections for as long as this value
/// lives: a socket is bound to the port and never listens, so a connect is
/// refused and no other test, in this process or another, can take the
/// port meanwhile (a bound port is also never handed out for an outgoing
/// connection). Keep it in a variable for the whole test:
/// `refusing_addr().addr` in an expression frees the port at the end of
/// that statement.
#[must_use = "the address refuses connections only while this lives"]
pub struct RefusingAddr {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

pub fn refusing_addr() -> RefusingAddr {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let err = TcpStream::connect(addr).expect_err("a bound socket that never listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}");
    RefusingAddr {
        addr,
        _socket: socket,
    }
}

impl fmt::Display for RefusingAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}
