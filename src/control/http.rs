//! The HTTP/1.1 client side of the Controlplane contract, sans-IO: the
//! placement request, the response parser (Content-Length, chunked, or
//! close-delimited bodies) and the mapping of an answer to a placement or
//! a failure reason.
//!
//! Public so the fuzz target (tests/fuzz) can feed the parser and the
//! placement mapping bytes from nowhere; the proxy itself only uses it from
//! `client`.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::Deserialize;

use super::placer::Failure;
use super::url::{self, Url};
use super::wire::PlacementFailure;

/// Response head limit; the Controlplane's answers are a few hundred bytes.
pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_BODY: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;
/// A chunk-size line (hex size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;
/// Retry-After beyond this is treated as this: a client told to wait a day
/// would rather hear "later".
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// A placement cached longer than this is asked for again anyway.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed response")]
    Malformed,
    #[error("response too large")]
    TooLarge,
}

/// `GET {prefix}/v1/placement?repl=R[&exclude=VM]...`: one `exclude` per
/// VM that failed in the session's attempts.
pub(crate) fn write_placement_request(
    out: &mut Vec<u8>,
    base: &Url,
    host_header: &str,
    repl: &str,
    exclude: &[String],
) {
    let mut target = base.path.trim_end_matches('/').to_owned();
    target.push_str("/v1/placement?repl=");
    url::encode_query_value(&mut target, repl);
    for vm in exclude {
        target.push_str("&exclude=");
        url::encode_query_value(&mut target, vm);
    }
    write_get(out, &target, host_header);
}

fn write_get(out: &mut Vec<u8>, target: &str, host_header: &str) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host_header.as_bytes());
    out.extend_from_slice(b"\r\nAccept: application/json\r\nUser-Agent: eval-proxy\r\n\r\n");
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<Duration>,
    /// The connection may carry the next request.
    pub keep_alive: bool,
    pub body: Vec<u8>,
}

enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// One response off the front of `buf`: `Ok(None)` until it is complete
/// (consuming and allocating nothing). `eof` says the peer closed, which
/// completes a close-delimited body.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(Response, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HttpError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooLarge),
        Err(_) => return Err(HttpError::Malformed),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let status = res.code.ok_or(HttpError::Malformed)?;
    if (100..200).contains(&status) {
        // Never asked for (no Expect, no Upgrade).
        return Err(HttpError::Malformed);
    }
    let mut keep_alive = res.version == Some(1);
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut retry_after = None;
    for h in res.headers.iter() {
        let v = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed)?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = v
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse().ok())
                .flatten()
                .ok_or(HttpError::Malformed)?;
            if content_length.is_some_and(|c| c != n) {
                return Err(HttpError::Malformed);
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return Err(HttpError::Malformed);
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            // Delta-seconds only; an HTTP-date gives no hint.
            retry_after = v
                .parse::<u64>()
                .ok()
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let rest = &buf[head_len..];
    let (body, used) = match framing {
        Framing::Empty => (Vec::new(), 0),
        Framing::Length(n) if n > MAX_BODY => return Err(HttpError::TooLarge),
        Framing::Length(n) if rest.len() < n => return Ok(None),
        Framing::Length(n) => (rest[..n].to_vec(), n),
        Framing::Chunked => {
            let Some(used) = dechunk(rest, None)? else {
                return Ok(None);
            };
            let mut body = Vec::new();
            dechunk(rest, Some(&mut body))?;
            (body, used)
        }
        Framing::UntilClose if rest.len() > MAX_BODY => return Err(HttpError::TooLarge),
        Framing::UntilClose if !eof => return Ok(None),
        Framing::UntilClose => {
            keep_alive = false;
            (rest.to_vec(), rest.len())
        }
    };
    let response = Response {
        status,
        retry_after,
        keep_alive,
        body,
    };
    Ok(Some((response, head_len + used)))
}

