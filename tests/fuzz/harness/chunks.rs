//! Arbitrary chunkings of a stream, with the split points taken from the
//! fuzz input itself, so libFuzzer mutates where a stream breaks as freely
//! as what it says. A stream parser must reach the same verdict however the
//! kernel happened to cut its input.
//!
//! Layout: one byte n (taken mod 8), then n chunk lengths (byte b stands for
//! b + 1 bytes), used in turn and repeated until the stream runs out; the
//! rest is the stream. With n = 0 the stream comes in one piece.
//!
//! Each fuzz target and tests/corpus_replay.rs declare this module once, at
//! the crate root, for the harnesses to `use crate::chunks`.

/// The stream cut into chunks, none of them empty.
#[derive(Clone)]
pub struct Chunks<'a> {
    lens: &'a [u8],
    next: usize,
    rest: &'a [u8],
}

/// Splits `data` into its stream, whole, and the same stream in chunks;
/// `None` when `data` is shorter than the lengths it announces.
pub fn split(data: &[u8]) -> Option<(&[u8], Chunks<'_>)> {
    let (&n, data) = data.split_first()?;
    let n = usize::from(n % 8);
    if data.len() < n {
        return None;
    }
    let (lens, rest) = data.split_at(n);
    let chunks = Chunks {
        lens,
        next: 0,
        rest,
    };
    Some((rest, chunks))
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let len = match self.lens.get(self.next % self.lens.len().max(1)) {
            Some(&b) => usize::from(b) + 1,
            None => self.rest.len(),
        };
        self.next += 1;
        let (chunk, rest) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = rest;
        Some(chunk)
    }
}
