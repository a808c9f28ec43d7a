//! `http1::parse_request` on arbitrary bytes: never panics, and "need more
//! bytes" stays true for every prefix of an input that needs more bytes;
//! a complete head's length lies within the input.

use eval_proxy::proto::http1::{parse_request, Limits};

pub fn run(data: &[u8]) {
    let limits = Limits {
        max_request_line: 256,
        max_head: 1024,
        max_headers: 16,
    };
    match parse_request(data, &limits) {
        Ok(Some((_, head_len))) => {
            assert!(head_len <= data.len(), "head_len {head_len} past the input");
            // Bytes after the head never change the verdict.
            let mut more = data[..head_len].to_vec();
            more.extend_from_slice(b"\x81\x80junk");
            assert!(matches!(parse_request(&more, &limits), Ok(Some((_, n))) if n == head_len));
        }
        Ok(None) => {
            for cut in 0..data.len() {
                assert!(
                    matches!(parse_request(&data[..cut], &limits), Ok(None)),
                    "prefix {cut} of an incomplete head was rejected"
                );
            }
        }
        Err(e) => {
            assert!((400..=431).contains(&e.status()), "status {}", e.status());
        }
    }
}
