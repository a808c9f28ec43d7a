//! The client's side of the handshake as the proxy sees it: parse the HTTP/1.1
//! request head that a client sends (`GET /wsv2/<token>` with a WebSocket
//! upgrade, or `GET /healthz`) and write the answers (101, 4xx, `/healthz`).
//!
//! Sans-IO: the caller owns the buffer and calls [`parse_request`] again after
//! every read. Nothing is consumed; bytes past the head belong to the WebSocket
//! stream and the caller keeps them.
//!
//! Decisions a reader might otherwise wonder about:
//! - Every line must end in CRLF. A bare LF is a 400 (`malformed`), although
//!   RFC 9112 §2.2 lets a recipient accept it and httparse does: the cheap
//!   completeness check looks for CRLFCRLF, and a proxy gains nothing by being
//!   lenient about how a head ends. Empty lines before the request line are
//!   refused for the same reason (there is no earlier request on this
//!   connection whose trailing CRLF they could be).
//! - HTTP/1.0 on `/wsv2` is a 400 (`http_version`), not a 505: the server does
//!   speak HTTP/1.x, the request just cannot be a WebSocket upgrade
//!   (RFC 6455 §4.1 needs 1.1). `/healthz` answers HTTP/1.0 too, because load
//!   balancer health checks (HAProxy's default `httpchk`) send it.
//! - Limits are checked on the bytes received so far, so a client that drips
//!   an endless request line is refused after `max_request_line` bytes, not
//!   after `max_head`.
//! - Sec-WebSocket-Key must be the canonical base64 (with padding) of exactly
//!   16 bytes, as RFC 6455 §4.1 requires and every client sends.
//! - An absolute-form target (`GET http://host/wsv2/<token>`) is accepted, as
//!   RFC 9112 §3.2.2 says a server MUST, for the `http` and `ws` schemes only
//!   (this listener speaks neither TLS nor anything else; other schemes are a
//!   400). Its path and query route the request as an origin-form target's
//!   would. When its authority and the Host header disagree, RFC 9112 lets
//!   the target win; we refuse with 400 (`host_mismatch`) instead: no client
//!   that means well sends two different hosts, and a proxy in front of us
//!   that routed on one while we log and forward the other is the confusion
//!   request smuggling feeds on. Authorities compare case-insensitively, with
//!   an absent or empty port meaning 80 (the default of both schemes).
//!   `/healthz` reads no headers, so it gets no Host check either way.
//!   A target in neither form (`*`, `wsv2/x`) is a 400 (`invalid_target`).
//! - A missing Sec-WebSocket-Version is a 400 (RFC 6455 §4.2.1: a required
//!   header is missing, so the request is bad); one present but not 13 is a
//!   426 carrying `Sec-WebSocket-Version: 13` (§4.2.2), so the client can
//!   retry with a version we speak.
//! - The token from the path segment or the `token` query parameter is
//!   percent-decoded (a client may URL-encode the dots of a PASETO token); a
//!   malformed escape, or an encoding of something that is not UTF-8, is a 400
//!   (`token_encoding`). `+` stays `+` in both places: RFC 3986 gives it no
//!   meaning, the plus-is-space rule belongs to HTML form bodies, and a token
//!   (base64url and dots) never holds a space, so decoding it could only turn
//!   a token the token check calls malformed into another one. Only the token
//!   source actually used is decoded; other query parameters are not ours.
//!   Routing looks at the raw path: `/wsv%32` is not `/wsv2`.
#![forbid(unsafe_code)]

use std::fmt;

use crate::proto::handshake::ClientKey;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use thiserror::Error;

/// The WebSocket endpoint; `/wsv2/<token>` and `/wsv2?token=` live under it.
pub const WS_PATH: &str = "/wsv2";
pub const HEALTHZ_PATH: &str = "/healthz";
/// The most headers `limits.max_headers` may allow.
pub const MAX_HEADERS: usize = 1024;

/// Size limits on a request head, checked as bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line, CRLF excluded (414 past it). Tokens ride in the
    /// path, so this must fit the longest token plus `GET /wsv2/ HTTP/1.1`.
    pub max_request_line: usize,
    /// Longest head, request line and final blank line included (431 past it).
    pub max_head: usize,
    /// Most header lines (431 past it).
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_line: 16 * 1024,
            max_head: 32 * 1024,
            max_headers: 64,
        }
    }
}

/// What a complete, valid request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    WebSocket(UpgradeRequest),
    Healthz,
}

/// A valid WebSocket upgrade request, reduced to what the proxy uses.
#[derive(Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// First found of: the path segment after `/wsv2/`, the `token` query
    /// parameter, `Authorization: Bearer`. Whether it is valid, or given twice,
    /// is the token check's business.
    pub token: Option<String>,
    /// Sec-WebSocket-Key, validated.
    pub key: ClientKey,
    /// Offered subprotocols in the client's order, across repeated headers.
    pub protocols: Vec<String>,
    /// Sec-WebSocket-Extensions as sent (repeated headers joined with ", "),
    /// kept only to forward in upstream-first mode.
    pub extensions: Option<String>,
    pub origin: Option<String>,
    /// Repeated headers joined with ", ", as list fields combine.
    pub x_forwarded_for: Option<String>,
}

// By hand so that a `{:?}` in a log line cannot leak the token.
impl fmt::Debug for UpgradeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeRequest")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("key", &self.key)
            .field("protocols", &self.protocols)
            .field("extensions", &self.extensions)
            .field("origin", &self.origin)
            .field("x_forwarded_for", &self.x_forwarded_for)
            .finish()
    }
}

/// Why a request head was refused; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{}", self.reason())]
pub enum RequestError {
    /// httparse refused the syntax, or a line did not end in CRLF.
    Malformed(httparse::Error),
    RequestLineTooLong,
    HeadTooLarge,
    TooManyHeaders,
    /// A WebSocket upgrade in anything but HTTP/1.1.
    HttpVersion,
    MethodNotAllowed,
    NotFound,
    /// A request target in neither origin-form nor absolute-form, or an
    /// absolute-form one with no host, userinfo, or characters a Host may not
    /// hold.
    InvalidTarget,
    /// An absolute-form target whose scheme is not `http` or `ws`.
    UnsupportedScheme,
    /// An absolute-form target whose authority is not the Host header's.
    HostMismatch,
    /// A malformed `%XX` escape in the token, or one decoding to non-UTF-8.
    TokenEncoding,
    /// A known WebSocket path without `Upgrade: websocket` and
    /// `Connection: upgrade`.
    NotUpgrade,
    /// No Sec-WebSocket-Version at all.
    MissingWebSocketVersion,
    /// Sec-WebSocket-Version repeated, or not 13.
    WebSocketVersion,
    MissingKey,
    InvalidKey,
    DuplicateKey,
    MissingHost,
    DuplicateHost,
    InvalidHost,
    /// Content-Length or Transfer-Encoding on an upgrade: whatever follows the
    /// head is WebSocket frames, so a declared body means two parties could
    /// disagree on where the stream starts.
    BodyOnUpgrade,
}

