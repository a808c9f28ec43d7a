//! `FrameHeader::parse` on arbitrary bytes. Shared by the fuzz target and
//! tests/corpus_replay.rs so a corpus file means the same thing to both.

use eval_proxy::proto::frame::{FrameHeader, MAX_HEADER_LEN};

/// Panics if `parse` breaks its contract: a header never reaches past 14
/// bytes or past the input, every shorter prefix asks for more bytes, and
/// the header survives an encode/parse round trip (with a length encoding no
/// longer than the one received, which may be non-minimal).
pub fn run(data: &[u8]) {
    match FrameHeader::parse(data) {
        Ok(Some((header, len))) => {
            assert!(
                len <= data.len() && len <= MAX_HEADER_LEN,
                "header length {len}"
            );
            for cut in 0..len {
                assert_eq!(FrameHeader::parse(&data[..cut]), Ok(None), "prefix {cut}");
            }
            let mut out = [0u8; MAX_HEADER_LEN];
            let encoded = header.encode(&mut out);
            assert!(encoded <= len, "re-encoded header is longer");
            assert_eq!(
                FrameHeader::parse(&out[..encoded]),
                Ok(Some((header, encoded)))
            );
        }
        Ok(None) => assert!(data.len() < MAX_HEADER_LEN, "14 bytes always decide"),
        // The 64-bit length is only judged once all of it is there.
        Err(_) => assert!(data.len() >= 10),
    }
}
