//! `handshake::parse_conman_response` (Conman's answer to our upgrade) on
//! arbitrary bytes cut at arbitrary points (see chunks.rs for the input
//! layout). Fed as the session feeds it (each chunk appended, the whole
//! buffer parsed again until a verdict), it must reach the verdict it
//! reaches on the stream in one piece; never panics; a head it accepts ends
//! with its empty line within the input, and the frames after it change
//! nothing.

use eval_proxy::proto::handshake::parse_conman_response;

use crate::chunks;

const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const MAX_HEAD: usize = 4096;

pub fn run(data: &[u8]) {
    let Some((stream, chunks)) = chunks::split(data) else {
        return;
    };
    let whole = parse_conman_response(stream, ACCEPT, MAX_HEAD);
    let mut buf = Vec::new();
    let mut verdict = Ok(None);
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        verdict = parse_conman_response(&buf, ACCEPT, MAX_HEAD);
        if !matches!(verdict, Ok(None)) {
            break;
        }
    }
    assert_eq!(verdict, whole, "chunking changed the verdict");

    if let Ok(Some((_, head_len))) = whole {
        assert!(head_len <= stream.len());
        // An empty line ends it; lines may end in a bare LF.
        let head = &stream[..head_len];
        assert!(head.ends_with(b"\n\r\n") || head.ends_with(b"\n\n"));
        let mut more = stream[..head_len].to_vec();
        more.extend_from_slice(b"\x81\x05hello");
        assert_eq!(parse_conman_response(&more, ACCEPT, MAX_HEAD), whole);
    }
}