impl RequestError {
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_)
            | Self::HttpVersion
            | Self::InvalidTarget
            | Self::UnsupportedScheme
            | Self::HostMismatch
            | Self::TokenEncoding
            | Self::MissingWebSocketVersion
            | Self::MissingKey
            | Self::InvalidKey
            | Self::DuplicateKey
            | Self::MissingHost
            | Self::DuplicateHost
            | Self::InvalidHost
            | Self::BodyOnUpgrade => 400,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestLineTooLong => 414,
            Self::NotUpgrade | Self::WebSocketVersion => 426,
            Self::HeadTooLarge | Self::TooManyHeaders => 431,
        }
    }

    /// One line for the response body and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(e) => match e {
                httparse::Error::HeaderName => "invalid header name",
                httparse::Error::HeaderValue => "invalid header value",
                httparse::Error::NewLine => "invalid line ending",
                httparse::Error::Status | httparse::Error::Token => "invalid request line",
                httparse::Error::Version => "invalid HTTP version",
                httparse::Error::TooManyHeaders => "too many headers",
            },
            Self::RequestLineTooLong => "request line too long",
            Self::HeadTooLarge => "request head too large",
            Self::TooManyHeaders => "too many headers",
            Self::HttpVersion => "HTTP/1.1 required",
            Self::MethodNotAllowed => "method not allowed",
            Self::NotFound => "not found",
            Self::InvalidTarget => "invalid request target",
            Self::UnsupportedScheme => "request target scheme must be http or ws",
            Self::HostMismatch => "request target and Host disagree",
            Self::TokenEncoding => "invalid percent-encoding in token",
            Self::NotUpgrade => "WebSocket upgrade required",
            Self::MissingWebSocketVersion => "missing Sec-WebSocket-Version",
            Self::WebSocketVersion => "Sec-WebSocket-Version must be 13",
            Self::MissingKey => "missing Sec-WebSocket-Key",
            Self::InvalidKey => "invalid Sec-WebSocket-Key",
            Self::DuplicateKey => "duplicate Sec-WebSocket-Key",
            Self::MissingHost => "missing Host",
            Self::DuplicateHost => "duplicate Host",
            Self::InvalidHost => "invalid Host",
            Self::BodyOnUpgrade => "Content-Length or Transfer-Encoding on upgrade",
        }
    }

    /// Metric label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::RequestLineTooLong => "request_line_too_long",
            Self::HeadTooLarge => "head_too_large",
            Self::TooManyHeaders => "too_many_headers",
            Self::HttpVersion => "http_version",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotFound => "not_found",
            Self::InvalidTarget => "invalid_target",
            Self::UnsupportedScheme => "unsupported_scheme",
            Self::HostMismatch => "host_mismatch",
            Self::TokenEncoding => "token_encoding",
            Self::NotUpgrade => "upgrade_required",
            Self::MissingWebSocketVersion => "missing_websocket_version",
            Self::WebSocketVersion => "websocket_version",
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
            Self::DuplicateKey => "duplicate_key",
            Self::MissingHost => "missing_host",
            Self::DuplicateHost => "duplicate_host",
            Self::InvalidHost => "invalid_host",
            Self::BodyOnUpgrade => "body_on_upgrade",
        }
    }
}

/// Parses a request head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete and within limits; that
/// path only scans and never allocates. `Ok(Some((route, head_len)))` once the
/// blank line has arrived: `buf[head_len..]` is already WebSocket data.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<(Route, usize)>, RequestError> {
    let Some(head_len) = find_head_end(buf, limits)? else {
        return Ok(None);
    };
    // On the stack and uninitialised: a heap vector of `max_headers`
    // empty headers was an allocation and 2 KiB of stores per handshake.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(&buf[..head_len], &mut headers[..limits.max_headers]) {
        Ok(httparse::Status::Complete(n)) if n == head_len => {}
        // The scan saw CRLFCRLF there, so httparse must agree that the head
        // ends there; if not, refuse rather than guess where the stream starts.
        Ok(_) => return Err(RequestError::Malformed(httparse::Error::NewLine)),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooManyHeaders),
        Err(e) => return Err(RequestError::Malformed(e)),
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(RequestError::Malformed(httparse::Error::Token));
    };
    let target = RequestTarget::parse(target)?;
    let route = match classify(target.path) {
        Target::Unknown => return Err(RequestError::NotFound),
        Target::Healthz => {
            require_get(method)?;
            Route::Healthz
        }
        Target::WebSocket(path_token) => {
            require_get(method)?;
            Route::WebSocket(upgrade_request(version, path_token, &target, req.headers)?)
        }
    };
    Ok(Some((route, head_len)))
}

/// The cheap check: where the head ends (just past CRLFCRLF), enforcing the
/// size limits and CRLF-only line endings on what has arrived so far.
fn find_head_end(buf: &[u8], limits: &Limits) -> Result<Option<usize>, RequestError> {
    if matches!(buf.first(), Some(b'\r' | b'\n')) {
        return Err(RequestError::Malformed(httparse::Error::NewLine));
    }
    let window = &buf[..buf.len().min(limits.max_head)];
    let mut request_line_seen = false;
    let mut from = 0;
    while let Some(offset) = window[from..].iter().position(|&b| b == b'\n') {
        let lf = from + offset;
        // The length first: a read that ended before this LF was already
        // refused for it (below the loop), and a verdict must not depend on
        // where reads end.
        if !request_line_seen && lf > limits.max_request_line + 1 {
            return Err(RequestError::RequestLineTooLong);
        }
        if lf == 0 || window[lf - 1] != b'\r' {
            return Err(RequestError::Malformed(httparse::Error::NewLine));
        }
        if !request_line_seen {
            request_line_seen = true;
        } else if lf >= 3 && window[lf - 3..lf - 1] == *b"\r\n" {
            return Ok(Some(lf + 1));
        }
        from = lf + 1;
    }
    // Only the window decides from here on, so that a longer read of the same
    // stream reaches the same verdict. Without a LF, max_request_line + 2 bytes
    // hold more than max_request_line bytes of line whatever the last one is;
    // a full window with the request line still open is that line's fault
    // too, even when max_head leaves less than max_request_line + 2 bytes.
    if !request_line_seen
        && (window.len() > limits.max_request_line + 1 || window.len() >= limits.max_head)
    {
        return Err(RequestError::RequestLineTooLong);
    }
    if window.len() >= limits.max_head {
        return Err(RequestError::HeadTooLarge);
    }
    Ok(None)
}

/// A request target split into what routing and the Host check need
/// (RFC 9112 §3.2.1 origin-form, §3.2.2 absolute-form).
#[derive(Debug, PartialEq, Eq)]
struct RequestTarget<'a> {
    /// The authority of an absolute-form target: host, optional port.
    authority: Option<&'a str>,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> RequestTarget<'a> {
    fn parse(target: &'a str) -> Result<Self, RequestError> {
        if target.starts_with('/') {
            let (path, query) = split_query(target);
            return Ok(Self {
                authority: None,
                path,
                query,
            });
        }
        // Anything else must be an absolute URI: scheme ":" hier-part.
        let Some((scheme, rest)) = target.split_once(':').filter(|(s, _)| is_scheme(s)) else {
            return Err(RequestError::InvalidTarget);
        };
        if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws")) {
            return Err(RequestError::UnsupportedScheme);
        }
        // An http URI always has an authority with a non-empty host
        // (RFC 9110 §4.2.1); userinfo is refused by valid_host ('@').
        let rest = rest.strip_prefix("//").ok_or(RequestError::InvalidTarget)?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(end);
        if !valid_host(authority) || host_and_port(authority).0.is_empty() {
            return Err(RequestError::InvalidTarget);
        }
        let (path, query) = split_query(path_and_query);
        Ok(Self {
            authority: Some(authority),
            path,
            query,
        })
    }
}

