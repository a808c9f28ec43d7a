//! WebSocket frame headers (RFC 6455 section 5.2), payload masking, and the
//! few whole frames the proxy writes itself.
//!
//! The relay never holds a whole frame: [`FrameHeader::parse`] looks at the
//! first bytes of a frame only and leaves the payload to stream past.
#![forbid(unsafe_code)]

use crate::proto::close;

/// Longest payload a control frame may carry (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

// A Close frame's payload is the 2-byte code, then the reason.
const _: () = assert!(close::MAX_REASON_LEN + 2 == MAX_CONTROL_PAYLOAD);

/// Longest header: 2 bytes, 8 bytes of extended length, 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

const FIN: u8 = 0x80;
const MASK: u8 = 0x80;
const LEN_16: u8 = 126;
const LEN_64: u8 = 127;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
    /// 3-7 (data) and 11-15 (control); holds the 4-bit value as received.
    Reserved(u8),
}

impl OpCode {
    /// Decodes the low 4 bits of `bits`.
    pub fn from_bits(bits: u8) -> OpCode {
        match bits & 0x0f {
            0 => OpCode::Continuation,
            1 => OpCode::Text,
            2 => OpCode::Binary,
            8 => OpCode::Close,
            9 => OpCode::Ping,
            10 => OpCode::Pong,
            other => OpCode::Reserved(other),
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0,
            OpCode::Text => 1,
            OpCode::Binary => 2,
            OpCode::Close => 8,
            OpCode::Ping => 9,
            OpCode::Pong => 10,
            OpCode::Reserved(bits) => bits & 0x0f,
        }
    }

    /// Control opcodes have the high bit of the nibble set, reserved ones included.
    pub fn is_control(self) -> bool {
        self.bits() & 0x08 != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1..RSV3 as 3 bits: RSV1 = 0b100, RSV2 = 0b010, RSV3 = 0b001.
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("64-bit payload length has its most significant bit set")]
    LengthMsbSet,
}

impl FrameHeader {
    /// Parses the header at the start of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; nothing is kept, so the caller
    /// retries with a longer `buf`. `Ok(Some((header, header_len)))` leaves
    /// the payload at `buf[header_len..]`. Non-minimal length encodings are
    /// accepted because many peers send them; direction-dependent rules (mask
    /// bit, opcodes, RSV bits) are the relay tracker's job.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
        let (b0, b1) = match buf {
            [b0, b1, ..] => (*b0, *b1),
            _ => return Ok(None),
        };
        let masked = b1 & MASK != 0;
        let len7 = b1 & 0x7f;
        let ext_len = match len7 {
            LEN_16 => 2,
            LEN_64 => 8,
            _ => 0,
        };
        let mask_at = 2 + ext_len;
        let header_len = mask_at + if masked { 4 } else { 0 };

        let payload_len = match len7 {
            LEN_16 => match buf.get(2..4) {
                Some(&[a, b]) => u64::from(u16::from_be_bytes([a, b])),
                _ => return Ok(None),
            },
            LEN_64 => match buf.get(2..10) {
                Some(&[a, b, c, d, e, f, g, h]) => {
                    let len = u64::from_be_bytes([a, b, c, d, e, f, g, h]);
                    if len >> 63 != 0 {
                        return Err(FrameError::LengthMsbSet);
                    }
                    len
                }
                _ => return Ok(None),
            },
            short => u64::from(short),
        };

        let mask = if masked {
            match buf.get(mask_at..header_len) {
                Some(&[a, b, c, d]) => Some([a, b, c, d]),
                _ => return Ok(None),
            }
        } else {
            None
        };

