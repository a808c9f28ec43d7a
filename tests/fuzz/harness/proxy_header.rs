//! `proxy_header::parse` on arbitrary bytes: never panics; a complete header
//! lies within the input and within the protocol's bounds, parses alike on
//! its own, and every shorter prefix of it asks for more; an input that asks
//! for more does so for each of its prefixes too.

use eval_proxy::proto::proxy_header::{parse, V1_MAX, V2_MAX_BODY};

pub fn run(data: &[u8]) {
    match parse(data) {
        Ok(Some(h)) => {
            assert!(h.len <= data.len(), "len {} past the input", h.len);
            let bound = if data[0] == b'P' {
                V1_MAX
            } else {
                16 + V2_MAX_BODY
            };
            assert!(h.len <= bound, "len {} past {bound}", h.len);
            assert_eq!(parse(&data[..h.len]), Ok(Some(h)));
            for cut in 0..h.len {
                assert_eq!(parse(&data[..cut]), Ok(None), "prefix {cut} of a header");
            }
        }
        Ok(None) => {
            assert!(
                data.len() < 16 + V2_MAX_BODY,
                "{} bytes and still more wanted",
                data.len()
            );
            for cut in 0..data.len() {
                assert_eq!(
                    parse(&data[..cut]),
                    Ok(None),
                    "prefix {cut} of an incomplete header"
                );
            }
        }
        Err(_) => {}
    }
}
