//! `http1::parse_request` on arbitrary bytes cut at arbitrary points (see
//! chunks.rs for the input layout). Fed as the session feeds it (each chunk
//! appended, the whole buffer parsed again until a verdict), it must reach
//! the verdict it reaches on the stream in one piece. On the whole stream:
//! never panics; "need more bytes" holds for every prefix of an input that
//! needs more bytes; a complete head's length lies within the input and
//! bytes after it change nothing; an upgrade accepted with an origin-form
//! target is accepted alike with the absolute-form target that names its
//! Host.

use eval_proxy::proto::http1::{parse_request, Limits, Route};

use crate::chunks;

const LIMITS: Limits = Limits {
    max_request_line: 256,
    max_head: 1024,
    max_headers: 16,
};

pub fn run(data: &[u8]) {
    let Some((stream, chunks)) = chunks::split(data) else {
        return;
    };
    let whole = parse_request(stream, &LIMITS);
    let mut buf = Vec::new();
    let mut verdict = Ok(None);
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        verdict = parse_request(&buf, &LIMITS);
        if !matches!(verdict, Ok(None)) {
            break;
        }
    }
    assert_eq!(verdict, whole, "chunking changed the verdict");

    match whole {
        Ok(Some((_, head_len))) => {
            assert!(
                head_len <= stream.len(),
                "head_len {head_len} past the input"
            );
            let mut more = stream[..head_len].to_vec();
            more.extend_from_slice(b"\x81\x80junk");
            assert!(matches!(parse_request(&more, &LIMITS), Ok(Some((_, n))) if n == head_len));
            absolute_form_agrees(&stream[..head_len], &LIMITS);
        }
        Ok(None) => {
            for cut in 0..stream.len() {
                assert!(
                    matches!(parse_request(&stream[..cut], &LIMITS), Ok(None)),
                    "prefix {cut} of an incomplete head was rejected"
                );
            }
        }
        Err(e) => {
            assert!((400..=431).contains(&e.status()), "status {}", e.status());
        }
    }
}

/// Rewrites `GET /…` to `GET http://<Host>/…` and expects the same route.
fn absolute_form_agrees(head: &[u8], limits: &Limits) {
    let Ok(Some((route, _))) = parse_request(head, limits) else {
        return;
    };
    if !matches!(route, Route::WebSocket(_)) {
        return;
    }
    // The request parsed, so it has exactly one Host header.
    let Some(host) = head
        .split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let (name, value) = line.split_at(colon);
            name.eq_ignore_ascii_case(b"host")
                .then(|| std::str::from_utf8(value[1..].trim_ascii()).ok())
                .flatten()
        })
        .next()
    else {
        return;
    };
    // A Host of only a port is a valid Host header but no authority.
    if !head.starts_with(b"GET /") || host.starts_with(':') {
        return;
    }
    let prefix = format!("http://{host}");
    let mut absolute = b"GET ".to_vec();
    absolute.extend_from_slice(prefix.as_bytes());
    absolute.extend_from_slice(&head[4..]);
    let wider = Limits {
        max_request_line: limits.max_request_line + prefix.len(),
        max_head: limits.max_head + prefix.len(),
        ..*limits
    };
    assert_eq!(
        parse_request(&absolute, &wider).map(|r| r.map(|(route, _)| route)),
        Ok(Some(route)),
        "absolute-form of {:?}",
        String::from_utf8_lossy(head)
    );
}
