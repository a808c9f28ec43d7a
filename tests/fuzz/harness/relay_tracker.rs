//! `Tracker::handle` on an arbitrary byte stream. Shared by the fuzz target
//! and tests/corpus_replay.rs so a corpus file means the same thing to both.
//!
//! Input layout:
//! - byte 0: bit 0 = direction (0 ToConman, 1 ToClient), bit 1 = allow_rsv1,
//!   bits 2-7 = n with max_frame = 2^n;
//! - byte 1: input length the stream is cut into (0 = all at once);
//! - the rest: the stream.
//!
//! A second tracker sees the same inputs but skips (`skip_payload`) the
//! data-frame payload left over at the start of each input, as the shard
//! does when it splices; it must agree with the first at every input's end.

use eval_proxy::proto::frame::MAX_CONTROL_PAYLOAD;
use eval_proxy::proto::relay::{Direction, Event, Tracker, TrackerConfig, Violation};

/// Feeds `input`, skipping whatever data payload is due at its start.
fn feed_skipping(t: &mut Tracker, input: &[u8]) -> Result<(), Violation> {
    let mut at = 0;
    let due = t.data_payload_remaining().min(input.len() as u64);
    if due > 0 {
        t.skip_payload(due);
        at = due as usize;
    }
    while at < input.len() {
        at += t.handle(&input[at..])?.consumed;
    }
    Ok(())
}

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
    let mut skipper = Tracker::new(dir, cfg);
    for input in stream.chunks(cut) {
        let skipped = feed_skipping(&mut skipper, input);
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
                    assert_eq!(skipped, Err(violation), "skipping changed the verdict");
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
        assert_eq!(skipped, Ok(()), "skipping changed the verdict");
        assert_eq!(skipper.frames(), tracker.frames());
        assert_eq!(skipper.at_frame_boundary(), tracker.at_frame_boundary());
        assert_eq!(
            skipper.data_payload_remaining(),
            tracker.data_payload_remaining()
        );
    }
}