        let header = FrameHeader {
            fin: b0 & FIN != 0,
            rsv: (b0 >> 4) & 0x07,
            opcode: OpCode::from_bits(b0),
            mask,
            payload_len,
        };
        Ok(Some((header, header_len)))
    }

    /// Writes the header with the shortest length encoding; returns its length.
    ///
    /// `payload_len` must be below 2^63 (the wire format has no room for more).
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        debug_assert!(self.payload_len >> 63 == 0, "payload_len needs 64 bits");
        out[0] = if self.fin { FIN } else { 0 } | (self.rsv & 0x07) << 4 | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { MASK } else { 0 };
        let mut at = 2;
        match self.payload_len {
            // The match arms bound the value, so the narrowing casts are exact.
            len @ 0..=125 => out[1] = mask_bit | len as u8,
            len @ 126..=0xffff => {
                out[1] = mask_bit | LEN_16;
                out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                at = 4;
            }
            len => {
                out[1] = mask_bit | LEN_64;
                out[2..10].copy_from_slice(&len.to_be_bytes());
                at = 10;
            }
        }
        if let Some(key) = self.mask {
            out[at..at + 4].copy_from_slice(&key);
            at += 4;
        }
        at
    }
}

/// XORs `buf` with `mask`, where `buf` starts `offset` bytes into the payload
/// (so a payload split across chunks unmasks piece by piece).
///
/// Works a 64-bit word at a time; [`apply_mask_reference`] is the plain
/// byte loop it is tested against.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let rot = offset % 4;
    let key: [u8; 4] = std::array::from_fn(|i| mask[(rot + i) % 4]);
    let wide: [u8; 8] = std::array::from_fn(|i| key[i % 4]);
    let wide = u64::from_ne_bytes(wide);

    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
    }
    // Whole words were consumed, so the tail starts on a multiple of 4.
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// Byte-at-a-time masking, the definition [`apply_mask`] must match.
pub fn apply_mask_reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= mask[(offset + i) % 4];
    }
}

/// Appends a whole Close frame. The reason is cut to fit a control frame
/// (123 bytes, on a char boundary). `mask` is `Some` toward Conman (the proxy
/// is its client) and `None` toward the client.
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let reason = close::truncate_reason(reason);
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    write_control(out, OpCode::Close, &payload[..2 + reason.len()], mask);
}