/// Walks a chunked body: `Ok(None)` until the last chunk and the trailers
/// are there, else the bytes it spans. With `sink`, also copies the data.
fn dechunk(mut b: &[u8], mut sink: Option<&mut Vec<u8>>) -> Result<Option<usize>, HttpError> {
    let start = b.len();
    let mut total = 0usize;
    loop {
        let Some(line_end) = find_crlf(b, MAX_CHUNK_LINE)? else {
            return Ok(None);
        };
        let size_hex = b[..line_end]
            .split(|&c| c == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if size_hex.is_empty() || size_hex.len() > 8 {
            return Err(HttpError::Malformed);
        }
        let size = size_hex.iter().try_fold(0usize, |acc, &c| {
            let d = (c as char).to_digit(16).ok_or(HttpError::Malformed)?;
            Ok(acc * 16 + d as usize)
        })?;
        b = &b[line_end + 2..];
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let Some(end) = find_crlf(b, MAX_HEAD)? else {
                    return Ok(None);
                };
                b = &b[end + 2..];
                if end == 0 {
                    return Ok(Some(start - b.len()));
                }
            }
        }
        total += size;
        if total > MAX_BODY {
            return Err(HttpError::TooLarge);
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        if &b[size..size + 2] != b"\r\n" {
            return Err(HttpError::Malformed);
        }
        if let Some(s) = sink.as_deref_mut() {
            s.extend_from_slice(&b[..size]);
        }
        b = &b[size + 2..];
    }
}

/// Where the line at the front of `b` ends, for a line of at most `max`
/// bytes before its CRLF.
fn find_crlf(b: &[u8], max: usize) -> Result<Option<usize>, HttpError> {
    match b.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i > max => Err(HttpError::TooLarge),
        Some(i) => Ok(Some(i)),
        // A line of `max` bytes may have arrived with only the CR after it,
        // so the verdict must not depend on where the read ended.
        None if b.len() > max + 1 => Err(HttpError::TooLarge),
        None => Ok(None),
    }
}

/// A 200 answer, before the Conman host is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub vm: String,
    pub conman: Url,
    pub ttl: Duration,
}

#[derive(Deserialize)]
struct AnswerBody {
    vm: String,
    conman: String,
    ttl_ms: u64,
}

/// Maps a complete response to the contract's outcomes.
pub fn placement_answer(r: &Response) -> Result<Answer, Failure> {
    match r.status {
        200 => {
            let b: AnswerBody =
                serde_json::from_slice(&r.body).map_err(|_| PlacementFailure::BadResponse)?;
            if b.vm.is_empty() || b.vm.len() > 255 {
                return Err(PlacementFailure::BadResponse.into());
            }
            let conman = url::parse_ws(&b.conman).map_err(|_| PlacementFailure::BadResponse)?;
            Ok(Answer {
                vm: b.vm,
                conman,
                ttl: Duration::from_millis(b.ttl_ms).min(MAX_TTL),
            })
        }
        404 => Err(PlacementFailure::UnknownRepl.into()),
        503 => Err(Failure {
            reason: PlacementFailure::NoCapacity,
            retry_after: r.retry_after,
        }),
        // A proxy in front of a dead or overloaded Controlplane.
        500 | 502 | 504 => Err(PlacementFailure::Unavailable.into()),
        _ => Err(PlacementFailure::BadResponse.into()),
    }
}

/// `GET {prefix}/v1/revocations?since=CURSOR` (an empty cursor the first
/// time: everything in force).
pub(crate) fn write_revocations_poll(
    out: &mut Vec<u8>,
    base: &Url,
    host_header: &str,
    cursor: &str,
) {
    let mut target = base.path.trim_end_matches('/').to_owned();
    target.push_str("/v1/revocations?since=");
    url::encode_query_value(&mut target, cursor);
    write_get(out, &target, host_header);
}

