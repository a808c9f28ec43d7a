//! The bytes the load generator puts on the wire and expects back.
//!
//! Every message payload is a prefix of one fixed pseudo-random template,
//! except its first [`STAMP_LEN`] bytes, which carry the connection id and
//! the message's sequence number. An echo can then be checked byte for byte
//! and in order while it streams in, without buffering it or remembering
//! what was sent, and frames are built from a template masked once at start
//! (client frames use the fixed [`CLIENT_MASK`], which is still a valid mask).

use eval_proxy::proto::frame::{apply_mask, FrameHeader, OpCode, MAX_HEADER_LEN};

/// Masking exists to stop cache poisoning through browsers; a load
/// generator may use one key for everything.
pub const CLIENT_MASK: [u8; 4] = [0x5a, 0xc3, 0x96, 0x3c];

/// Sequence number (u32 LE) then connection id (u32 LE): a reordered,
/// dropped, duplicated or cross-wired message changes these bytes.
pub const STAMP_LEN: usize = 8;

pub type Stamp = [u8; STAMP_LEN];

pub fn stamp(conn: u32, seq: u32) -> Stamp {
    let mut s = [0u8; STAMP_LEN];
    s[..4].copy_from_slice(&seq.to_le_bytes());
    s[4..].copy_from_slice(&conn.to_le_bytes());
    s
}

/// The shared payload template, plain (what echoes must carry) and masked
/// with [`CLIENT_MASK`] (what goes on the wire).
#[derive(Debug)]
pub struct Payloads {
    plain: Box<[u8]>,
    masked: Box<[u8]>,
}

impl Payloads {
    /// A template for messages of up to `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let plain: Box<[u8]> = (0..max_len)
            .map(|_| {
                // xorshift64: cheap, and no byte pattern that a buggy relay
                // could reproduce by accident (no runs, no period of 4).
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let mut masked = plain.clone();
        apply_mask(&mut masked, CLIENT_MASK, 0);
        Self { plain, masked }
    }

    pub fn masked(&self) -> &[u8] {
        &self.masked
    }

    /// Whether `chunk`, found at payload offset `offset` of a `len`-byte
    /// message stamped `stamp`, is what was sent; `Err(i)` gives the offset
    /// of the first wrong byte within the message.
    pub fn check(
        &self,
        chunk: &[u8],
        offset: usize,
        stamp: &Stamp,
        len: usize,
    ) -> Result<(), usize> {
        let stamp_len = STAMP_LEN.min(len);
        let end = offset + chunk.len();
        let mut at = offset;
        while at < end && at < stamp_len {
            if chunk[at - offset] != stamp[at] {
                return Err(at);
            }
            at += 1;
        }
        if at < end {
            let got = &chunk[at - offset..];
            let want = &self.plain[at..end];
            if got != want {
                let first = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(0);
                return Err(at + first);
            }
        }
        Ok(())
    }
}

/// Appends the header of a masked Binary frame carrying a `len`-byte
/// message, followed by its masked stamp; returns how many payload bytes
/// that covered. The rest of the payload is `masked()[returned..len]`.
pub fn push_frame_head(out: &mut Vec<u8>, len: usize, stamp: &Stamp) -> usize {
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode: OpCode::Binary,
        mask: Some(CLIENT_MASK),
        payload_len: len as u64,
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    let head_len = header.encode(&mut head);
    out.extend_from_slice(&head[..head_len]);
    let stamp_len = STAMP_LEN.min(len);
    let start = out.len();
    out.extend_from_slice(&stamp[..stamp_len]);
    apply_mask(&mut out[start..], CLIENT_MASK, 0);
    stamp_len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payloads: &Payloads, len: usize, stamp: &Stamp) -> Vec<u8> {
        let mut out = Vec::new();
        let covered = push_frame_head(&mut out, len, stamp);
        out.extend_from_slice(&payloads.masked()[covered..len]);
        out
    }

    #[test]
    fn frames_unmask_to_stamp_then_template() {
        let payloads = Payloads::new(70_000);
        for len in [0, 1, 7, 8, 9, 125, 126, 65_535, 65_536, 70_000] {
            let s = stamp(3, 41);
            let bytes = frame(&payloads, len, &s);
            let (header, head_len) = FrameHeader::parse(&bytes)
                .expect("valid")
                .expect("complete");
            assert_eq!(header.payload_len, len as u64);
            assert_eq!(header.mask, Some(CLIENT_MASK));
            assert_eq!(header.opcode, OpCode::Binary);
            let mut payload = bytes[head_len..].to_vec();
            apply_mask(&mut payload, CLIENT_MASK, 0);
            assert_eq!(payloads.check(&payload, 0, &s, len), Ok(()), "len {len}");
            // Split anywhere, the pieces check out too.
            let mid = len / 3;
            assert_eq!(payloads.check(&payload[..mid], 0, &s, len), Ok(()));
            assert_eq!(payloads.check(&payload[mid..], mid, &s, len), Ok(()));
        }
    }

    #[test]
    fn check_names_the_first_wrong_byte() {
        let payloads = Payloads::new(64);
        let s = stamp(1, 2);
        let mut good = Vec::from(&s[..]);
        good.extend_from_slice(&payloads.plain[8..64]);
        assert_eq!(payloads.check(&good, 0, &s, 64), Ok(()));
        for at in [0, 3, 7, 8, 40, 63] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert_eq!(payloads.check(&bad, 0, &s, 64), Err(at));
            assert_eq!(payloads.check(&bad[at..], at, &s, 64), Err(at));
        }
        assert_eq!(
            payloads.check(&good, 0, &stamp(1, 3), 64),
            Err(0),
            "another sequence number is an error"
        );
    }
}