fn split_query(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    }
}

/// RFC 3986 §3.1: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
}

/// `host[:port]` split at the port's colon; an IPv6 literal keeps its
/// brackets. The port is `None` when absent and `Some("")` when empty.
fn host_and_port(authority: &str) -> (&str, Option<&str>) {
    let colon = match authority.rfind(']') {
        Some(close) => authority[close..].find(':').map(|i| close + i),
        None => authority.rfind(':'),
    };
    match colon {
        Some(i) => (&authority[..i], Some(&authority[i + 1..])),
        None => (authority, None),
    }
}

/// Whether two authorities name the same host and port, host in any case,
/// an absent or empty port being 80 (the default of both http and ws).
fn same_authority(a: &str, b: &str) -> bool {
    let port = |p: Option<&str>| -> Option<u32> {
        match p {
            None | Some("") => Some(80),
            // Leading zeros name the same port; anything else that is not
            // a number falls back to comparing the text.
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
                let digits = p.trim_start_matches('0');
                if digits.is_empty() {
                    Some(0)
                } else {
                    digits.parse().ok()
                }
            }
            Some(_) => None,
        }
    };
    let ((host_a, port_a), (host_b, port_b)) = (host_and_port(a), host_and_port(b));
    host_a.eq_ignore_ascii_case(host_b)
        && match (port(port_a), port(port_b)) {
            (Some(x), Some(y)) => x == y,
            _ => port_a == port_b,
        }
}

/// Decodes `%XX` escapes (either case of hex digit); `+` is left alone.
/// Allocates only for what is returned.
fn percent_decode(s: &str) -> Result<String, RequestError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let digits = bytes.get(i + 1..i + 3).ok_or(RequestError::TokenEncoding)?;
            let (Some(hi), Some(lo)) = (hex(digits[0]), hex(digits[1])) else {
                return Err(RequestError::TokenEncoding);
            };
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| RequestError::TokenEncoding)
}

enum Target<'a> {
    Healthz,
    /// The token from the path segment, if there is a non-empty one.
    WebSocket(Option<&'a str>),
    Unknown,
}

fn classify(path: &str) -> Target<'_> {
    if path == HEALTHZ_PATH {
        return Target::Healthz;
    }
    match path.strip_prefix(WS_PATH) {
        Some("") => Target::WebSocket(None),
        Some(rest) => match rest.strip_prefix('/') {
            // Tokens are base64url and dots: a further '/' is another path.
            Some(segment) if !segment.contains('/') => {
                Target::WebSocket(Some(segment).filter(|s| !s.is_empty()))
            }
            _ => Target::Unknown,
        },
        None => Target::Unknown,
    }
}

fn require_get(method: &str) -> Result<(), RequestError> {
    if method == "GET" {
        Ok(())
    } else {
        Err(RequestError::MethodNotAllowed)
    }
}

fn upgrade_request(
    version: u8,
    path_token: Option<&str>,
    target: &RequestTarget<'_>,
    headers: &[httparse::Header<'_>],
) -> Result<UpgradeRequest, RequestError> {
    if version != 1 {
        return Err(RequestError::HttpVersion);
    }
    let mut hosts = 0;
    let mut host = None;
    let mut keys = 0;
    let mut key: &[u8] = b"";
    let mut ws_versions = 0;
    let mut ws_version_13 = false;
    let mut upgrade_websocket = false;
    let mut connection_upgrade = false;
    let mut body = false;
    let mut bearer = None;
    let mut protocols = Vec::new();
    let mut extensions: Option<String> = None;
    let mut origin = None;
    let mut x_forwarded_for: Option<String> = None;

    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            keys += 1;
            key = h.value.trim_ascii();
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws_versions += 1;
            ws_version_13 = h.value.trim_ascii() == b"13";
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            protocols.extend(
                text(h.value)?
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned),
            );
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            append_list(&mut extensions, text(h.value)?);
        } else if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            body = true;
        } else if name.eq_ignore_ascii_case("authorization") {
            if bearer.is_none() {
                bearer = bearer_token(text(h.value)?);
            }
        } else if name.eq_ignore_ascii_case("origin") {
            origin = origin.or(Some(text(h.value)?));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            append_list(&mut x_forwarded_for, text(h.value)?);
        }
    }

    match (hosts, host) {
        (0, _) => return Err(RequestError::MissingHost),
        (1, Some(h)) if valid_host(h) => {}
        (1, _) => return Err(RequestError::InvalidHost),
        _ => return Err(RequestError::DuplicateHost),
    }
    if let (Some(authority), Some(host)) = (target.authority, host) {
        if !same_authority(authority, host) {
            return Err(RequestError::HostMismatch);
        }
    }
    if body {
        return Err(RequestError::BodyOnUpgrade);
    }
    if !(upgrade_websocket && connection_upgrade) {
        return Err(RequestError::NotUpgrade);
    }
    if ws_versions == 0 {
        return Err(RequestError::MissingWebSocketVersion);
    }
    if !(ws_versions == 1 && ws_version_13) {
        return Err(RequestError::WebSocketVersion);
    }
    let key = match keys {
        0 => return Err(RequestError::MissingKey),
        1 if valid_key(key) => key,
        1 => return Err(RequestError::InvalidKey),
        _ => return Err(RequestError::DuplicateKey),
    };
    let key = ClientKey::from_ascii(key).ok_or(RequestError::InvalidKey)?;

    let query_token = target.query.and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .filter(|t| !t.is_empty())
    });
    // Headers are not URL-encoded, so a Bearer token is taken as sent.
    let token = match path_token.or(query_token) {
        Some(encoded) => Some(percent_decode(encoded)?),
        None => bearer.map(str::to_owned),
    };

    Ok(UpgradeRequest {
        token,
        key,
        protocols,
        extensions,
        origin: origin.map(str::to_owned),
        x_forwarded_for,
    })
}

/// A header value we keep, as trimmed text; obs-text that is not UTF-8 is
/// refused rather than mangled, since these values are forwarded or logged.
fn text(value: &[u8]) -> Result<&str, RequestError> {
    std::str::from_utf8(value.trim_ascii())
        .map_err(|_| RequestError::Malformed(httparse::Error::HeaderValue))
}

fn append_list(list: &mut Option<String>, value: &str) {
    if value.is_empty() {
        return;
    }
    match list {
        Some(l) => {
            l.push_str(", ");
            l.push_str(value);
        }
        None => *list = Some(value.to_owned()),
    }
}

fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// RFC 3986 host[:port] characters only: a Host with spaces, commas or
/// userinfo cannot name us and is what request smuggling tries.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:[]%!$&'()*+;=".contains(&b))
}

