//! Sans-IO protocol code: bytes and `now` in, decisions out. Nothing here
//! touches a socket or reads a clock.
#![forbid(unsafe_code)]

pub mod close;
pub mod frame;
pub mod handshake;
pub mod http1;
pub mod proxy_header;
pub mod relay;
pub mod tls_record;
pub mod url;
