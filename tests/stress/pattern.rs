//! Per-session byte patterns, and the checker that counts every received
//! byte that is not where its own session's pattern says it should be.
//!
//! A stream's bytes are 32-byte ASCII records: 16 hex digits of the session
//! tag, then 16 hex digits of `stream << 60 | record number`. Every byte is a
//! function of (tag, stream, offset), and any aligned record names the session
//! and the stream it came from, so a foreign byte can be traced to its owner.

use std::collections::HashMap;
use std::sync::Mutex;

pub const RECORD: u64 = 32;

/// Which of a session's two byte streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Client to Conman; Conman echoes it back, so the client sees it too.
    Up = 0,
    /// Conman's own frames to the client.
    Down = 1,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex16(v: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((v >> (4 * (15 - i))) & 0xf) as usize];
    }
}

fn unhex16(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?;
    u64::from_str_radix(s, 16).ok()
}

/// Writes the pattern of (tag, stream) from stream offset `off` into `out`.
pub fn fill(tag: u64, stream: Stream, off: u64, out: &mut [u8]) {
    let mut rec = [0u8; RECORD as usize];
    hex16(tag, &mut rec[..16]);
    let mut k = off / RECORD;
    let mut j = (off % RECORD) as usize;
    let mut i = 0;
    while i < out.len() {
        hex16((stream as u64) << 60 | k, &mut rec[16..]);
        let n = (RECORD as usize - j).min(out.len() - i);
        out[i..i + n].copy_from_slice(&rec[j..j + n]);
        i += n;
        j = 0;
        k += 1;
    }
}

pub fn bytes(tag: u64, stream: Stream, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(tag, stream, off, &mut v);
    v
}

/// What every thread needs to name a foreign byte's owner, and where the
/// first few mismatches are written down for the failure message.
pub struct Registry {
    pub owner: HashMap<u64, usize>,
    samples: Mutex<Vec<String>>,
}

const MAX_SAMPLES: usize = 20;

impl Registry {
    pub fn new(owner: HashMap<u64, usize>) -> Registry {
        Registry {
            owner,
            samples: Mutex::new(Vec::new()),
        }
    }

    pub fn note(&self, line: String) {
        let mut s = self.samples.lock().unwrap();
        if s.len() < MAX_SAMPLES {
            s.push(line);
        }
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples.lock().unwrap().clone()
    }

    /// Names the owner of the record holding `got[at]` (or the next whole
    /// one), `got` starting at stream offset `off`.
    fn origin(&self, got: &[u8], off: u64, at: usize) -> String {
        let into = ((off + at as u64) % RECORD) as usize;
        let skip = if into <= at {
            at - into
        } else {
            at + RECORD as usize - into
        };
        let Some(rec) = got.get(skip..skip + RECORD as usize) else {
            return "no whole record to trace".into();
        };
        match (unhex16(&rec[..16]), unhex16(&rec[16..])) {
            (Some(tag), Some(v)) => match self.owner.get(&tag) {
                Some(idx) => format!(
                    "record of session {idx} stream {} offset {}",
                    v >> 60,
                    (v & ((1 << 60) - 1)) * RECORD
                ),
                None => format!("record with unknown tag {tag:016x}"),
            },
            _ => format!("not a record: {:?}", String::from_utf8_lossy(rec)),
        }
    }
}

/// Checks one received stream of one session, chunk by chunk.
pub struct Checker {
    pub session: usize,
    pub tag: u64,
    pub stream: Stream,
    /// Stream bytes seen so far (the offset of the next byte).
    pub off: u64,
    scratch: Vec<u8>,
}

impl Checker {
    pub fn new(session: usize, tag: u64, stream: Stream) -> Checker {
        Checker {
            session,
            tag,
            stream,
            off: 0,
            scratch: Vec::new(),
        }
    }

    /// Checks `got` as the next bytes; returns how many of them are not
    /// this session's (foreign bytes), noting the first mismatch.
    pub fn check(&mut self, got: &[u8], reg: &Registry, side: &str) -> u64 {
        self.scratch.resize(got.len(), 0);
        fill(self.tag, self.stream, self.off, &mut self.scratch);
        let mut bad = 0;
        if got != &self.scratch[..] {
            let first = got
                .iter()
                .zip(&self.scratch)
                .position(|(a, b)| a != b)
                .expect("slices differ");
            bad = got
                .iter()
                .zip(&self.scratch)
                .filter(|(a, b)| a != b)
                .count() as u64;
            reg.note(format!(
                "{side}: session {} stream {:?}: {bad} of {} bytes at offset {} differ, first at {}: got {:?} want {:?}; {}",
                self.session,
                self.stream,
                got.len(),
                self.off,
                self.off + first as u64,
                String::from_utf8_lossy(&got[first..got.len().min(first + 40)]),
                String::from_utf8_lossy(&self.scratch[first..got.len().min(first + 40)]),
                reg.origin(got, self.off, first),
            ));
        }
        self.off += got.len() as u64;
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_offset_consistent() {
        let whole = bytes(0xabc, Stream::Down, 0, 300);
        for start in [0usize, 1, 31, 32, 33, 250] {
            assert_eq!(
                bytes(0xabc, Stream::Down, start as u64, 300 - start),
                whole[start..]
            );
        }
        assert_eq!(&whole[..16], b"0000000000000abc");
        assert_eq!(&whole[32..64], b"0000000000000abc1000000000000001");
    }

    #[test]
    fn checker_counts_and_traces_foreign_bytes() {
        let reg = Registry::new(HashMap::from([(1, 0), (2, 1)]));
        let mut c = Checker::new(0, 1, Stream::Up);
        assert_eq!(c.check(&bytes(1, Stream::Up, 0, 40), &reg, "t"), 0);
        let mut mixed = bytes(1, Stream::Up, 40, 100);
        mixed[50..].copy_from_slice(&bytes(2, Stream::Up, 90, 50));
        assert!(c.check(&mixed, &reg, "t") > 0);
        assert!(
            reg.samples()[0].contains("record of session 1"),
            "{:?}",
            reg.samples()
        );
        assert!(
            reg.samples()[0].contains("offset 96"),
            "{:?}",
            reg.samples()
        );
        assert_eq!(c.off, 140);
    }
}