fn valid_key(key: &[u8]) -> bool {
    // 24 characters is the only length that can hold 16 bytes padded; checked
    // first so that a huge header is not decoded.
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// Whether a comma-separated header list holds `token`, in any case.
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Appends `name: value\r\n`. Values can come from token claims or from a
/// peer, so bytes that would end the line or the head (CR, LF, other controls)
/// become spaces instead of letting a value inject headers.
pub(crate) fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    debug_assert!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':'),
        "header name {name:?} is not a token"
    );
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(value.bytes().map(|b| {
        if (b < 0x20 && b != b'\t') || b == 0x7f {
            b' '
        } else {
            b
        }
    }));
    out.extend_from_slice(b"\r\n");
}

/// The 101 answer to an upgrade. `protocol` must be one the client offered
/// (see `handshake::choose_protocol`); `extensions` is only set in
/// upstream-first mode, copied from Conman's answer.
pub fn write_switching_protocols(
    out: &mut Vec<u8>,
    accept: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
) {
    const FIXED: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    // One allocation of the right size: header names, ": ", CRLFs.
    let optional = |v: Option<&str>| v.map_or(0, |v| v.len() + 30);
    out.reserve(FIXED.len() + accept.len() + 26 + optional(protocol) + optional(extensions));
    out.extend_from_slice(FIXED);
    push_header(out, "Sec-WebSocket-Accept", accept);
    if let Some(protocol) = protocol {
        push_header(out, "Sec-WebSocket-Protocol", protocol);
    }
    if let Some(extensions) = extensions {
        push_header(out, "Sec-WebSocket-Extensions", extensions);
    }
    out.extend_from_slice(b"\r\n");
}

/// The answer to a refused request, with the headers its status calls for.
pub fn write_error(out: &mut Vec<u8>, err: &RequestError) {
    match err {
        RequestError::MethodNotAllowed => {
            write_plain(
                out,
                err.status(),
                "close",
                &[("Allow", "GET")],
                err.reason(),
            );
        }
        // RFC 9110 §7.8: whoever sends Upgrade lists it in Connection too.
        RequestError::NotUpgrade | RequestError::WebSocketVersion => write_plain(
            out,
            err.status(),
            "Upgrade, close",
            &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
            err.reason(),
        ),
        _ => write_plain(out, err.status(), "close", &[], err.reason()),
    }
}

/// A plain-text answer with any 3-digit status, e.g. 401 for a refused token
/// or 503 while draining; `reason_body` is one line, sent with a newline.
pub fn write_status(out: &mut Vec<u8>, status: u16, reason_body: &str) {
    write_plain(out, status, "close", &[], reason_body);
}

/// Like [`write_status`], with `Retry-After` in seconds: a refusal that
/// another attempt later may pass (429, 502, 503).
pub fn write_status_retry(out: &mut Vec<u8>, status: u16, reason_body: &str, retry_after_s: u64) {
    let after = retry_after_s.to_string();
    write_plain(
        out,
        status,
        "close",
        &[("Retry-After", &after)],
        reason_body,
    );
}

pub fn write_healthz(out: &mut Vec<u8>) {
    write_plain(out, 200, "close", &[], "ok");
}

fn write_plain(
    out: &mut Vec<u8>,
    status: u16,
    connection: &str,
    extra: &[(&str, &str)],
    body_line: &str,
) {
    debug_assert!((100..1000).contains(&status), "status {status}");
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    push_header(out, "Content-Type", "text/plain; charset=utf-8");
    push_header(out, "Content-Length", &(body_line.len() + 1).to_string());
    push_header(out, "Connection", connection);
    for (name, value) in extra {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body_line.as_bytes());
    out.push(b'\n');
}