/// `POST {prefix}/v1/revocations` with one entry as its JSON body.
pub(crate) fn write_revocation_post(out: &mut Vec<u8>, base: &Url, host_header: &str, body: &str) {
    let target = format!("{}/v1/revocations", base.path.trim_end_matches('/'));
    out.extend_from_slice(
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nUser-Agent: eval-proxy\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// A `200` answer to a revocations poll: the next cursor and the entries
/// (each still to be validated by the caller).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationsAnswer {
    pub cursor: String,
    pub revocations: Vec<crate::token::revoke::Wire>,
}

/// Maps a poll's response: anything but a `200` with the contract's body
/// is an error (the cursor then stays, and the next poll asks again).
pub fn revocations_answer(r: &Response) -> Result<RevocationsAnswer, HttpError> {
    if r.status != 200 {
        return Err(HttpError::Malformed);
    }
    let a: RevocationsAnswer = serde_json::from_slice(&r.body).map_err(|_| HttpError::Malformed)?;
    if a.cursor.len() > 1024 {
        return Err(HttpError::TooLarge);
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_requests_and_answers() {
        let base = url::parse_http("http://h:1/cp").unwrap();
        let mut out = Vec::new();
        write_revocations_poll(&mut out, &base, "h:1", "a b");
        assert!(out.starts_with(b"GET /cp/v1/revocations?since=a%20b HTTP/1.1\r\nHost: h:1\r\n"));
        let mut out = Vec::new();
        write_revocation_post(
            &mut out,
            &base,
            "h:1",
            r#"{"jti":"j","until":"2030-01-01T00:00:00Z"}"#,
        );
        let raw = String::from_utf8(out).unwrap();
        assert!(
            raw.starts_with("POST /cp/v1/revocations HTTP/1.1\r\n"),
            "{raw}"
        );
        assert!(raw.contains("\r\nContent-Length: 42\r\n"), "{raw}");
        assert!(
            raw.ends_with("\r\n\r\n{\"jti\":\"j\",\"until\":\"2030-01-01T00:00:00Z\"}"),
            "{raw}"
        );
        let ok = |body: &str| Response {
            status: 200,
            retry_after: None,
            keep_alive: true,
            body: body.as_bytes().to_vec(),
        };
        let a = revocations_answer(&ok(
            r#"{"cursor":"7","revocations":[{"user":"u","until":"2030-01-01T00:00:00Z"}]}"#,
        ))
        .unwrap();
        assert_eq!((a.cursor.as_str(), a.revocations.len()), ("7", 1));
        assert!(revocations_answer(&ok(r#"{"revocations":[]}"#)).is_err());
        assert!(revocations_answer(&ok("nope")).is_err());
        let mut e = ok(r#"{"cursor":"","revocations":[]}"#);
        assert!(revocations_answer(&e).is_ok());
        e.status = 503;
        assert!(revocations_answer(&e).is_err());
    }

    fn parse_all(raw: &[u8], eof: bool) -> Result<Option<(Response, usize)>, HttpError> {
        for cut in 0..raw.len() {
            match parse_response(&raw[..cut], false) {
                Ok(None) => {}
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        parse_response(raw, eof)
    }

    #[test]
    fn request_line_and_encoding() {
        let base = url::parse_http("http://127.0.0.1:9000/cp/").unwrap();
        let mut out = Vec::new();
        let one = ["vm&2".to_owned()];
        write_placement_request(&mut out, &base, "127.0.0.1:9000", "r 1", &one);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("GET /cp/v1/placement?repl=r%201&exclude=vm%262 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"),
            "{s}"
        );
        assert!(s.ends_with("\r\n\r\n"));
        let base = url::parse_http("http://h").unwrap();
        let mut out = Vec::new();
        let several = ["vm-1".to_owned(), "vm 2".to_owned(), "vm=3&x".to_owned()];
        write_placement_request(&mut out, &base, "h", "r", &several);
        assert!(
            out.starts_with(
                b"GET /v1/placement?repl=r&exclude=vm-1&exclude=vm%202&exclude=vm%3D3%26x HTTP/1.1\r\n"
            ),
            "{}",
            String::from_utf8_lossy(&out)
        );
        let mut out = Vec::new();
        write_placement_request(&mut out, &base, "h", "r", &[]);
        assert!(out.starts_with(b"GET /v1/placement?repl=r HTTP/1.1\r\n"));
    }

    #[test]
    fn content_length_body_waits_for_every_byte() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloNEXT";
        let (r, used) = parse_all(&raw[..raw.len() - 4], false).unwrap().unwrap();
        assert_eq!(used, raw.len() - 4);
        assert_eq!(
            (r.status, r.keep_alive, r.body.as_slice()),
            (200, true, &b"hello"[..])
        );
        let (_, used) = parse_response(raw, false).unwrap().unwrap();
        assert_eq!(&raw[used..], b"NEXT");
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
        let (r, used) = parse_all(raw, false).unwrap().unwrap();
        assert_eq!(used, raw.len());
        assert_eq!(r.body, b"abc0123456789");
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n";
        assert_eq!(parse_response(bad, false), Err(HttpError::Malformed));
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(parse_response(bad, false), Err(HttpError::Malformed));
    }

    #[test]
    fn line_at_the_limit_is_judged_alike_however_it_arrives() {
        // A chunk-size line of exactly MAX_CHUNK_LINE bytes; a read that
        // ended between its CR and LF once made it too large.
        let line = format!("2;{}", "a".repeat(MAX_CHUNK_LINE - 2));
        let raw = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{line}\r\n{{}}\r\n0\r\n\r\n"
        );
        let (r, used) = parse_all(raw.as_bytes(), false).unwrap().unwrap();
        assert_eq!((r.body.as_slice(), used), (&b"{}"[..], raw.len()));
        let long = raw.replacen(";", ";a", 1);
        assert_eq!(
            parse_response(long.as_bytes(), false),
            Err(HttpError::TooLarge)
        );
    }

    #[test]
    fn close_delimited_body_needs_eof() {
        let raw = b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nnope";
        assert_eq!(parse_all(raw, false), Ok(None));
        let (r, used) = parse_response(raw, true).unwrap().unwrap();
        assert_eq!((r.status, r.keep_alive, used), (404, false, raw.len()));
        assert_eq!(r.body, b"nope");
    }

    #[test]
    fn keep_alive_by_version_and_connection_header() {
        let ka = |raw: &[u8]| parse_response(raw, false).unwrap().unwrap().0.keep_alive;
        assert!(ka(b"HTTP/1.1 204 No Content\r\n\r\n"));
        assert!(!ka(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"));
        assert!(!ka(b"HTTP/1.0 204 No Content\r\n\r\n"));
        assert!(ka(
            b"HTTP/1.0 204 No Content\r\nConnection: Keep-Alive\r\n\r\n"
        ));
    }

    #[test]
    fn retry_after_seconds() {
        let raw = b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n";
        let (r, _) = parse_response(raw, false).unwrap().unwrap();
        assert_eq!(r.retry_after, Some(Duration::from_secs(3)));
        let raw = b"HTTP/1.1 503 Busy\r\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_response(raw, false).unwrap().unwrap().0.retry_after,
            None
        );
    }

    #[test]
    fn limits_and_garbage() {
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 1, b'a');
        assert_eq!(parse_response(&big, false), Err(HttpError::TooLarge));
        let raw = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(
            parse_response(raw.as_bytes(), false),
            Err(HttpError::TooLarge)
        );
        assert_eq!(
            parse_response(b"SSH-2.0-x\r\n\r\n", false),
            Err(HttpError::Malformed)
        );
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(parse_response(raw, false), Err(HttpError::Malformed));
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(parse_response(raw, false), Err(HttpError::Malformed));
        let raw = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert_eq!(parse_response(raw, false), Err(HttpError::Malformed));
    }

    fn answer(status: u16, body: &str) -> Result<Answer, Failure> {
        placement_answer(&Response {
            status,
            retry_after: Some(Duration::from_secs(2)),
            keep_alive: true,
            body: body.as_bytes().to_vec(),
        })
    }

    #[test]
    fn contract_outcomes() {
        let a = answer(
            200,
            r#"{"vm":"vm-1","conman":"ws://127.0.0.1:7000/c","ttl_ms":1500,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(a.vm, "vm-1");
        assert_eq!((a.conman.port, a.conman.path.as_str()), (7000, "/c"));
        assert_eq!(a.ttl, Duration::from_millis(1500));
        let a = answer(
            200,
            r#"{"vm":"v","conman":"ws://h/","ttl_ms":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(a.ttl, MAX_TTL);
        let reason = |s, b| answer(s, b).unwrap_err().reason;
        assert_eq!(reason(200, "{"), PlacementFailure::BadResponse);
        assert_eq!(
            reason(200, r#"{"vm":"v","ttl_ms":1}"#),
            PlacementFailure::BadResponse
        );
        assert_eq!(
            reason(200, r#"{"vm":"v","conman":"https://h/","ttl_ms":1}"#),
            PlacementFailure::BadResponse
        );
        let a = answer(200, r#"{"vm":"v","conman":"wss://h/","ttl_ms":1}"#).unwrap();
        assert!(a.conman.tls && a.conman.port == 443);
        assert_eq!(
            reason(200, r#"{"vm":"","conman":"ws://h/","ttl_ms":1}"#),
            PlacementFailure::BadResponse
        );
        assert_eq!(reason(404, ""), PlacementFailure::UnknownRepl);
        assert_eq!(
            answer(503, "").unwrap_err(),
            Failure {
                reason: PlacementFailure::NoCapacity,
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(reason(502, ""), PlacementFailure::Unavailable);
        assert_eq!(reason(418, ""), PlacementFailure::BadResponse);
    }
}
