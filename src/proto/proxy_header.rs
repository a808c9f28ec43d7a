//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, versions 1 and
//! 2) that an L4 load balancer writes at the start of each connection it
//! forwards, naming the client the connection came from.
//!
//! Sans-IO like `http1`: the caller keeps the bytes received so far and calls
//! [`parse`] again after every read. `Ok(None)` means "a prefix of a valid
//! header, send more" and consumes nothing; `Ok(Some(h))` says the header
//! took `h.len` bytes, and whatever follows is the request head.
//!
//! Decisions a reader might otherwise wonder about:
//! - A wrong byte is an error as soon as it arrives: a plain HTTP request
//!   (`GET /…`, sent to a listener that expects PROXY) fails on its first
//!   byte, not after the header deadline. Only a v1 line is waited for up to
//!   its 107-byte maximum, since its fields can only be read whole.
//! - v1: exactly the spec's grammar, single spaces, CRLF; for `UNKNOWN` the
//!   rest of the line is ignored, as the spec says. Ports are decimal
//!   0..=65535 without a sign.
//! - v2: the version nibble must be 2 and the command LOCAL or PROXY. LOCAL
//!   (the balancer's own connection, e.g. a health check) and the UNSPEC and
//!   UNIX families name no client IP: `source` is `None` and the caller keeps
//!   the TCP peer. INET and INET6 must be STREAM (this listener is TCP). The
//!   declared length is bounded by [`V2_MAX_BODY`] before any of the body is
//!   waited for, and everything past the addresses (TLVs: SSL, ALPN, cloud
//!   endpoint ids) is skipped unread: nothing here uses them.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included (`PROXY UNKNOWN` plus two IPv6
/// addresses and ports).
pub const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
/// Most bytes of addresses and TLVs a v2 header may declare. HAProxy sends
/// well under 300 even with every TLV it knows; cloud balancers add an
/// endpoint id of a few dozen bytes.
pub const V2_MAX_BODY: usize = 1024;

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client the balancer accepted: v1 TCP4/TCP6, v2 PROXY over
    /// INET/INET6. `None` where the header names no IP client (v1 UNKNOWN,
    /// v2 LOCAL, UNSPEC, UNIX); the connection's own peer stands.
    pub source: Option<SocketAddr>,
    /// Bytes the header took.
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol signature")]
    Missing,
    #[error("PROXY v1 line longer than 107 bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line")]
    V1Syntax,
    #[error("PROXY v2 version is not 2")]
    V2Version,
    #[error("PROXY v2 command is neither LOCAL nor PROXY")]
    V2Command,
    #[error("PROXY v2 address family or transport not supported")]
    V2Family,
    #[error("PROXY v2 length too short for its address family")]
    V2Short,
    #[error("PROXY v2 header declares more than 1024 bytes")]
    V2TooLong,
}

impl ProxyHeaderError {
    /// Metric label: a missing header (a client that reached the listener
    /// directly, or a balancer not configured to send one) is worth telling
    /// apart from a broken one.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Missing => "proxy_header_missing",
            _ => "proxy_header_malformed",
        }
    }
}

/// Parses a PROXY header from the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyHeaderError::Missing),
    }
}

/// Whether what has arrived agrees with `signature` so far.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    if !starts_like(buf, V1_PREFIX) {
        return Err(ProxyHeaderError::Missing);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    let line = match window[..lf].strip_suffix(b"\r") {
        Some(line) => std::str::from_utf8(line).map_err(|_| ProxyHeaderError::V1Syntax)?,
        None => return Err(ProxyHeaderError::V1Syntax),
    };
    let source = v1_source(line).ok_or(ProxyHeaderError::V1Syntax)?;
    Ok(Some(ProxyHeader {
        source,
        len: lf + 1,
    }))
}

/// `PROXY TCP4 src dst sport dport`, `TCP6` alike, or `UNKNOWN …`; the
/// outer `None` is a syntax error.
fn v1_source(line: &str) -> Option<Option<SocketAddr>> {
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return None;
    }
    let family = fields.next()?;
    if family == "UNKNOWN" {
        return Some(None);
    }
    let (src, dst, sport, dport) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    if fields.next().is_some() {
        return None;
    }
    // The destination is checked, not used: the listener knows its own.
    let src: IpAddr = match family {
        "TCP4" => {
            dst.parse::<Ipv4Addr>().ok()?;
            src.parse::<Ipv4Addr>().ok()?.into()
        }
        "TCP6" => {
            dst.parse::<Ipv6Addr>().ok()?;
            src.parse::<Ipv6Addr>().ok()?.into()
        }
        _ => return None,
    };
    v1_port(dport)?;
    Some(Some(SocketAddr::new(src, v1_port(sport)?)))
}

