//! WebSocket handshake pieces for both sides: the Sec-WebSocket-Accept
//! computation and subprotocol choice (client side, answered by
//! `http1::write_switching_protocols`), and the proxy's own upgrade to Conman:
//! its URL, the request it writes and the check of the 101 it gets back.
//!
//! Sans-IO like `http1`: no sockets and no randomness; the caller supplies the
//! 16 random bytes of a client key.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};
use thiserror::Error;

use crate::proto::http1::{has_token, push_header};

/// RFC 6455 §1.3.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Conman answers with a handful of headers; more than this is not a 101 we
/// want to read.
const MAX_RESPONSE_HEADERS: usize = 64;

/// A handshake value in base64, held inline: every handshake makes three
/// (the client's accept, Conman's key and the accept expected back), and
/// none needs the heap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct B64<const N: usize>([u8; N]);

/// Sec-WebSocket-Accept: base64 of a 20-byte SHA-1.
pub type AcceptKey = B64<28>;
/// Sec-WebSocket-Key: base64 of 16 bytes.
pub type ClientKey = B64<24>;

impl<const N: usize> B64<N> {
    pub fn as_str(&self) -> &str {
        // `encode_into` fills one with base64's alphabet, `from_ascii` only
        // with ASCII: never anything but UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// `N` bytes of text already checked to be base64.
    pub fn from_ascii(text: &[u8]) -> Option<B64<N>> {
        let b: [u8; N] = text.try_into().ok()?;
        b.is_ascii().then_some(B64(b))
    }

    fn encode_into(input: &[u8]) -> B64<N> {
        let mut out = [0u8; N];
        let n = STANDARD
            .encode_slice(input, &mut out)
            .expect("N is the encoded length");
        debug_assert_eq!(n, N);
        B64(out)
    }
}

impl<const N: usize> Default for B64<N> {
    /// Matches no real value: NUL is not in base64's alphabet.
    fn default() -> Self {
        B64([0; N])
    }
}

impl<const N: usize> std::ops::Deref for B64<N> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> std::fmt::Display for B64<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for B64<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// Sec-WebSocket-Accept for a Sec-WebSocket-Key.
pub fn accept_key(key: &str) -> AcceptKey {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(ACCEPT_GUID);
    B64::encode_into(&sha1.finalize())
}

/// The first protocol the client offered that the config allows; the
/// client's order wins because it states the client's preference.
pub fn choose_protocol<'a>(offered: &'a [String], allowed: &[String]) -> Option<&'a str> {
    offered
        .iter()
        .find(|o| allowed.contains(o))
        .map(String::as_str)
}

/// A Sec-WebSocket-Key from 16 bytes the caller drew from a CSPRNG.
pub fn new_client_key(random16: [u8; 16]) -> ClientKey {
    B64::encode_into(&random16)
}

/// Writes the proxy's upgrade request to Conman.
///
/// `host` is the Host header value (see [`WsUrl::host_header`]); `path` is
/// origin-form, bytes a request line cannot carry are percent-encoded.
/// `protocols` are joined into one Sec-WebSocket-Protocol header if any.
/// `extra` carries X-Eval-Session, X-Repl-Id, X-User, X-Forwarded-For; their
/// values come partly from token claims, so control bytes are blanked
/// rather than allowed to start a new header line.
pub fn write_conman_request(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    key: &str,
    protocols: &[String],
    extensions: Option<&str>,
    extra: &[(&str, &str)],
) {
    out.extend_from_slice(b"GET ");
    for &b in path.as_bytes() {
        if b.is_ascii_graphic() && b != b'#' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(out, "Host", host);
    out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    push_header(out, "Sec-WebSocket-Key", key);
    out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    if !protocols.is_empty() {
        push_header(out, "Sec-WebSocket-Protocol", &protocols.join(", "));
    }
    if let Some(extensions) = extensions {
        push_header(out, "Sec-WebSocket-Extensions", extensions);
    }
    for (name, value) in extra {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// What Conman's 101 settled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConmanResponse {
    /// Not checked against what was offered; the caller knows that list.
    pub protocol: Option<String>,
    /// As sent, repeated headers joined with ", ".
    pub extensions: Option<String>,
}

/// Why Conman's answer to the upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("status {0} instead of 101")]
    Status(u16),
    #[error("wrong or missing Sec-WebSocket-Accept")]
    BadAccept,
    #[error("101 without Upgrade: websocket and Connection: upgrade")]
    MissingUpgrade,
    #[error("malformed response head")]
    Malformed,
    #[error("response head too large")]
    HeadTooLarge,
}

impl HandshakeError {
    /// Metric label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Status(_) => "status",
            Self::BadAccept => "bad_accept",
            Self::MissingUpgrade => "missing_upgrade",
            Self::Malformed => "malformed",
            Self::HeadTooLarge => "head_too_large",
        }
    }
}

