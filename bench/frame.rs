//! Header parsing and frame tracking over one receive buffer's worth of
//! small frames: the relay's per-chunk cost when frames are tiny and
//! headers are dense.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eval_proxy::proto::frame::{apply_mask, FrameHeader, OpCode, MAX_HEADER_LEN};
use eval_proxy::proto::relay::{Direction, Tracker, TrackerConfig};
use std::hint::black_box;

/// One provided buffer.
const CHUNK: usize = 16 << 10;
/// Whole frame, header included.
const FRAME: usize = 64;

/// `CHUNK` bytes of back-to-back `FRAME`-byte Binary frames, masked when
/// they come from the client.
fn chunk(dir: Direction) -> Vec<u8> {
    let mask = match dir {
        Direction::ToConman => Some([0x37, 0xfa, 0x21, 0x3d]),
        Direction::ToClient => None,
    };
    let header_len = if mask.is_some() { 6 } else { 2 };
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode: OpCode::Binary,
        mask,
        payload_len: (FRAME - header_len) as u64,
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    assert_eq!(header.encode(&mut head), header_len);
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        out.extend_from_slice(&head[..header_len]);
        let start = out.len();
        out.extend((0..FRAME - header_len).map(|i| i as u8));
        if let Some(key) = mask {
            apply_mask(&mut out[start..], key, 0);
        }
    }
    out
}

const DIRECTIONS: [Direction; 2] = [Direction::ToConman, Direction::ToClient];

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_header_parse");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    for dir in DIRECTIONS {
        let buf = chunk(dir);
        group.bench_with_input(BenchmarkId::from_parameter(dir.as_str()), &buf, |b, buf| {
            b.iter(|| {
                let mut at = 0;
                let mut frames = 0u32;
                while let Ok(Some((header, len))) = FrameHeader::parse(black_box(&buf[at..])) {
                    at += len + header.payload_len as usize;
                    frames += 1;
                }
                frames
            })
        });
    }
    group.finish();
}

fn track(c: &mut Criterion) {
    let mut group = c.benchmark_group("tracker_handle");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    for dir in DIRECTIONS {
        let buf = chunk(dir);
        let cfg = TrackerConfig {
            max_frame: 16 << 20,
            allow_rsv1: false,
        };
        // The chunk ends on a frame end, so one tracker can take it forever.
        let mut tracker = Tracker::new(dir, cfg);
        group.bench_with_input(BenchmarkId::from_parameter(dir.as_str()), &buf, |b, buf| {
            b.iter(|| tracker.handle(black_box(buf)))
        });
    }
    group.finish();
}

criterion_group!(benches, parse, track);
criterion_main!(benches);