fn v1_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    if !starts_like(buf, V2_SIGNATURE) {
        return Err(ProxyHeaderError::Missing);
    }
    // Each check runs as soon as its byte is there.
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::V2Version);
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyHeaderError::V2Command),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // Bytes of addresses the family needs: INET, INET6, UNIX (each STREAM
    // only), or UNSPEC with none. LOCAL ignores the family altogether.
    let needs = match family {
        _ if local => 0,
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        0x31 => 216,
        _ => return Err(ProxyHeaderError::V2Family),
    };
    let Some(len) = buf.get(14..V2_FIXED) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len > V2_MAX_BODY {
        return Err(ProxyHeaderError::V2TooLong);
    }
    if len < needs {
        return Err(ProxyHeaderError::V2Short);
    }
    let Some(body) = buf.get(V2_FIXED..V2_FIXED + len) else {
        return Ok(None);
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let source = match family {
        _ if local => None,
        0x11 => {
            let ip: [u8; 4] = body[..4].try_into().expect("4 bytes");
            Some(SocketAddr::new(Ipv4Addr::from(ip).into(), port(8)))
        }
        0x21 => {
            let ip: [u8; 16] = body[..16].try_into().expect("16 bytes");
            Some(SocketAddr::new(Ipv6Addr::from(ip).into(), port(32)))
        }
        _ => None,
    };
    Ok(Some(ProxyHeader {
        source,
        len: V2_FIXED + len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn inet(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(0x21, 0x11, &body)
    }

    fn inet6(src: Ipv6Addr, sport: u16) -> Vec<u8> {
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        v2(0x21, 0x21, &body)
    }

    fn at(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[derive(Debug)]
    enum Want {
        Done(Option<SocketAddr>),
        More,
        Err(ProxyHeaderError),
    }
    use ProxyHeaderError as E;

    #[rstest]
    #[case::v1_tcp4(b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n".to_vec(), Want::Done(at("192.0.2.7:56324")))]
    #[case::v1_tcp6(b"PROXY TCP6 2001:db8::7 ::1 56324 443\r\n".to_vec(), Want::Done(at("[2001:db8::7]:56324")))]
    #[case::v1_unknown(b"PROXY UNKNOWN\r\n".to_vec(), Want::Done(None))]
    #[case::v1_unknown_ignores_the_rest(b"PROXY UNKNOWN whatever it says\r\n".to_vec(), Want::Done(None))]
    #[case::v1_longest(format!("PROXY UNKNOWN {0} {0} 65535 65535\r\n", "ffff:".repeat(7) + "ffff").into_bytes(), Want::Done(None))]
    #[case::v1_ports_at_the_edges(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n".to_vec(), Want::Done(at("1.2.3.4:0")))]
    #[case::v1_partial(b"PROXY TCP4 192.0.2.7 10.0".to_vec(), Want::More)]
    #[case::v1_one_byte(b"P".to_vec(), Want::More)]
    #[case::http_get(b"GET /wsv2/t HTTP/1.1\r\n".to_vec(), Want::Err(E::Missing))]
    #[case::http_post(b"POST".to_vec(), Want::Err(E::Missing))]
    #[case::http_put(b"PU".to_vec(), Want::Err(E::Missing))]
    #[case::lower_case(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(), Want::Err(E::Missing))]
    #[case::v1_too_long(format!("PROXY TCP4 {}", "1".repeat(120)).into_bytes(), Want::Err(E::V1TooLong))]
    #[case::v1_bare_lf(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_double_space(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_trailing_field(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_missing_port(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_port_too_big(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_port_signed(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_v6_as_tcp4(b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_v4_as_tcp6(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_bad_dst(b"PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_udp(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v1_empty(b"PROXY \r\n".to_vec(), Want::Err(E::V1Syntax))]
    #[case::v2_inet(inet([198, 51, 100, 9], 40000, &[]), Want::Done(at("198.51.100.9:40000")))]
    #[case::v2_tlvs_skipped(inet([198, 51, 100, 9], 40000, &[0x04, 0x00, 0x03, b'a', b'b', b'c']), Want::Done(at("198.51.100.9:40000")))]
    #[case::v2_inet6(inet6("2001:db8::9".parse().unwrap(), 1), Want::Done(at("[2001:db8::9]:1")))]
    #[case::v2_local(v2(0x20, 0x00, &[]), Want::Done(None))]
    #[case::v2_local_ignores_family(v2(0x20, 0x11, &[0; 12]), Want::Done(None))]
    #[case::v2_unspec(v2(0x21, 0x00, &[]), Want::Done(None))]
    #[case::v2_unix(v2(0x21, 0x31, &[0; 216]), Want::Done(None))]
    #[case::v2_signature_only(V2_SIGNATURE.to_vec(), Want::More)]
    #[case::v2_body_partial(inet([1, 2, 3, 4], 5, &[])[..20].to_vec(), Want::More)]
    #[case::v2_bad_signature(b"\r\n\r\n\0\r\nQUIT!".to_vec(), Want::Err(E::Missing))]
    #[case::v2_version_1(v2(0x11, 0x11, &[0; 12]), Want::Err(E::V2Version))]
    #[case::v2_version_before_the_rest([&V2_SIGNATURE[..], &[0x31]].concat(), Want::Err(E::V2Version))]
    #[case::v2_command_2(v2(0x22, 0x11, &[0; 12]), Want::Err(E::V2Command))]
    #[case::v2_udp(v2(0x21, 0x12, &[0; 12]), Want::Err(E::V2Family))]
    #[case::v2_family_4(v2(0x21, 0x41, &[0; 12]), Want::Err(E::V2Family))]
    #[case::v2_inet_short(v2(0x21, 0x11, &[0; 11]), Want::Err(E::V2Short))]
    #[case::v2_inet6_short(v2(0x21, 0x21, &[0; 12]), Want::Err(E::V2Short))]
    #[case::v2_too_long([&V2_SIGNATURE[..], &[0x21, 0x11, 0x04, 0x01]].concat(), Want::Err(E::V2TooLong))]
    fn header_table(#[case] input: Vec<u8>, #[case] want: Want) {
        match (parse(&input), &want) {
            (Ok(Some(h)), Want::Done(source)) => {
                assert_eq!(h.source, *source);
                assert_eq!(h.len, input.len());
            }
            (Ok(None), Want::More) => {}
            (Err(e), Want::Err(w)) => assert_eq!(e, *w),
            (got, _) => panic!("got {got:?}, want {want:?}"),
        }
    }

    fn valid_headers() -> Vec<Vec<u8>> {
        vec![
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::7 ::1 56324 443\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            inet([198, 51, 100, 9], 40000, &[0x04, 0x00, 0x01, b'x']),
            inet6("2001:db8::9".parse().unwrap(), 1),
            v2(0x20, 0x00, &[]),
        ]
    }

    /// Every prefix of a header asks for more; the whole header, with the
    /// request behind it in the same read, parses alike.
    #[test]
    fn split_at_every_offset() {
        for header in valid_headers() {
            let whole = parse(&header).unwrap().unwrap();
            assert_eq!(whole.len, header.len());
            let mut stream = header.clone();
            stream.extend_from_slice(b"GET /wsv2/t HTTP/1.1\r\n\r\n");
            for end in 0..=stream.len() {
                let got = parse(&stream[..end]);
                if end < header.len() {
                    assert_eq!(got, Ok(None), "{end} bytes of {header:?}");
                } else {
                    assert_eq!(got, Ok(Some(whole)), "{end} bytes of {header:?}");
                }
            }
        }
    }

    #[test]
    fn labels() {
        assert_eq!(E::Missing.as_str(), "proxy_header_missing");
        assert_eq!(E::V2Family.as_str(), "proxy_header_malformed");
    }

    proptest! {
        /// Never panics; a header never claims bytes it was not given; and
        /// "more" stays "more" for every shorter prefix.
        #[test]
        fn never_panics_and_prefixes_agree(
            which in 0..valid_headers().len(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = valid_headers().swap_remove(which);
            for (at, byte) in edits {
                let i = at.index(buf.len());
                buf[i] = byte;
            }
            buf.extend_from_slice(&tail);
            match parse(&buf) {
                Ok(Some(h)) => {
                    prop_assert!(h.len <= buf.len());
                    prop_assert_eq!(parse(&buf[..h.len]), Ok(Some(h)));
                }
                Ok(None) => {
                    for end in 0..buf.len() {
                        prop_assert_eq!(parse(&buf[..end]), Ok(None));
                    }
                }
                Err(_) => {}
            }
        }

        #[test]
        fn never_panics_on_bytes(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(h)) = parse(&buf) {
                prop_assert!(h.len <= buf.len());
            }
        }
    }
}
