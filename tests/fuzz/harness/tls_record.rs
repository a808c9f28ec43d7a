//! The TLS 1.3 record layer after the handshake (`proto::tls_record`) on
//! arbitrary bytes in arbitrary chunkings. Layout: one mode byte, then
//! `chunks::split`'s cuts and stream.
//!
//! - Raw (even mode): the stream as received. Never a panic, never more
//!   than one partial record held, and nothing ever opens: without the key
//!   no record may authenticate.
//! - Sealed (odd mode): the stream is a list of messages, each one byte of
//!   kind, one of length and the content, sealed with the key the opener
//!   shares. However cut, the opener yields exactly the application data
//!   sealed, follows KeyUpdates (up to 32 in a row), stops at
//!   close_notify, and refuses exactly at the first message the protocol
//!   does not allow.

use eval_proxy::proto::tls_record::{pair_from_secret, Opened, Records, HEADER, MAX_CIPHER};

use crate::chunks;

/// What opening the messages should give.
#[derive(Debug, PartialEq)]
enum End {
    /// Every message opened.
    All,
    /// close_notify ended the stream.
    Closed,
    /// A message was refused.
    Refused,
}

pub fn run(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let Some((stream, cuts)) = chunks::split(data) else {
        return;
    };
    let (mut sealer, mut opener) = pair_from_secret([7; 32]);
    let mut rs = Records::default();
    let mut plain = Vec::new();
    if mode % 2 == 0 {
        for input in cuts {
            let r = rs.feed(input, |rec| {
                assert!(rec.len() <= HEADER + MAX_CIPHER);
                opener.open(rec, &mut plain).map(|o| o != Opened::Closed)
            });
            assert!(plain.is_empty(), "a record authenticated without the key");
            if r.is_err() {
                return;
            }
            assert!(rs.held() < HEADER + MAX_CIPHER, "held {}", rs.held());
        }
        return;
    }
    // Seal the messages, noting what the opener must make of them.
    let mut wire = Vec::new();
    let mut want = Vec::new();
    let mut end = End::All;
    // KeyUpdates since the last non-empty data: the 33rd is refused.
    let mut updates = 0;
    let mut rest = stream;
    while let [kind, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (content, tail) = tail.split_at(n);
        rest = tail;
        match kind % 4 {
            0 => {
                sealer.seal(content, &mut wire);
                want.extend_from_slice(content);
                if !content.is_empty() {
                    updates = 0;
                }
            }
            1 => {
                // An alert: close_notify ends the stream, any other refuses.
                let desc = content.first().copied().unwrap_or(0) % 4;
                sealer.alert(desc, &mut wire);
                end = if desc == 0 { End::Closed } else { End::Refused };
                break;
            }
            2 => {
                // A KeyUpdate: the sealer moves to its next key.
                sealer.key_update(&mut wire);
                updates += 1;
                if updates > 32 {
                    end = End::Refused;
                    break;
                }
            }
            _ => {
                // Any other inner content: refused, unless it happens to
                // spell application data (the type is its last non-zero
                // byte).
                let mut inner = content.to_vec();
                let typ = kind / 4;
                inner.push(typ);
                let t = inner.iter().rposition(|&b| b != 0);
                match t.map(|t| (inner[t], &inner[..t])) {
                    Some((23, body)) => {
                        want.extend_from_slice(body);
                        sealer.seal_raw(0, &inner, &mut wire);
                        if !body.is_empty() {
                            updates = 0;
                        }
                    }
                    // An alert that is not an error (close_notify,
                    // user_canceled) and KeyUpdate: the kinds above say
                    // those.
                    Some((21, [1 | 2, 0 | 90]) | (22, [24, 0, 0, 1, 0 | 1])) => {}
                    _ => {
                        sealer.seal_raw(0, &inner, &mut wire);
                        end = End::Refused;
                        break;
                    }
                }
            }
        }
    }
    // `stream` only chose the messages; the wire is cut like it would be.
    let mut got_end = End::All;
    let mut at = 0;
    let mut cuts = chunks::split(data)
        .map(|(_, c)| c.map(<[u8]>::len))
        .into_iter()
        .flatten();
    while at < wire.len() {
        let n = cuts.next().unwrap_or(wire.len()).min(wire.len() - at);
        let input = &wire[at..at + n.max(1)];
        at += input.len();
        let r = rs.feed(input, |rec| match opener.open(rec, &mut plain)? {
            Opened::Closed => {
                got_end = End::Closed;
                Ok(false)
            }
            _ => Ok(true),
        });
        if r.is_err() {
            got_end = End::Refused;
        }
        if got_end != End::All {
            break;
        }
    }
    assert_eq!(got_end, end);
    assert!(
        plain == want,
        "{} bytes opened, {} sealed",
        plain.len(),
        want.len()
    );
}