/// RFC 9112 allows an empty reason phrase, so unknown codes get one.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    /// What Chrome 124 sends, less cookies.
    const CHROME: &[&str] = &[
        "Host: eval.example.com",
        "Connection: Upgrade",
        "Pragma: no-cache",
        "Cache-Control: no-cache",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
        "Upgrade: websocket",
        "Origin: https://replit.com",
        "Sec-WebSocket-Version: 13",
        "Accept-Encoding: gzip, deflate, br, zstd",
        "Accept-Language: en-US,en;q=0.9",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        "Sec-WebSocket-Protocol: ot.v1, json",
    ];

    fn head(line: &str, headers: &[&str]) -> Vec<u8> {
        let mut out = format!("{line}\r\n");
        for h in headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// CHROME's headers without those named in `drop`, plus `add`.
    fn chrome(line: &str, drop: &[&str], add: &[&str]) -> Vec<u8> {
        let mut headers: Vec<&str> = CHROME
            .iter()
            .copied()
            .filter(|h| {
                let name = h.split(':').next().unwrap_or_default();
                !drop.iter().any(|d| d.eq_ignore_ascii_case(name))
            })
            .collect();
        headers.extend_from_slice(add);
        head(line, &headers)
    }

    fn line_of_len(len: usize) -> String {
        let fixed = "GET /wsv2/ HTTP/1.1".len();
        format!("GET /wsv2/{} HTTP/1.1", "t".repeat(len - fixed))
    }

    fn ws(token: &str) -> Want {
        Want::Ws(Some(token.to_owned()))
    }

    #[derive(Debug)]
    enum Want {
        Ws(Option<String>),
        Healthz,
        /// Neither complete nor refused yet.
        More,
        Err(u16, &'static str),
    }

    #[rstest]
    #[case::chrome_path_token(chrome("GET /wsv2/v4.public.abc-_ HTTP/1.1", &[], &[]), ws("v4.public.abc-_"))]
    #[case::bearer(chrome("GET /wsv2 HTTP/1.1", &[], &["Authorization: Bearer v4.public.b"]), ws("v4.public.b"))]
    #[case::bearer_scheme_any_case(chrome("GET /wsv2 HTTP/1.1", &[], &["Authorization: bearer b"]), ws("b"))]
    #[case::basic_auth_is_no_token(chrome("GET /wsv2 HTTP/1.1", &[], &["Authorization: Basic dTpw"]), Want::Ws(None))]
    #[case::query_token(chrome("GET /wsv2?x=1&token=v4.q&y=2 HTTP/1.1", &[], &[]), ws("v4.q"))]
    #[case::path_before_query(chrome("GET /wsv2/p?token=q HTTP/1.1", &[], &["Authorization: Bearer b"]), ws("p"))]
    #[case::query_before_bearer(chrome("GET /wsv2/?token=q HTTP/1.1", &[], &["Authorization: Bearer b"]), ws("q"))]
    #[case::no_token(chrome("GET /wsv2 HTTP/1.1", &[], &[]), Want::Ws(None))]
    #[case::empty_query_token(chrome("GET /wsv2?token= HTTP/1.1", &[], &[]), Want::Ws(None))]
    #[case::missing_key(chrome("GET /wsv2/t HTTP/1.1", &["Sec-WebSocket-Key"], &[]), Want::Err(400, "missing_key"))]
    #[case::key_of_15_bytes(chrome("GET /wsv2/t HTTP/1.1", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA"]), Want::Err(400, "invalid_key"))]
    #[case::key_of_17_bytes(chrome("GET /wsv2/t HTTP/1.1", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA="]), Want::Err(400, "invalid_key"))]
    #[case::key_not_base64(chrome("GET /wsv2/t HTTP/1.1", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!=="]), Want::Err(400, "invalid_key"))]
    #[case::duplicate_key(chrome("GET /wsv2/t HTTP/1.1", &[], &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="]), Want::Err(400, "duplicate_key"))]
    #[case::version_8(chrome("GET /wsv2/t HTTP/1.1", &["Sec-WebSocket-Version"], &["Sec-WebSocket-Version: 8"]), Want::Err(426, "websocket_version"))]
    #[case::no_version(chrome("GET /wsv2/t HTTP/1.1", &["Sec-WebSocket-Version"], &[]), Want::Err(400, "missing_websocket_version"))]
    #[case::empty_version(chrome("GET /wsv2/t HTTP/1.1", &["Sec-WebSocket-Version"], &["Sec-WebSocket-Version:"]), Want::Err(426, "websocket_version"))]
    #[case::two_versions(chrome("GET /wsv2/t HTTP/1.1", &[], &["Sec-WebSocket-Version: 8"]), Want::Err(426, "websocket_version"))]
    #[case::post(chrome("POST /wsv2/t HTTP/1.1", &[], &[]), Want::Err(405, "method_not_allowed"))]
    #[case::healthz(head("GET /healthz HTTP/1.1", &["Host: a"]), Want::Healthz)]
    #[case::healthz_http10_no_host(head("GET /healthz HTTP/1.0", &[]), Want::Healthz)]
    #[case::put_healthz(head("PUT /healthz HTTP/1.1", &["Host: a"]), Want::Err(405, "method_not_allowed"))]
    #[case::other_path(chrome("GET /other HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    #[case::post_other_path(chrome("POST /other HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    #[case::prefix_is_not_path(chrome("GET /wsv2x HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    #[case::two_segments(chrome("GET /wsv2/a/b HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    #[case::no_upgrade(head("GET /wsv2/x HTTP/1.1", &["Host: a"]), Want::Err(426, "upgrade_required"))]
    #[case::upgrade_without_connection(chrome("GET /wsv2/x HTTP/1.1", &["Connection"], &[]), Want::Err(426, "upgrade_required"))]
    #[case::connection_token_list(chrome("GET /wsv2/t HTTP/1.1", &["Connection"], &["Connection: keep-alive, Upgrade"]), ws("t"))]
    #[case::connection_repeated(chrome("GET /wsv2/t HTTP/1.1", &["Connection"], &["Connection: keep-alive", "Connection: upgrade"]), ws("t"))]
    #[case::capitals(chrome("GET /wsv2/t HTTP/1.1", &["Connection", "Upgrade"], &["CONNECTION: UPGRADE", "UPGRADE: WebSocket"]), ws("t"))]
    #[case::connection_not_a_token(chrome("GET /wsv2/t HTTP/1.1", &["Connection"], &["Connection: upgraded"]), Want::Err(426, "upgrade_required"))]
    #[case::missing_host(chrome("GET /wsv2/t HTTP/1.1", &["Host"], &[]), Want::Err(400, "missing_host"))]
    #[case::duplicate_host(chrome("GET /wsv2/t HTTP/1.1", &[], &["Host: evil.example"]), Want::Err(400, "duplicate_host"))]
    #[case::host_list(chrome("GET /wsv2/t HTTP/1.1", &["Host"], &["Host: a, b"]), Want::Err(400, "invalid_host"))]
    #[case::content_length(chrome("GET /wsv2/t HTTP/1.1", &[], &["Content-Length: 0"]), Want::Err(400, "body_on_upgrade"))]
    #[case::transfer_encoding(chrome("GET /wsv2/t HTTP/1.1", &[], &["Transfer-Encoding: chunked"]), Want::Err(400, "body_on_upgrade"))]
    #[case::obs_fold(chrome("GET /wsv2/t HTTP/1.1", &[], &["X-Folded: a", " b"]), Want::Err(400, "malformed"))]
    #[case::http10(chrome("GET /wsv2/t HTTP/1.0", &[], &[]), Want::Err(400, "http_version"))]
    #[case::http20(chrome("GET /wsv2/t HTTP/2.0", &[], &[]), Want::Err(400, "malformed"))]
    #[case::bad_method_char(chrome("G@T /wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "malformed"))]
    #[case::line_of_16_kib(chrome(&line_of_len(16 * 1024), &[], &[]), ws(&"t".repeat(16 * 1024 - "GET /wsv2/ HTTP/1.1".len())))]
    #[case::line_of_17_kib_before_crlf(line_of_len(17 * 1024).into_bytes(), Want::Err(414, "request_line_too_long"))]
    #[case::line_of_17_kib_complete(chrome(&line_of_len(17 * 1024), &[], &[]), Want::Err(414, "request_line_too_long"))]
    #[case::headers_of_40_kib(chrome("GET /wsv2/t HTTP/1.1", &[], &[&format!("Cookie: {}", "c".repeat(40 * 1024))]), Want::Err(431, "head_too_large"))]
    #[case::headers_of_40_kib_unfinished(format!("GET /wsv2/t HTTP/1.1\r\nCookie: {}", "c".repeat(40 * 1024)).into_bytes(), Want::Err(431, "head_too_large"))]
    #[case::headers_100(chrome("GET /wsv2/t HTTP/1.1", &[], &(0..100).map(|_| "X-A: b").collect::<Vec<_>>()), Want::Err(431, "too_many_headers"))]
    #[case::bare_lf(b"GET /wsv2/t HTTP/1.1\nHost: a\n\n".to_vec(), Want::Err(400, "malformed"))]
    #[case::bare_lf_in_headers(b"GET /wsv2/t HTTP/1.1\r\nHost: a\n\r\n".to_vec(), Want::Err(400, "malformed"))]
    #[case::leading_crlf([b"\r\n".as_slice(), &chrome("GET /wsv2/t HTTP/1.1", &[], &[])].concat(), Want::Err(400, "malformed"))]
    #[case::nul_in_header(chrome("GET /wsv2/t HTTP/1.1", &[], &["X-Nul: a\0b"]), Want::Err(400, "malformed"))]
    #[case::space_before_colon(chrome("GET /wsv2/t HTTP/1.1", &[], &["X-A : b"]), Want::Err(400, "malformed"))]
    #[case::utf8_origin(chrome("GET /wsv2/t HTTP/1.1", &["Origin"], &["Origin: https://\u{e9}.example"]), ws("t"))]
    #[case::partial(b"GET /wsv2/t HTTP/1.1\r\nHost: a\r\n".to_vec(), Want::More)]
    // Absolute-form targets (RFC 9112 §3.2.2).
    #[case::absolute(chrome("GET http://eval.example.com/wsv2/t HTTP/1.1", &[], &[]), ws("t"))]
    #[case::absolute_ws_scheme(chrome("GET ws://eval.example.com/wsv2/t HTTP/1.1", &[], &[]), ws("t"))]
    #[case::absolute_any_case(chrome("GET HTTP://EVAL.Example.COM/wsv2/t HTTP/1.1", &[], &[]), ws("t"))]
    #[case::absolute_default_port(chrome("GET http://eval.example.com:80/wsv2/t HTTP/1.1", &[], &[]), ws("t"))]
    #[case::absolute_empty_port(chrome("GET http://eval.example.com:/wsv2/t HTTP/1.1", &[], &[]), ws("t"))]
    #[case::absolute_port_both(chrome("GET http://eval.example.com:8080/wsv2/t HTTP/1.1", &["Host"], &["Host: eval.example.com:08080"]), ws("t"))]
    #[case::absolute_ipv6(chrome("GET http://[::1]:8080/wsv2/t HTTP/1.1", &["Host"], &["Host: [::1]:8080"]), ws("t"))]
    #[case::absolute_query(chrome("GET http://eval.example.com/wsv2?token=q HTTP/1.1", &[], &[]), ws("q"))]
    #[case::absolute_query_no_path(chrome("GET http://eval.example.com?token=q HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    #[case::absolute_no_path(chrome("GET http://eval.example.com HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    #[case::absolute_healthz(head("GET http://a/healthz HTTP/1.1", &["Host: a"]), Want::Healthz)]
    #[case::absolute_other_path(chrome("GET http://eval.example.com/other HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    #[case::absolute_host_mismatch(chrome("GET http://evil.example/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "host_mismatch"))]
    #[case::absolute_port_mismatch(chrome("GET http://eval.example.com:8080/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "host_mismatch"))]
    #[case::absolute_port_80_vs_8080(chrome("GET http://eval.example.com/wsv2/t HTTP/1.1", &["Host"], &["Host: eval.example.com:8080"]), Want::Err(400, "host_mismatch"))]
    #[case::absolute_missing_host(chrome("GET http://eval.example.com/wsv2/t HTTP/1.1", &["Host"], &[]), Want::Err(400, "missing_host"))]
    #[case::absolute_https(chrome("GET https://eval.example.com/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "unsupported_scheme"))]
    #[case::absolute_wss(chrome("GET wss://eval.example.com/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "unsupported_scheme"))]
    #[case::absolute_ftp(chrome("GET ftp://eval.example.com/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "unsupported_scheme"))]
    #[case::absolute_urn(chrome("GET urn:wsv2:t HTTP/1.1", &[], &[]), Want::Err(400, "unsupported_scheme"))]
    #[case::absolute_no_slashes(chrome("GET http:/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "invalid_target"))]
    #[case::absolute_empty_authority(chrome("GET http:///wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "invalid_target"))]
    #[case::absolute_port_only(chrome("GET http://:80/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "invalid_target"))]
    #[case::absolute_userinfo(chrome("GET http://u:p@eval.example.com/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "invalid_target"))]
    #[case::asterisk(chrome("GET * HTTP/1.1", &[], &[]), Want::Err(400, "invalid_target"))]
    #[case::relative(chrome("GET wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "invalid_target"))]
    #[case::bad_scheme_char(chrome("GET 1http://eval.example.com/wsv2/t HTTP/1.1", &[], &[]), Want::Err(400, "invalid_target"))]
    // Percent-encoded tokens.
    #[case::path_escapes(chrome("GET /wsv2/v4%2Epublic%2eabc HTTP/1.1", &[], &[]), ws("v4.public.abc"))]
    #[case::path_every_byte_escaped(chrome("GET /wsv2/%76%34%2E%71 HTTP/1.1", &[], &[]), ws("v4.q"))]
    #[case::path_plus_is_plus(chrome("GET /wsv2/a+b HTTP/1.1", &[], &[]), ws("a+b"))]
    #[case::path_escaped_plus(chrome("GET /wsv2/a%2Bb HTTP/1.1", &[], &[]), ws("a+b"))]
    #[case::path_escaped_percent(chrome("GET /wsv2/a%25b HTTP/1.1", &[], &[]), ws("a%b"))]
    #[case::path_escaped_utf8(chrome("GET /wsv2/%C3%A9 HTTP/1.1", &[], &[]), ws("\u{e9}"))]
    #[case::query_escapes(chrome("GET /wsv2?token=v4%2Eq HTTP/1.1", &[], &[]), ws("v4.q"))]
    #[case::query_plus_is_plus(chrome("GET /wsv2?token=a+b HTTP/1.1", &[], &[]), ws("a+b"))]
    #[case::absolute_escapes(chrome("GET http://eval.example.com/wsv2/v4%2Eq HTTP/1.1", &[], &[]), ws("v4.q"))]
    #[case::bearer_not_decoded(chrome("GET /wsv2 HTTP/1.1", &[], &["Authorization: Bearer a%2Eb"]), ws("a%2Eb"))]
    #[case::path_bad_hex(chrome("GET /wsv2/a%zzb HTTP/1.1", &[], &[]), Want::Err(400, "token_encoding"))]
    #[case::path_half_hex(chrome("GET /wsv2/a%2zb HTTP/1.1", &[], &[]), Want::Err(400, "token_encoding"))]
    #[case::path_truncated(chrome("GET /wsv2/a%2 HTTP/1.1", &[], &[]), Want::Err(400, "token_encoding"))]
    #[case::path_lone_percent(chrome("GET /wsv2/% HTTP/1.1", &[], &[]), Want::Err(400, "token_encoding"))]
    #[case::path_not_utf8(chrome("GET /wsv2/a%FFb HTTP/1.1", &[], &[]), Want::Err(400, "token_encoding"))]
    #[case::query_truncated(chrome("GET /wsv2?token=a%2 HTTP/1.1", &[], &[]), Want::Err(400, "token_encoding"))]
    #[case::query_bad_hex(chrome("GET /wsv2?token=%zz&x=1 HTTP/1.1", &[], &[]), Want::Err(400, "token_encoding"))]
    #[case::unused_query_not_decoded(chrome("GET /wsv2/p?token=%zz HTTP/1.1", &[], &[]), ws("p"))]
    #[case::other_param_not_decoded(chrome("GET /wsv2?x=%zz&token=q HTTP/1.1", &[], &[]), ws("q"))]
    #[case::routing_is_not_decoded(chrome("GET /wsv%32/t HTTP/1.1", &[], &[]), Want::Err(404, "not_found"))]
    fn request_table(#[case] input: Vec<u8>, #[case] want: Want) {
        let got = parse_request(&input, &Limits::default());
        match (&got, &want) {
            (Ok(Some((Route::WebSocket(req), n))), Want::Ws(token)) => {
                assert_eq!(*n, input.len());
                assert_eq!(&req.token, token);
            }
            (Ok(Some((Route::Healthz, n))), Want::Healthz) => assert_eq!(*n, input.len()),
            (Ok(None), Want::More) => {}
            (Err(e), Want::Err(status, label)) => {
                assert_eq!((e.status(), e.as_str()), (*status, *label), "{e}");
            }
            _ => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[rstest]
    #[case::same("a.example", "a.example", true)]
    #[case::host_case("A.Example", "a.EXAMPLE", true)]
    #[case::default_port("a", "a:80", true)]
    #[case::empty_port("a:", "a", true)]
    #[case::leading_zeros("a:0080", "a:80", true)]
    #[case::zero_port("a:0", "a:000", true)]
    #[case::other_port("a:8080", "a", false)]
    #[case::other_host("a", "b", false)]
    #[case::ipv6("[::1]:80", "[::1]", true)]
    #[case::ipv6_other_port("[::1]:81", "[::1]", false)]
    #[case::ipv6_is_not_its_last_group("[::1]", "[:", false)]
    #[case::huge_port("a:99999999999", "a:99999999999", true)]
    #[case::huge_ports_differ("a:99999999999", "a:99999999998", false)]
    #[case::huge_port_is_not_zero("a:99999999999", "a:0", false)]
    fn authorities(#[case] a: &str, #[case] b: &str, #[case] same: bool) {
        assert_eq!(same_authority(a, b), same, "{a} vs {b}");
        assert_eq!(same_authority(b, a), same, "{b} vs {a}");
    }

    #[test]
    fn missing_version_is_a_plain_400() {
        let mut out = Vec::new();
        write_error(&mut out, &RequestError::MissingWebSocketVersion);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\nmissing Sec-WebSocket-Version\n"),
            "{text}"
        );
    }

    #[test]
    fn non_utf8_origin_is_refused_not_mangled() {
        let mut input = chrome("GET /wsv2/t HTTP/1.1", &["Origin"], &[]);
        input.truncate(input.len() - 2);
        input.extend_from_slice(b"Origin: \xff\xfe\r\n\r\n");
        let err = parse_request(&input, &Limits::default()).unwrap_err();
        assert_eq!(err, RequestError::Malformed(httparse::Error::HeaderValue));
    }

    #[test]
    fn chrome_request_fields() {
        let mut input = chrome(
            "GET /wsv2/tok HTTP/1.1",
            &[],
            &[
                "Sec-WebSocket-Protocol: , third ,",
                "Sec-WebSocket-Extensions: x-other",
                "X-Forwarded-For: 192.0.2.1",
                "x-forwarded-for: 192.0.2.2, 192.0.2.3",
                "Origin: https://second.example",
            ],
        );
        let head_len = input.len();
        input.extend_from_slice(b"\x81\x85frame");
        let (route, n) = parse_request(&input, &Limits::default()).unwrap().unwrap();
        assert_eq!(n, head_len);
        let Route::WebSocket(req) = route else {
            panic!("{route:?}")
        };
        assert_eq!(
            req,
            UpgradeRequest {
                token: Some("tok".into()),
                key: ClientKey::from_ascii(b"dGhlIHNhbXBsZSBub25jZQ==").unwrap(),
                protocols: vec!["ot.v1".into(), "json".into(), "third".into()],
                extensions: Some("permessage-deflate; client_max_window_bits, x-other".into()),
                origin: Some("https://replit.com".into()),
                x_forwarded_for: Some("192.0.2.1, 192.0.2.2, 192.0.2.3".into()),
            }
        );
        assert!(!format!("{req:?}").contains("tok\""), "{req:?}");
    }

    #[test]
    fn request_line_limit_counts_bytes_received() {
        let limits = Limits {
            max_request_line: 20,
            max_head: 100,
            max_headers: 4,
        };
        let line = b"GET /wsv2/abcdefghijklmnopqrstuvwxyz";
        // 20 bytes and a CR could still be a 20-byte line.
        assert_eq!(parse_request(&line[..21], &limits), Ok(None));
        assert_eq!(
            parse_request(&line[..22], &limits),
            Err(RequestError::RequestLineTooLong)
        );
        let exact = head("GET /wsv2/ab HTTP/1.1", &[]);
        assert_eq!(exact.iter().position(|&b| b == b'\r'), Some(21));
        assert_eq!(
            parse_request(&exact, &limits),
            Err(RequestError::RequestLineTooLong)
        );
        let fits = head("GET /wsv2/a HTTP/1.1", &["Host: h"]);
        assert_eq!(parse_request(&fits, &limits), Err(RequestError::NotUpgrade));
        // A too-long line ending in a bare LF: refused for its length,
        // whether the LF came in the same read or not (it used to be
        // `malformed` when it did).
        let mut bare = line[..22].to_vec();
        assert_eq!(
            parse_request(&bare, &limits),
            Err(RequestError::RequestLineTooLong)
        );
        bare.extend_from_slice(b"\nHost: h\r\n\r\n");
        assert_eq!(
            parse_request(&bare, &limits),
            Err(RequestError::RequestLineTooLong)
        );
        // One that fits is still refused for its bare LF.
        let mut short = line[..20].to_vec();
        short.extend_from_slice(b"\nHost: h\r\n\r\n");
        assert_eq!(
            parse_request(&short, &limits),
            Err(RequestError::Malformed(httparse::Error::NewLine))
        );
    }

    #[test]
    fn head_limit_includes_the_blank_line() {
        let input = head("GET /healthz HTTP/1.1", &["Host: a"]);
        let exact = Limits {
            max_head: input.len(),
            ..Limits::default()
        };
        assert!(matches!(
            parse_request(&input, &exact),
            Ok(Some((Route::Healthz, _)))
        ));
        let short = Limits {
            max_head: input.len() - 1,
            ..Limits::default()
        };
        assert_eq!(
            parse_request(&input, &short),
            Err(RequestError::HeadTooLarge)
        );
        assert_eq!(parse_request(&input[..input.len() - 2], &short), Ok(None));
    }

    #[test]
    fn max_headers_is_inclusive() {
        let limits = Limits {
            max_headers: CHROME.len(),
            ..Limits::default()
        };
        assert!(parse_request(&chrome("GET /wsv2/t HTTP/1.1", &[], &[]), &limits).is_ok());
        assert_eq!(
            parse_request(&chrome("GET /wsv2/t HTTP/1.1", &[], &["X: y"]), &limits),
            Err(RequestError::TooManyHeaders)
        );
    }

    fn valid_requests() -> Vec<Vec<u8>> {
        vec![
            chrome("GET /wsv2/v4.public.token HTTP/1.1", &[], &[]),
            chrome(
                "GET /wsv2 HTTP/1.1",
                &[],
                &["Authorization: Bearer v4.public.b"],
            ),
            head("GET /healthz HTTP/1.0", &[]),
            chrome(
                "GET http://eval.example.com/wsv2/v4.public.a HTTP/1.1",
                &[],
                &[],
            ),
            chrome("GET /wsv2?token=v4%2Epublic%2Eq HTTP/1.1", &[], &[]),
        ]
    }

    #[test]
    fn split_at_every_offset() {
        for request in valid_requests() {
            let whole = parse_request(&request, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!(whole.1, request.len());
            let mut stream = request.clone();
            stream.extend_from_slice(b"\x81\x80\x00\x00\x00\x00\x88\x80");
            for end in 0..=stream.len() {
                let got = parse_request(&stream[..end], &Limits::default());
                if end < request.len() {
                    assert_eq!(got, Ok(None), "prefix of {end} bytes");
                } else {
                    assert_eq!(got.as_ref(), Ok(&Some(whole.clone())), "{end} bytes");
                }
            }
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, the verdict on a stream must not depend on
        /// where reads ended: once a prefix gets a verdict, every longer
        /// prefix gets the same one. Small limits (including max_head equal
        /// to max_request_line, which the config allows) and an alphabet
        /// heavy in CR and LF reach the limit branches.
        #[test]
        fn verdict_does_not_depend_on_where_reads_end(
            bytes in proptest::collection::vec(
                proptest::sample::select(&b"AB :\r\n\r\n"[..]), 0..64),
            max_request_line in 4usize..20,
            head_extra in 0usize..12,
        ) {
            let limits = Limits {
                max_request_line,
                max_head: max_request_line + head_extra,
                ..Limits::default()
            };
            let mut first: Option<(usize, Result<Option<usize>, RequestError>)> = None;
            for end in 0..=bytes.len() {
                let got = find_head_end(&bytes[..end], &limits);
                match &first {
                    Some((at, verdict)) => proptest::prop_assert_eq!(
                        &got, verdict, "{} bytes gave another verdict than {} bytes", end, at),
                    None if got != Ok(None) => first = Some((end, got)),
                    None => {}
                }
            }
        }
    }

    #[test]
    fn error_response_headers() {
        let text = |err: RequestError| {
            let mut out = Vec::new();
            write_error(&mut out, &err);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            text(RequestError::MissingKey),
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 26\r\nConnection: close\r\n\r\nmissing Sec-WebSocket-Key\n"
        );
        let method = text(RequestError::MethodNotAllowed);
        assert!(method.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(method.contains("\r\nAllow: GET\r\n"));
        for err in [RequestError::NotUpgrade, RequestError::WebSocketVersion] {
            let upgrade = text(err);
            assert!(upgrade.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
            assert!(upgrade.contains("\r\nUpgrade: websocket\r\n"));
            assert!(upgrade.contains("\r\nSec-WebSocket-Version: 13\r\n"));
            assert!(upgrade.contains("\r\nConnection: Upgrade, close\r\n"));
        }
        assert!(text(RequestError::RequestLineTooLong).starts_with("HTTP/1.1 414 URI Too Long\r\n"));
    }

    /// Every writer's output must itself parse as a response whose
    /// Content-Length matches the body.
    #[rstest]
    #[case::status_401(|out: &mut Vec<u8>| write_status(out, 401, "stage=token;reason=expired"), 401, "stage=token;reason=expired\n")]
    #[case::status_503(|out: &mut Vec<u8>| write_status(out, 503, "draining"), 503, "draining\n")]
    #[case::retry_429(|out: &mut Vec<u8>| write_status_retry(out, 429, "stage=admission;reason=per_ip_rate", 3), 429, "stage=admission;reason=per_ip_rate\n")]
    #[case::unknown_status(|out: &mut Vec<u8>| write_status(out, 599, "x"), 599, "x\n")]
    #[case::healthz(write_healthz, 200, "ok\n")]
    #[case::head_too_large(|out: &mut Vec<u8>| write_error(out, &RequestError::HeadTooLarge), 431, "request head too large\n")]
    fn plain_responses_parse(
        #[case] write: fn(&mut Vec<u8>),
        #[case] status: u16,
        #[case] body: &str,
    ) {
        let mut out = Vec::new();
        write(&mut out);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(n) = resp.parse(&out).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(resp.code, Some(status));
        let length = resp
            .headers
            .iter()
            .find(|h| h.name == "Content-Length")
            .map(|h| {
                std::str::from_utf8(h.value)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            });
        assert_eq!(length, Some(out.len() - n));
        assert_eq!(&out[n..], body.as_bytes());
    }

    #[test]
    fn switching_protocols() {
        let mut out = Vec::new();
        write_switching_protocols(
            &mut out,
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
            Some("ot.v1"),
            None,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: ot.v1\r\n\r\n"
        );
    }

    #[test]
    fn header_values_cannot_inject() {
        let mut out = Vec::new();
        write_status(&mut out, 401, "line\r\nSet-Cookie: x");
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        assert!(resp.parse(&out).unwrap().is_complete());
        assert!(resp.headers.iter().all(|h| h.name != "Set-Cookie"));
        let mut out = Vec::new();
        write_switching_protocols(&mut out, "a", Some("p\r\nX-Evil: 1"), None);
        assert!(!out.windows(9).any(|w| w == b"\nX-Evil: "));
    }

    fn small_limits() -> impl Strategy<Value = Limits> {
        (0usize..80, 0usize..300, 0usize..20).prop_map(|(line, head, headers)| Limits {
            max_request_line: line,
            max_head: head,
            max_headers: headers,
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(
            buf in proptest::collection::vec(any::<u8>(), 0..2048),
            limits in prop_oneof![Just(Limits::default()), small_limits()],
        ) {
            if let Ok(Some((_, n))) = parse_request(&buf, &limits) {
                prop_assert!(n <= buf.len());
            }
        }

        #[test]
        fn never_panics_on_mutated_requests(
            which in 0..valid_requests().len(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            limits in prop_oneof![Just(Limits::default()), small_limits()],
        ) {
            let mut buf = valid_requests().swap_remove(which);
            for (at, byte) in edits {
                let i = at.index(buf.len());
                buf[i] = byte;
            }
            if let Ok(Some((_, n))) = parse_request(&buf, &limits) {
                prop_assert!(n <= buf.len());
            }
        }

        #[test]
        fn trailing_bytes_do_not_matter(
            which in 0..valid_requests().len(),
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let request = valid_requests().swap_remove(which);
            let whole = parse_request(&request, &Limits::default());
            let mut stream = request.clone();
            stream.extend_from_slice(&tail);
            prop_assert_eq!(parse_request(&stream, &Limits::default()), whole);
        }

        /// Any token, with any of its bytes percent-encoded (the rest left
        /// as they are where a path may hold them), comes back as it was.
        #[test]
        fn percent_encoded_tokens_round_trip(
            token in "[A-Za-z0-9._~+\\-]{1,40}|\\PC{1,20}",
            encode in proptest::collection::vec(any::<bool>(), 0..160),
            in_query in any::<bool>(),
        ) {
            let mut encoded = String::new();
            for (i, b) in token.bytes().enumerate() {
                let plain = b.is_ascii_alphanumeric() || b"._~+-".contains(&b);
                if plain && !encode.get(i).copied().unwrap_or(false) {
                    encoded.push(b as char);
                } else {
                    encoded.push_str(&format!("%{b:02X}"));
                }
            }
            let line = if in_query {
                format!("GET /wsv2?token={encoded} HTTP/1.1")
            } else {
                format!("GET /wsv2/{encoded} HTTP/1.1")
            };
            let got = parse_request(&chrome(&line, &[], &[]), &Limits::default());
            let Ok(Some((Route::WebSocket(req), _))) = got else {
                return Err(TestCaseError::fail(format!("{line}: {got:?}")));
            };
            prop_assert_eq!(req.token, Some(token));
        }

        /// An absolute-form target routes exactly as its origin-form path and
        /// query do, whatever they are.
        #[test]
        fn absolute_form_routes_like_origin_form(
            prefix in prop_oneof![Just("/wsv2"), Just("/wsv2/"), Just("/healthz"), Just("/"), Just("/x")],
            rest in "[A-Za-z0-9.%?=&+_/-]{0,16}",
            scheme in prop_oneof![Just("http"), Just("ws"), Just("Http")],
        ) {
            let origin = chrome(&format!("GET {prefix}{rest} HTTP/1.1"), &[], &[]);
            let absolute = chrome(
                &format!("GET {scheme}://eval.example.com{prefix}{rest} HTTP/1.1"),
                &[],
                &[],
            );
            let route = |input: &[u8]| {
                parse_request(input, &Limits::default()).map(|r| r.map(|(route, _)| route))
            };
            prop_assert_eq!(route(&origin), route(&absolute));
        }
    }
}
