//! `Tracker::handle` on an arbitrary byte stream. Shared by the fuzz target
//! and tests/corpus_replay.rs so a corpus file means the same thing to both.
//!
//! Input layout:
//! - byte 0: bit 0 = direction (0 ToConman, 1 ToClient), bit 1 = allow_rsv1,
//!   bits 2-7 = n with max_frame = 2^n;
//! - byte 1: input length the stream is cut into (0 = all at once);
//! - the rest: the stream.

use eval_proxy::proto::frame::MAX_CONTROL_PAYLOAD;
use eval_proxy::proto::relay::{Direction, Event, Tracker, TrackerConfig};

/// Panics if the tracker breaks its contract on this stream.
pub fn run(data: &[u8]) {
    let [flags, cut, stream @ ..] = data else {
        return;
    };
    let dir = if flags & 1 == 0 {
        Direction::ToConman
    } else {
        Direction::ToClient
    };
    let cfg = TrackerConfig {
        max_frame: 1u64 << (flags >> 2),
        allow_rsv1: flags & 2 != 0,
    };
    let cut = if *cut == 0 {
        stream.len().max(1)
    } else {
        usize::from(*cut)
    };

    let mut tracker = Tracker::new(dir, cfg);
    for input in stream.chunks(cut) {
        let mut at = 0;
        while at < input.len() {
            let rest = &input[at..];
            let frames_before = tracker.frames();
            let scan = match tracker.handle(rest) {
                Ok(scan) => scan,
                Err(violation) => {
                    assert!(matches!(violation.code, 1002 | 1007 | 1009), "{violation}");
                    assert!(tracker.bytes_valid_before_violation() <= rest.len());
                    assert_eq!(tracker.handle(rest), Err(violation), "violations stick");
                    return;
                }
            };
            assert!(scan.consumed <= rest.len());
            assert!(tracker.frames() >= frames_before);
            match scan.event {
                None => assert_eq!(scan.consumed, rest.len()),
                Some(event) => {
                    assert!(scan.consumed > 0 && scan.frame_start < scan.consumed);
                    assert!(tracker.at_frame_boundary());
                    assert!(tracker.control_payload().len() <= MAX_CONTROL_PAYLOAD);
                    if let Event::Close { reason_len, .. } = event {
                        assert!(tracker.close_seen());
                        assert!(reason_len + 2 <= MAX_CONTROL_PAYLOAD);
                    }
                }
            }
            if tracker.at_frame_boundary() {
                assert_eq!(tracker.pending_control_bytes(), 0);
            }
            at += scan.consumed;
        }
    }
}
