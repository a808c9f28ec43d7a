//! `Tracker::handle` on an arbitrary byte stream cut at arbitrary points.
//! Shared by the fuzz target and tests/corpus_replay.rs so a corpus file
//! means the same thing to both.
//!
//! Input layout:
//! - byte 0: bit 0 = direction (0 ToConman, 1 ToClient), bit 1 = allow_rsv1,
//!   bits 2-7 = n with max_frame = 2^n;
//! - the rest: a chunking and the stream (see chunks.rs).
//!
//! The stream goes to three trackers: one gets it whole, one in the chunks,
//! and one in the chunks but skipping (`skip_payload`) the data-frame payload
//! left over at the start of each chunk, as the shard does when it splices.
//! Besides each call's own contract, the chunked tracker must report the
//! same control frames at the same stream offsets with the same payloads,
//! the same violation and the same final state as the whole one, and the
//! skipping one must agree with it at the end of every chunk.

use eval_proxy::proto::frame::MAX_CONTROL_PAYLOAD;
use eval_proxy::proto::relay::{Direction, Event, Tracker, TrackerConfig, Violation};

use crate::chunks;

/// What one tracker reported over the whole stream.
#[derive(Debug, Default, PartialEq)]
struct Trace {
    /// Each control frame: the stream offset just past it, the event and
    /// its unmasked payload.
    events: Vec<(usize, Event, Vec<u8>)>,
    violation: Option<Rejected>,
    frames: u64,
}

#[derive(Debug, PartialEq)]
struct Rejected {
    violation: Violation,
    /// Where the stream's valid frames end, when the rejected frame began in
    /// the input that revealed it; else where that input began.
    valid_end: Result<usize, usize>,
}

/// Feeds `inputs` one after another, checking each call's contract, and
/// stops at a violation. A `skipper` gets each input first, skipping payload.
fn feed<'a>(
    tracker: &mut Tracker,
    inputs: impl Iterator<Item = &'a [u8]>,
    mut skipper: Option<&mut Tracker>,
) -> Trace {
    let mut trace = Trace::default();
    let mut base = 0;
    for input in inputs {
        let skipped = skipper.as_deref_mut().map(|s| feed_skipping(s, input));
        let mut at = 0;
        while at < input.len() {
            let rest = &input[at..];
            let frames_before = tracker.frames();
            let scan = match tracker.handle(rest) {
                Ok(scan) => scan,
                Err(violation) => {
                    assert!(matches!(violation.code, 1002 | 1007 | 1009), "{violation}");
                    let valid = tracker.bytes_valid_before_violation();
                    assert!(valid <= rest.len());
                    let mid_frame = !tracker.at_frame_boundary();
                    assert!(!mid_frame || valid == 0);
                    assert_eq!(tracker.handle(rest), Err(violation), "violations stick");
                    assert_eq!(tracker.data_payload_remaining(), 0);
                    if let Some(skipped) = skipped {
                        assert_eq!(skipped, Err(violation), "skipping changed the verdict");
                    }
                    trace.violation = Some(Rejected {
                        violation,
                        valid_end: if mid_frame {
                            Err(base + at)
                        } else {
                            Ok(base + at + valid)
                        },
                    });
                    trace.frames = tracker.frames();
                    return trace;
                }
            };
            assert!(scan.consumed <= rest.len());
            assert!(tracker.frames() >= frames_before);
            match scan.event {
                None => assert_eq!(scan.consumed, rest.len()),
                Some(event) => {
                    assert!(scan.consumed > 0 && scan.frame_start < scan.consumed);
                    assert!(tracker.at_frame_boundary());
                    assert!(tracker.frames() > frames_before);
                    let payload = tracker.control_payload();
                    assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
                    if let Event::Close { reason_len, .. } = event {
                        assert!(tracker.close_seen());
                        assert!(reason_len + 2 <= MAX_CONTROL_PAYLOAD);
                    }
                    trace
                        .events
                        .push((base + at + scan.consumed, event, payload.to_vec()));
                }
            }
            if tracker.at_frame_boundary() {
                assert_eq!(tracker.pending_control_bytes(), 0);
                assert_eq!(tracker.data_payload_remaining(), 0);
            }
            at += scan.consumed;
        }
        base += input.len();
        if let Some(skipper) = skipper.as_deref() {
            assert_eq!(skipped, Some(Ok(())), "skipping changed the verdict");
            assert_eq!(skipper.frames(), tracker.frames());
            assert_eq!(skipper.at_frame_boundary(), tracker.at_frame_boundary());
            assert_eq!(
                skipper.data_payload_remaining(),
                tracker.data_payload_remaining()
            );
        }
    }
    trace.frames = tracker.frames();
    trace
}

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
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((stream, chunks)) = chunks::split(rest) else {
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

    let mut whole = Tracker::new(dir, cfg);
    let whole_trace = feed(&mut whole, std::iter::once(stream), None);
    let mut chunked = Tracker::new(dir, cfg);
    let mut skipper = Tracker::new(dir, cfg);
    let chunked_trace = feed(&mut chunked, chunks, Some(&mut skipper));

    assert_eq!(
        chunked_trace.events, whole_trace.events,
        "chunking moved an event"
    );
    assert_eq!(
        chunked_trace.frames, whole_trace.frames,
        "chunking lost a frame"
    );
    match (&chunked_trace.violation, &whole_trace.violation) {
        (None, None) => {
            assert_eq!(chunked.at_frame_boundary(), whole.at_frame_boundary());
            assert_eq!(chunked.at_message_boundary(), whole.at_message_boundary());
            assert_eq!(chunked.close_seen(), whole.close_seen());
            assert_eq!(
                chunked.data_payload_remaining(),
                whole.data_payload_remaining()
            );
            assert_eq!(
                chunked.pending_control_bytes(),
                whole.pending_control_bytes()
            );
        }
        (Some(cut), Some(one)) => {
            assert_eq!(
                cut.violation, one.violation,
                "chunking changed the violation"
            );
            // Fed whole, a frame never spans two inputs.
            let Ok(one_end) = one.valid_end else {
                panic!("whole stream rejected mid-frame: {one:?}");
            };
            match cut.valid_end {
                Ok(end) => assert_eq!(end, one_end, "valid bytes end elsewhere"),
                // The rejected frame began before that input did.
                Err(input_start) => assert!(one_end < input_start, "{one_end} {input_start}"),
            }
        }
        (cut, one) => panic!("chunking changed the verdict: {cut:?} vs whole {one:?}"),
    }
}
