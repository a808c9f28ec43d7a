//! The Controlplane client's reading of an answer, on arbitrary bytes cut at
//! arbitrary points (see chunks.rs for the input layout), and the control
//! socketpair's message decoding on the same bytes.
//!
//! HTTP, fed as `client::exchange` feeds `http::parse_response` (each chunk
//! appended, the buffer parsed again until a verdict, then the peer's
//! close): the same verdict as on the stream in one piece; a response
//! stays within the input and its limits, and one that keeps the connection
//! ends where it says, whatever follows. Its placement (`placement_answer`)
//! follows the contract's status mapping; a placement's Conman URL makes an
//! upgrade request that parses back to the same path and Host (no byte of
//! an answer can start a header line), and the reply the control shard
//! builds from either outcome survives the socketpair's encoding. Read as
//! a revocations poll (`revocations_answer`), only a 200 is an answer; the
//! entries that validate hold a value a header or a log could carry, and
//! the set they make survives the round trip through `token.revoked_file`.
//!
//! Wire: `ToShard::decode` and `ToControl::decode`, run as both ends of the
//! socketpair run them (messages taken off the front of what has arrived,
//! a bad one ends the stream), decode the same messages from every
//! chunking, and each re-encodes to exactly the bytes it came from.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use eval_proxy::control::http::{
    parse_response, placement_answer, revocations_answer, HttpError, Response, MAX_BODY, MAX_TTL,
};
use eval_proxy::control::wire::{
    Found, PlacementFailure, PlacementResult, ToControl, ToShard, WireError,
};
use eval_proxy::control::Failure;
use eval_proxy::proto::handshake::write_conman_request;
use eval_proxy::token::revoke::{RevokeSet, MAX_VALUE_LEN};

use crate::chunks;

type Parsed = Result<Option<(Response, usize)>, HttpError>;
type Decode<M> = fn(&[u8]) -> Result<Option<(M, usize)>, WireError>;

pub fn run(data: &[u8]) {
    let Some((stream, chunks)) = chunks::split(data) else {
        return;
    };
    http(stream, chunks.clone());
    wire(
        stream,
        chunks.clone(),
        ToShard::decode,
        |m: &ToShard, out: &mut Vec<u8>| m.encode(out),
    );
    wire(
        stream,
        chunks,
        ToControl::decode,
        |m: &ToControl, out: &mut Vec<u8>| m.encode(out),
    );
}

/// Until a verdict, each chunk is appended and all of it parsed again; the
/// end of the stream is the peer's close.
fn read<'a>(inputs: impl Iterator<Item = &'a [u8]>) -> Parsed {
    let mut buf = Vec::new();
    for input in inputs {
        buf.extend_from_slice(input);
        let parsed = parse_response(&buf, false);
        if !matches!(parsed, Ok(None)) {
            return parsed;
        }
    }
    parse_response(&buf, true)
}

fn http<'a>(stream: &'a [u8], chunks: impl Iterator<Item = &'a [u8]>) {
    let whole = read(std::iter::once(stream));
    assert_eq!(read(chunks), whole, "chunking changed the verdict");
    let Ok(Some((response, used))) = whole else {
        return;
    };
    assert!(0 < used && used <= stream.len(), "used {used}");
    assert!(!(100..200).contains(&response.status));
    assert!(response.body.len() <= MAX_BODY);
    assert!(response
        .retry_after
        .is_none_or(|d| d <= Duration::from_secs(3600)));
    if response.keep_alive {
        // The client keeps the connection for the next request: the answer
        // must end where it says, not at the close.
        let mut next = stream[..used].to_vec();
        next.extend_from_slice(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(
            parse_response(&next, false),
            Ok(Some((response.clone(), used)))
        );
    }
    placement(&response);
    revocations(&response);
}

fn revocations(response: &Response) {
    let Ok(answer) = revocations_answer(response) else {
        return;
    };
    assert_eq!(response.status, 200);
    assert!(answer.cursor.len() <= 1024);
    let now = 1_790_000_000;
    let mut set = RevokeSet::default();
    for w in answer.revocations {
        let Ok(r) = w.into_stored() else {
            continue;
        };
        assert!(!r.value.is_empty() && r.value.len() <= MAX_VALUE_LEN);
        assert!(!r.value.chars().any(char::is_control), "{:?}", r.value);
        set.insert(r, now).expect("far below the cap");
    }
    let text = set.to_file_text(now);
    assert_eq!(RevokeSet::from_file_text(&text, now), Ok(set), "{text}");
}