/// Appends a whole control frame (Close, Ping, Pong). The proxy chooses these
/// payloads itself, so one over 125 bytes is a bug: it is cut rather than
/// sent as a frame the peer would have to reject.
pub fn write_control(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    debug_assert!(opcode.is_control(), "{opcode:?} is not a control opcode");
    debug_assert!(
        payload.len() <= MAX_CONTROL_PAYLOAD,
        "control payload too long"
    );
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask,
        payload_len: payload.len() as u64,
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    let head_len = header.encode(&mut head);
    out.reserve(head_len + payload.len());
    out.extend_from_slice(&head[..head_len]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    fn header(opcode: OpCode, payload_len: u64, mask: Option<[u8; 4]>) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv: 0,
            opcode,
            mask,
            payload_len,
        }
    }

    #[rstest]
    #[case::empty(&[], None)]
    #[case::one_byte(&[0x81], None)]
    #[case::short_unmasked(&[0x81, 0x05], Some((header(OpCode::Text, 5, None), 2)))]
    #[case::short_masked(
        &[0x82, 0x85, 1, 2, 3, 4],
        Some((header(OpCode::Binary, 5, Some([1, 2, 3, 4])), 6))
    )]
    #[case::mask_incomplete(&[0x82, 0x85, 1, 2, 3], None)]
    #[case::len16(&[0x82, 126, 0x01, 0x00], Some((header(OpCode::Binary, 256, None), 4)))]
    #[case::len16_incomplete(&[0x82, 126, 0x01], None)]
    #[case::len16_non_minimal(&[0x82, 126, 0, 5], Some((header(OpCode::Binary, 5, None), 4)))]
    #[case::len64(
        &[0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0],
        Some((header(OpCode::Binary, 1 << 32, None), 10))
    )]
    #[case::len64_non_minimal(
        &[0x82, 127, 0, 0, 0, 0, 0, 0, 0, 7],
        Some((header(OpCode::Binary, 7, None), 10))
    )]
    #[case::len64_incomplete(&[0x82, 127, 0, 0, 0, 0, 0, 0, 0], None)]
    #[case::len64_masked(
        &[0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0, 9, 8, 7, 6],
        Some((header(OpCode::Binary, 65536, Some([9, 8, 7, 6])), 14))
    )]
    #[case::trailing_payload(&[0x89, 0x01, 0xaa, 0xbb], Some((header(OpCode::Ping, 1, None), 2)))]
    fn parse_cases(#[case] buf: &[u8], #[case] expected: Option<(FrameHeader, usize)>) {
        assert_eq!(FrameHeader::parse(buf), Ok(expected));
    }

    #[rstest]
    #[case::no_fin_rsv1(0x41, false, 0b100, OpCode::Text)]
    #[case::rsv2(0xa2, true, 0b010, OpCode::Binary)]
    #[case::rsv3(0x90, true, 0b001, OpCode::Continuation)]
    #[case::close(0x88, true, 0, OpCode::Close)]
    #[case::pong(0x8a, true, 0, OpCode::Pong)]
    #[case::reserved_data(0x83, true, 0, OpCode::Reserved(3))]
    #[case::reserved_control(0x8f, true, 0, OpCode::Reserved(15))]
    fn parse_first_byte(
        #[case] b0: u8,
        #[case] fin: bool,
        #[case] rsv: u8,
        #[case] opcode: OpCode,
    ) {
        let (h, _) = FrameHeader::parse(&[b0, 0]).unwrap().unwrap();
        assert_eq!((h.fin, h.rsv, h.opcode), (fin, rsv, opcode));
    }

    #[test]
    fn parse_rejects_64_bit_length_with_msb_set() {
        let buf = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(FrameHeader::parse(&buf), Err(FrameError::LengthMsbSet));
    }

    #[rstest]
    #[case(0, 2)]
    #[case(125, 2)]
    #[case(126, 4)]
    #[case(0xffff, 4)]
    #[case(0x1_0000, 10)]
    #[case(i64::MAX as u64, 10)]
    fn encode_uses_minimal_length(#[case] len: u64, #[case] header_len: usize) {
        let mut out = [0u8; MAX_HEADER_LEN];
        assert_eq!(
            header(OpCode::Binary, len, None).encode(&mut out),
            header_len
        );
        let masked = header(OpCode::Binary, len, Some([1, 2, 3, 4]));
        assert_eq!(masked.encode(&mut out), header_len + 4);
    }

    #[test]
    fn opcode_bits_round_trip() {
        for bits in 0..16 {
            assert_eq!(OpCode::from_bits(bits).bits(), bits);
            assert_eq!(OpCode::from_bits(bits).is_control(), bits >= 8);
        }
    }

    #[test]
    fn write_close_toward_client_is_unmasked() {
        let mut out = Vec::new();
        write_close(&mut out, 1001, "bye", None);
        assert_eq!(out, [0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']);
    }

    #[test]
    fn write_close_toward_conman_is_masked() {
        let key = [0x11, 0x22, 0x33, 0x44];
        let mut out = Vec::new();
        write_close(&mut out, 1014, "x", Some(key));
        let (h, n) = FrameHeader::parse(&out).unwrap().unwrap();
        assert_eq!(h, header(OpCode::Close, 3, Some(key)));
        let mut payload = out[n..].to_vec();
        apply_mask_reference(&mut payload, key, 0);
        assert_eq!(payload, [0x03, 0xf6, b'x']);
    }

    #[test]
    fn write_close_cuts_long_reason_on_char_boundary() {
        let reason = "é".repeat(100);
        let mut out = Vec::new();
        write_close(&mut out, 1000, &reason, None);
        let (h, n) = FrameHeader::parse(&out).unwrap().unwrap();
        assert_eq!(h.payload_len, 2 + 122);
        assert!(std::str::from_utf8(&out[n + 2..]).is_ok());
    }

    #[rstest]
    #[case::ping(OpCode::Ping, 0x89)]
    #[case::pong(OpCode::Pong, 0x8a)]
    fn write_control_frames(#[case] opcode: OpCode, #[case] b0: u8) {
        let mut out = vec![0xee];
        write_control(&mut out, opcode, b"abc", None);
        assert_eq!(out, [0xee, b0, 3, b'a', b'b', b'c']);
    }

    fn any_opcode() -> impl Strategy<Value = OpCode> {
        (0u8..16).prop_map(OpCode::from_bits)
    }

    fn any_header() -> impl Strategy<Value = FrameHeader> {
        let len = prop_oneof![0u64..=125, 126u64..=0xffff, 0x1_0000u64..=i64::MAX as u64];
        (
            any::<bool>(),
            0u8..8,
            any_opcode(),
            any::<Option<[u8; 4]>>(),
            len,
        )
            .prop_map(|(fin, rsv, opcode, mask, payload_len)| FrameHeader {
                fin,
                rsv,
                opcode,
                mask,
                payload_len,
            })
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(h in any_header(), trailing in prop::collection::vec(any::<u8>(), 0..4)) {
            let mut head = [0u8; MAX_HEADER_LEN];
            let n = h.encode(&mut head);
            for cut in 0..n {
                prop_assert_eq!(FrameHeader::parse(&head[..cut]), Ok(None));
            }
            let mut buf = head[..n].to_vec();
            buf.extend_from_slice(&trailing);
            prop_assert_eq!(FrameHeader::parse(&buf), Ok(Some((h, n))));
        }

        #[test]
        fn parse_never_reads_past_header(buf in prop::collection::vec(any::<u8>(), 0..20)) {
            match FrameHeader::parse(&buf) {
                Ok(Some((_, n))) => prop_assert!(n <= buf.len() && n <= MAX_HEADER_LEN),
                Ok(None) => prop_assert!(buf.len() < MAX_HEADER_LEN),
                Err(FrameError::LengthMsbSet) => prop_assert!(buf.len() >= 10),
            }
        }

        #[test]
        fn fast_mask_matches_reference(
            data in prop::collection::vec(any::<u8>(), 0..300 + 8),
            mask in any::<[u8; 4]>(),
            offset in 0usize..12,
            align in 0usize..8,
        ) {
            // `align` shifts where the slice starts in memory, `offset` where
            // it starts in the payload.
            let align = align.min(data.len());
            let mut fast = data.clone();
            let mut reference = data.clone();
            apply_mask(&mut fast[align..], mask, offset);
            apply_mask_reference(&mut reference[align..], mask, offset);
            prop_assert_eq!(fast, reference);
        }

        #[test]
        fn mask_split_anywhere_matches_whole(
            data in prop::collection::vec(any::<u8>(), 0..300),
            mask in any::<[u8; 4]>(),
            split in any::<prop::sample::Index>(),
        ) {
            let split = split.index(data.len() + 1);
            let mut whole = data.clone();
            apply_mask(&mut whole, mask, 0);
            let mut pieces = data.clone();
            let (head, tail) = pieces.split_at_mut(split);
            apply_mask(head, mask, 0);
            apply_mask(tail, mask, split);
            prop_assert_eq!(&pieces, &whole);
            apply_mask(&mut whole, mask, 0);
            prop_assert_eq!(whole, data);
        }
    }

    #[test]
    fn fast_mask_matches_reference_exhaustively_for_short_lengths() {
        let mask = [0x6d, 0xb6, 0xb2, 0x80];
        let data: Vec<u8> = (0..=255).collect();
        for len in 0..40 {
            for align in 0..8 {
                for offset in 0..8 {
                    let mut fast = data[..len + align].to_vec();
                    let mut reference = fast.clone();
                    apply_mask(&mut fast[align..], mask, offset);
                    apply_mask_reference(&mut reference[align..], mask, offset);
                    assert_eq!(fast, reference, "len {len} align {align} offset {offset}");
                }
            }
        }
    }
}
