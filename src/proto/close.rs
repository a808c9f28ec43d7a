//! Close codes: the ones Eval originates (DESIGN.md "Close codes Eval
//! originates"), the machine-readable reason text it sends with them, and
//! validation of Close payloads seen on the relay.
#![forbid(unsafe_code)]

pub const NORMAL: u16 = 1000;
/// Drain grace period is over: reconnect.
pub const GOING_AWAY: u16 = 1001;
pub const PROTOCOL_ERROR: u16 = 1002;
/// Token rejected: fetch a new token.
pub const POLICY: u16 = 1008;
pub const TOO_BIG: u16 = 1009;
/// Eval's own fault: reconnect with backoff.
pub const INTERNAL: u16 = 1011;
/// Eval draining or VM evacuated: reconnect now, it lands elsewhere.
pub const SERVICE_RESTART: u16 = 1012;
/// Controlplane down or overloaded, admission limit: retry after the hint.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Conman unreachable, refused, or lost mid-session: reconnect with backoff.
pub const BAD_GATEWAY: u16 = 1014;

/// Longest Close reason: a control frame carries at most 125 bytes (RFC 6455
/// section 5.5), 2 of them the code. Stated here rather than derived from
/// `frame::MAX_CONTROL_PAYLOAD` so that `close` does not depend on `frame`
/// (frame writing depends on close); `frame` asserts the two agree at compile
/// time.
pub const MAX_REASON_LEN: usize = 123;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseError {
    #[error("close payload of 1 byte")]
    Truncated,
    #[error("close code {0} may not be sent")]
    InvalidCode(u16),
    #[error("close reason is not UTF-8")]
    InvalidUtf8,
}

/// `stage=STAGE;reason=WORD[;retry_after_ms=N]`, cut to [`MAX_REASON_LEN`]
/// bytes on a char boundary.
pub fn reason_text(stage: &str, reason: &str, retry_after_ms: Option<u64>) -> String {
    let mut text = format!("stage={stage};reason={reason}");
    if let Some(ms) = retry_after_ms {
        text.push_str(";retry_after_ms=");
        text.push_str(&ms.to_string());
    }
    let keep = truncate_reason(&text).len();
    text.truncate(keep);
    text
}

/// The longest prefix of `reason` that fits [`MAX_REASON_LEN`] bytes without
/// splitting a character.
pub fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Codes a peer may put on the wire (RFC 6455 section 7.4 and the IANA
/// registry): 1004-1006 and 1015 are reserved or local-only, 1016-2999 are
/// unassigned, 3000-4999 belong to libraries and applications.
pub fn is_valid_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Splits a Close payload into code and reason. An empty payload (no code)
/// is `Ok(None)`.
pub fn parse_close_payload(p: &[u8]) -> Result<Option<(u16, &str)>, CloseError> {
    let (code, reason) = match p {
        [] => return Ok(None),
        [_] => return Err(CloseError::Truncated),
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
    };
    if !is_valid_code(code) {
        return Err(CloseError::InvalidCode(code));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| CloseError::InvalidUtf8)?;
    Ok(Some((code, reason)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::plain("conman", "refused", None, "stage=conman;reason=refused")]
    #[case::retry(
        "placement",
        "overloaded",
        Some(1500),
        "stage=placement;reason=overloaded;retry_after_ms=1500"
    )]
    fn reason_text_format(
        #[case] stage: &str,
        #[case] reason: &str,
        #[case] retry: Option<u64>,
        #[case] expected: &str,
    ) {
        assert_eq!(reason_text(stage, reason, retry), expected);
    }

    #[test]
    fn reason_text_is_cut_on_char_boundary() {
        // "stage=" is 6 bytes, so the 2-byte chars straddle byte 123.
        let text = reason_text(&"ü".repeat(100), "x", Some(1));
        assert_eq!(text.len(), 122);
        assert!(text.starts_with("stage=üü"));

        let ascii = reason_text(&"a".repeat(200), "x", None);
        assert_eq!(ascii.len(), MAX_REASON_LEN);
    }

    #[rstest]
    #[case::short("abc", "abc")]
    #[case::exact(&"a".repeat(123), &"a".repeat(123))]
    #[case::long(&"a".repeat(124), &"a".repeat(123))]
    #[case::multibyte_straddles(&format!("{}€", "a".repeat(121)), &"a".repeat(121))]
    fn truncate_reason_cases(#[case] input: &str, #[case] expected: &str) {
        assert_eq!(truncate_reason(input), expected);
    }

    #[rstest]
    #[case::empty(&[], Ok(None))]
    #[case::code_only(&[0x03, 0xe8], Ok(Some((1000, ""))))]
    #[case::with_reason(b"\x03\xf6stage=conman", Ok(Some((1014, "stage=conman"))))]
    #[case::app_code(&[0x0f, 0xa0], Ok(Some((4000, ""))))]
    #[case::one_byte(&[0x03], Err(CloseError::Truncated))]
    #[case::no_status_code(&[0x03, 0xed], Err(CloseError::InvalidCode(1005)))]
    #[case::bad_utf8(&[0x03, 0xe8, 0xff, 0xfe], Err(CloseError::InvalidUtf8))]
    #[case::cut_utf8(&[0x03, 0xe8, 0xc3], Err(CloseError::InvalidUtf8))]
    fn parse_close_payload_cases(
        #[case] payload: &[u8],
        #[case] expected: Result<Option<(u16, &str)>, CloseError>,
    ) {
        assert_eq!(parse_close_payload(payload), expected);
    }

    #[rstest]
    #[case(0, false)]
    #[case(999, false)]
    #[case(1000, true)]
    #[case(1003, true)]
    #[case(1004, false)]
    #[case(1005, false)]
    #[case(1006, false)]
    #[case(1007, true)]
    #[case(1014, true)]
    #[case(1015, false)]
    #[case(1016, false)]
    #[case(2999, false)]
    #[case(3000, true)]
    #[case(4999, true)]
    #[case(5000, false)]
    #[case(u16::MAX, false)]
    fn close_code_validity(#[case] code: u16, #[case] valid: bool) {
        assert_eq!(is_valid_code(code), valid);
    }

    #[test]
    fn codes_eval_originates_are_valid_on_the_wire() {
        for code in [
            NORMAL,
            GOING_AWAY,
            PROTOCOL_ERROR,
            POLICY,
            TOO_BIG,
            INTERNAL,
            SERVICE_RESTART,
            TRY_AGAIN_LATER,
            BAD_GATEWAY,
        ] {
            assert!(is_valid_code(code), "{code}");
        }
    }
}
