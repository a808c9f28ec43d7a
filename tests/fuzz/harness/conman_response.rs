//! `handshake::parse_conman_response` (Conman's answer to our upgrade) on
//! arbitrary bytes: never panics and never claims a head past the input.

use eval_proxy::proto::handshake::parse_conman_response;

pub fn run(data: &[u8]) {
    let accept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
    if let Ok(Some((_, head_len))) = parse_conman_response(data, accept, 4096) {
        assert!(head_len <= data.len());
        assert!(data[..head_len].ends_with(b"\r\n\r\n"));
    }
}