/// Checks Conman's answer to [`write_conman_request`].
///
/// `Ok(None)` while the head is incomplete and shorter than `max_head` (no
/// allocation on that path); then `Ok(Some((response, head_len)))` for a
/// valid 101, where `buf[head_len..]` already holds WebSocket frames.
///
/// Lines may end in a bare LF, as RFC 9112 §2.2 lets a recipient accept and
/// httparse does: unlike a client's request head (see `http1`), this head
/// comes from our own upstream, and no proxy in front of us could read it
/// differently.
pub fn parse_conman_response(
    buf: &[u8],
    expected_accept: &str,
    max_head: usize,
) -> Result<Option<(ConmanResponse, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    // Only the first max_head bytes can hold the head, and frames may follow.
    let head_len = match resp.parse(&buf[..buf.len().min(max_head)]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(HandshakeError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    let code = resp.code.ok_or(HandshakeError::Malformed)?;
    if code != 101 {
        return Err(HandshakeError::Status(code));
    }
    if resp.version != Some(1) {
        return Err(HandshakeError::Malformed);
    }

    let mut upgrade_websocket = false;
    let mut connection_upgrade = false;
    let mut accepts = 0;
    let mut accept_matches = false;
    let mut protocols = 0;
    let mut protocol = None;
    let mut extensions: Option<String> = None;
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accepts += 1;
            accept_matches = h.value.trim_ascii() == expected_accept.as_bytes();
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            protocols += 1;
            protocol = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            let value = text(h.value)?;
            match &mut extensions {
                Some(list) => {
                    list.push_str(", ");
                    list.push_str(value);
                }
                None => extensions = Some(value.to_owned()),
            }
        }
    }
    if !(upgrade_websocket && connection_upgrade) {
        return Err(HandshakeError::MissingUpgrade);
    }
    if !(accepts == 1 && accept_matches) {
        return Err(HandshakeError::BadAccept);
    }
    // RFC 6455 §4.2.2: the server selects one protocol, not a list.
    let protocol = match (protocols, protocol) {
        (0, _) => None,
        (1, Some(p)) if !p.is_empty() && !p.contains(',') => Some(p.to_owned()),
        _ => return Err(HandshakeError::Malformed),
    };
    Ok(Some((
        ConmanResponse {
            protocol,
            extensions,
        },
        head_len,
    )))
}

fn text(value: &[u8]) -> Result<&str, HandshakeError> {
    std::str::from_utf8(value.trim_ascii()).map_err(|_| HandshakeError::Malformed)
}

/// A Conman address from a placement, `ws[s]://host[:port][/path]`.
pub type WsUrl = crate::proto::url::Url;
pub use crate::proto::url::UrlError;