fn placement(response: &Response) {
    let result = match placement_answer(response) {
        Ok(answer) => {
            assert_eq!(response.status, 200);
            assert!(!answer.vm.is_empty() && answer.vm.len() <= 255);
            assert!(answer.ttl <= MAX_TTL);
            let conman = &answer.conman;
            let found = Found {
                vm: answer.vm.clone(),
                addr: SocketAddr::new(
                    conman.ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    conman.port,
                ),
                host: conman.host_header(),
                path: conman.path.clone(),
                tls: conman.tls.then(|| conman.host.clone()),
            };
            upgrade_request_parses_back(&found);
            PlacementResult::Found(std::sync::Arc::new(found))
        }
        Err(Failure {
            reason,
            retry_after,
        }) => {
            let expected = match response.status {
                404 => PlacementFailure::UnknownRepl,
                503 => PlacementFailure::NoCapacity,
                500 | 502 | 504 => PlacementFailure::Unavailable,
                _ => PlacementFailure::BadResponse,
            };
            assert_eq!(reason, expected, "status {}", response.status);
            if reason == PlacementFailure::NoCapacity {
                assert_eq!(retry_after, response.retry_after);
            } else {
                assert_eq!(retry_after, None);
            }
            PlacementResult::Failed {
                reason,
                retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
            }
        }
    };
    let reply = ToShard::Placement { id: 7, result };
    let mut out = Vec::new();
    reply.encode(&mut out);
    assert_eq!(ToShard::decode(&out), Ok(Some((reply, out.len()))));
}

/// The Controlplane chose the Conman URL: it must not be able to bend the
/// upgrade request the proxy sends there.
fn upgrade_request_parses_back(found: &Found) {
    let mut out = Vec::new();
    write_conman_request(
        &mut out,
        &found.host,
        &found.path,
        "dGhlIHNhbXBsZSBub25jZQ==",
        &[],
        None,
        &[],
    );
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut req = httparse::Request::new(&mut headers);
    assert_eq!(
        req.parse(&out),
        Ok(httparse::Status::Complete(out.len())),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(req.path, Some(found.path.as_str()));
    let hosts: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value)
        .collect();
    assert_eq!(hosts, [found.host.as_bytes()]);
    assert_eq!(req.headers.len(), 5, "a header too many");
}

/// Messages taken off the front of what has arrived so far, each with the
/// stream range it came from, and the error that ended the stream if any.
fn messages<'a, M>(
    inputs: impl Iterator<Item = &'a [u8]>,
    decode: Decode<M>,
) -> (Vec<(M, Range<usize>)>, Option<WireError>) {
    let mut buf = Vec::new();
    let mut base = 0;
    let mut got = Vec::new();
    for input in inputs {
        buf.extend_from_slice(input);
        let mut off = 0;
        loop {
            match decode(&buf[off..]) {
                Ok(Some((msg, used))) => {
                    assert!(0 < used && used <= buf.len() - off, "used {used}");
                    got.push((msg, base + off..base + off + used));
                    off += used;
                }
                Ok(None) => break,
                Err(e) => return (got, Some(e)),
            }
        }
        buf.drain(..off);
        base += off;
    }
    (got, None)
}

fn wire<'a, M: PartialEq + std::fmt::Debug>(
    stream: &'a [u8],
    chunks: impl Iterator<Item = &'a [u8]>,
    decode: Decode<M>,
    encode: fn(&M, &mut Vec<u8>),
) {
    let whole = messages(std::iter::once(stream), decode);
    assert_eq!(
        messages(chunks, decode),
        whole,
        "chunking changed the messages"
    );
    for (msg, range) in &whole.0 {
        let mut out = Vec::new();
        encode(msg, &mut out);
        assert_eq!(out, stream[range.clone()], "{msg:?} re-encodes otherwise");
    }
}