pub fn parse_ws_url(s: &str) -> Result<WsUrl, UrlError> {
    crate::proto::url::parse_ws(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::http1::{parse_request, write_switching_protocols, Limits, Route};
    use proptest::prelude::*;
    use rstest::rstest;
    use std::io::{self, Cursor, Read, Write};

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    #[test]
    fn rfc6455_example() {
        assert_eq!(accept_key(KEY).as_str(), ACCEPT);
    }

    proptest! {
        #[test]
        fn accept_matches_tungstenite(random in any::<[u8; 16]>()) {
            let key = new_client_key(random);
            prop_assert_eq!(
                accept_key(&key).to_string(),
                tungstenite::handshake::derive_accept_key(key.as_bytes())
            );
        }
    }

    #[rstest]
    #[case::first_offered_wins(&["b", "a"], &["a", "b"], Some("b"))]
    #[case::skips_unknown(&["x", "a"], &["a"], Some("a"))]
    #[case::none_allowed(&["x"], &["a"], None)]
    #[case::nothing_offered(&[], &["a"], None)]
    #[case::exact_match_only(&["A"], &["a"], None)]
    fn protocol_choice(
        #[case] offered: &[&str],
        #[case] allowed: &[&str],
        #[case] want: Option<&str>,
    ) {
        let offered: Vec<String> = offered.iter().map(|s| s.to_string()).collect();
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        assert_eq!(choose_protocol(&offered, &allowed), want);
    }

    fn client_request(protocols: &[&str]) -> Vec<u8> {
        let protocols: Vec<String> = protocols.iter().map(|s| s.to_string()).collect();
        let mut out = Vec::new();
        write_conman_request(
            &mut out,
            "127.0.0.1:9001",
            "/conman/ws?repl=r1",
            KEY,
            &protocols,
            Some("permessage-deflate"),
            &[
                ("X-Eval-Session", "s-1"),
                ("X-Repl-Id", "r1"),
                ("X-User", "alice"),
                ("X-Forwarded-For", "192.0.2.7"),
            ],
        );
        out
    }

    /// The smallest server that answers a valid upgrade: enough to test the
    /// client side against an independent reading of the request.
    fn respond(request: &[u8], protocol: Option<&str>) -> Vec<u8> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(request).unwrap().is_complete());
        let key = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
            .map(|h| std::str::from_utf8(h.value).unwrap())
            .unwrap();
        let mut out = Vec::new();
        write_switching_protocols(&mut out, &accept_key(key), protocol, None);
        out
    }

    #[test]
    fn client_request_text() {
        let text = String::from_utf8(client_request(&["ot.v1", "json"])).unwrap();
        assert_eq!(
            text,
            "GET /conman/ws?repl=r1 HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ot.v1, json\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\nX-Eval-Session: s-1\r\n\
             X-Repl-Id: r1\r\nX-User: alice\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n"
        );
    }

    #[test]
    fn client_request_cannot_be_split() {
        let mut out = Vec::new();
        write_conman_request(
            &mut out,
            "h",
            "/a b#c\r\n",
            KEY,
            &[],
            None,
            &[("X-User", "eve\r\nX-Admin: 1")],
        );
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&out).unwrap().is_complete());
        assert_eq!(req.path, Some("/a%20b%23c%0D%0A"));
        assert!(req.headers.iter().all(|h| h.name != "X-Admin"));
    }

    #[test]
    fn round_trip() {
        let request = client_request(&["ot.v1"]);
        let mut stream = respond(&request, Some("ot.v1"));
        let head_len = stream.len();
        stream.extend_from_slice(b"\x81\x02hi");
        let got = parse_conman_response(&stream, &accept_key(KEY), 4096);
        let want = ConmanResponse {
            protocol: Some("ot.v1".into()),
            extensions: None,
        };
        assert_eq!(got, Ok(Some((want, head_len))));
    }

    #[test]
    fn own_server_accepts_new_client_key() {
        let key = new_client_key(*b"0123456789abcdef");
        let mut request = Vec::new();
        write_conman_request(&mut request, "h", "/wsv2/t", &key, &[], None, &[]);
        let (route, n) = parse_request(&request, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(n, request.len());
        assert!(matches!(route, Route::WebSocket(r) if r.key == key));
    }

    #[rstest]
    #[case::ok_with_extensions(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Extensions: permessage-deflate\r\nsec-websocket-extensions: x-y\r\n\r\n",
        Ok(ConmanResponse { protocol: None, extensions: Some("permessage-deflate, x-y".into()) })
    )]
    #[case::bare_lf(
        "HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\r\nConnection: Upgrade\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\n",
        Ok(ConmanResponse::default())
    )]
    #[case::wrong_accept(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
        Err(HandshakeError::BadAccept)
    )]
    #[case::missing_accept(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        Err(HandshakeError::BadAccept)
    )]
    #[case::two_accepts(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        Err(HandshakeError::BadAccept)
    )]
    #[case::not_found(
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        Err(HandshakeError::Status(404))
    )]
    #[case::http10_error(
        "HTTP/1.0 503 Service Unavailable\r\n\r\n",
        Err(HandshakeError::Status(503))
    )]
    #[case::no_upgrade(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        Err(HandshakeError::MissingUpgrade)
    )]
    #[case::no_connection(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        Err(HandshakeError::MissingUpgrade)
    )]
    #[case::protocol_list(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: a, b\r\n\r\n",
        Err(HandshakeError::Malformed)
    )]
    #[case::http10_101(
        "HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        Err(HandshakeError::Malformed)
    )]
    #[case::garbage("SSH-2.0-OpenSSH\r\n\r\n", Err(HandshakeError::Malformed))]
    fn response_table(
        #[case] response: &str,
        #[case] want: Result<ConmanResponse, HandshakeError>,
    ) {
        let got = parse_conman_response(response.as_bytes(), ACCEPT, 4096);
        assert_eq!(got, want.map(|r| Some((r, response.len()))));
    }

    #[test]
    fn head_too_large() {
        let big = format!(
            "HTTP/1.1 101 Switching Protocols\r\nX-Pad: {}\r\n",
            "p".repeat(200)
        );
        assert_eq!(
            parse_conman_response(big.as_bytes(), ACCEPT, 128),
            Err(HandshakeError::HeadTooLarge)
        );
        assert_eq!(
            parse_conman_response(&big.as_bytes()[..127], ACCEPT, 128),
            Ok(None)
        );
    }

    #[test]
    fn response_split_at_every_offset() {
        let request = client_request(&["ot.v1"]);
        let response = respond(&request, Some("ot.v1"));
        let mut stream = response.clone();
        stream.extend_from_slice(b"\x88\x02\x03\xe8");
        let whole = parse_conman_response(&stream, ACCEPT, 4096);
        assert!(matches!(whole, Ok(Some((_, n))) if n == response.len()));
        for end in 0..=stream.len() {
            let got = parse_conman_response(&stream[..end], ACCEPT, 4096);
            if end < response.len() {
                assert_eq!(got, Ok(None), "prefix of {end} bytes");
            } else {
                assert_eq!(got, whole, "{end} bytes");
            }
        }
    }

    proptest! {
        #[test]
        fn response_parser_never_panics(
            buf in proptest::collection::vec(any::<u8>(), 0..1024),
            max_head in 0usize..2048,
        ) {
            let _ = parse_conman_response(&buf, ACCEPT, max_head);
        }
    }

    /// Reads what a test put in `input`, collects what the peer writes.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn tungstenite_server_accepts_our_request() {
        let stream = Duplex {
            input: Cursor::new(client_request(&[])),
            output: Vec::new(),
        };
        let ws = tungstenite::accept(stream).unwrap();
        let response = &ws.get_ref().output;
        let (got, n) = parse_conman_response(response, &accept_key(KEY), 4096)
            .unwrap()
            .unwrap();
        assert_eq!(n, response.len());
        assert_eq!(got, ConmanResponse::default());
    }

    /// Answers whatever the client wrote with our own server code once the
    /// client starts reading.
    struct OurServer {
        written: Vec<u8>,
        answer: Option<Cursor<Vec<u8>>>,
    }

    impl Read for OurServer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.answer.is_none() {
                let Ok(Some((Route::WebSocket(req), _))) =
                    parse_request(&self.written, &Limits::default())
                else {
                    return Err(io::Error::other("request refused"));
                };
                let allowed = vec!["ot.v1".to_string()];
                let mut out = Vec::new();
                write_switching_protocols(
                    &mut out,
                    &accept_key(&req.key),
                    choose_protocol(&req.protocols, &allowed),
                    None,
                );
                self.answer = Some(Cursor::new(out));
            }
            self.answer.as_mut().map_or(Ok(0), |a| a.read(buf))
        }
    }

    impl Write for OurServer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn tungstenite_client_accepts_our_answer() {
        use tungstenite::client::IntoClientRequest;
        let mut request = "ws://eval.example/wsv2/v4.public.t"
            .into_client_request()
            .unwrap();
        // No space after the comma: tungstenite 0.24 splits the list without
        // trimming, so it would look for " ot.v1".
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "json,ot.v1".parse().unwrap());
        let stream = OurServer {
            written: Vec::new(),
            answer: None,
        };
        let (_, response) = tungstenite::client::client(request, stream).unwrap();
        assert_eq!(response.status(), 101);
        assert_eq!(
            response.headers().get("Sec-WebSocket-Protocol").unwrap(),
            "ot.v1"
        );
    }

    #[rstest]
    #[case::name_port_path("ws://conman-3.internal:8080/wsv2", "conman-3.internal", 8080, "/wsv2")]
    #[case::defaults("ws://conman", "conman", 80, "/")]
    #[case::scheme_any_case("WS://conman/", "conman", 80, "/")]
    #[case::ipv4(
        "ws://127.0.0.1:9001/a/b?repl=r1&x=y",
        "127.0.0.1",
        9001,
        "/a/b?repl=r1&x=y"
    )]
    #[case::ipv6("ws://[::1]:9001/x", "::1", 9001, "/x")]
    #[case::ipv6_default_port("ws://[fe80::1]", "fe80::1", 80, "/")]
    #[case::query_without_path("ws://h?repl=1", "h", 80, "/?repl=1")]
    #[case::underscore("ws://conman_a.local", "conman_a.local", 80, "/")]
    #[case::wss("wss://conman/x", "conman", 443, "/x")]
    #[case::wss_caps("WSS://[::1]:8443", "::1", 8443, "/")]
    fn url_ok(#[case] url: &str, #[case] host: &str, #[case] port: u16, #[case] path: &str) {
        let want = WsUrl {
            host: host.into(),
            port,
            path: path.into(),
            tls: url.get(..3).is_some_and(|s| s.eq_ignore_ascii_case("wss")),
        };
        assert_eq!(parse_ws_url(url), Ok(want));
    }

    #[rstest]
    #[case::https("https://conman/x", UrlError::Scheme)]
    #[case::http("http://conman/x", UrlError::Scheme)]
    #[case::no_scheme("conman:80/x", UrlError::Scheme)]
    #[case::empty_host("ws:///x", UrlError::Host)]
    #[case::userinfo("ws://u:p@conman/x", UrlError::Port)]
    #[case::userinfo_no_port("ws://u@conman/x", UrlError::Host)]
    #[case::bad_ipv4("ws://999.1.1.1/", UrlError::Host)]
    #[case::unclosed_v6("ws://[::1/x", UrlError::Host)]
    #[case::bad_v6("ws://[zz]/x", UrlError::Host)]
    #[case::v6_junk_after("ws://[::1]x/", UrlError::Host)]
    #[case::bare_v6("ws://::1/", UrlError::Host)]
    #[case::port_zero("ws://h:0/", UrlError::Port)]
    #[case::port_too_big("ws://h:65536/", UrlError::Port)]
    #[case::port_plus("ws://h:+80/", UrlError::Port)]
    #[case::port_empty("ws://h:/", UrlError::Port)]
    #[case::space_in_path("ws://h/a b", UrlError::Path)]
    #[case::fragment("ws://h/a#b", UrlError::Path)]
    #[case::empty_label("ws://a..b/", UrlError::Host)]
    fn url_err(#[case] url: &str, #[case] want: UrlError) {
        assert_eq!(parse_ws_url(url), Err(want));
    }

    #[rstest]
    #[case("ws://h", "h")]
    #[case("ws://h:8080/", "h:8080")]
    #[case("ws://[::1]:9001/", "[::1]:9001")]
    #[case("ws://[::1]/", "[::1]")]
    fn host_header(#[case] url: &str, #[case] want: &str) {
        assert_eq!(parse_ws_url(url).unwrap().host_header(), want);
    }
}
