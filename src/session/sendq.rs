//! A side's send queue: one chunk inline, the rest on the heap only while a
//! backlog exists.
//!
//! Almost always a side has zero or one chunk queued (the buffer just
//! received, in flight to the peer), so a `VecDeque` would allocate at the
//! first message and keep that capacity for the session's life; thousands of
//! idle sessions would each carry it. Here the heap part is dropped as soon
//! as a backlog drains, so a quiet session owns no heap memory for sending.

use std::collections::VecDeque;

use super::Chunk;

#[derive(Default)]
pub struct SendQ {
    first: Option<Chunk>,
    /// Boxed so the struct stays 32 bytes in every session; the extra
    /// allocation happens only when a backlog starts.
    #[allow(clippy::box_collection)]
    rest: Option<Box<VecDeque<Chunk>>>,
}

impl SendQ {
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.as_ref().map_or(0, |r| r.len())
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub fn push_back(&mut self, c: Chunk) {
        if self.first.is_none() {
            self.first = Some(c);
        } else {
            self.rest.get_or_insert_default().push_back(c);
        }
    }

    pub fn pop_front(&mut self) -> Option<Chunk> {
        let c = self.first.take()?;
        if let Some(rest) = self.rest.as_mut() {
            self.first = rest.pop_front();
            if rest.is_empty() {
                // The backlog is over; give its memory back.
                self.rest = None;
            }
        }
        Some(c)
    }

    pub fn front(&self) -> Option<&Chunk> {
        self.first.as_ref()
    }

    pub fn front_mut(&mut self) -> Option<&mut Chunk> {
        self.first.as_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Chunk> {
        self.first
            .iter()
            .chain(self.rest.iter().flat_map(|r| r.iter()))
    }

    /// Removes every chunk, returning them so their buffers can be recycled.
    pub fn drain(&mut self) -> impl Iterator<Item = Chunk> {
        let first = self.first.take();
        let rest = self.rest.take();
        first.into_iter().chain(rest.into_iter().flat_map(|r| *r))
    }

    /// Drops every chunk; only for queues holding no ring buffer (setup).
    pub fn clear(&mut self) {
        debug_assert!(!self.iter().any(|c| matches!(c, Chunk::Buf { .. })));
        *self = SendQ::default();
    }

    /// Whether the heap part holds memory (for tests of the idle footprint).
    pub fn heap_capacity(&self) -> usize {
        self.rest.as_ref().map_or(0, |r| r.capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn buf(n: u16) -> Chunk {
        Chunk::Buf {
            bid: n,
            off: 0,
            len: 1,
        }
    }

    fn bid(c: &Chunk) -> u16 {
        match c {
            Chunk::Buf { bid, .. } => *bid,
            Chunk::Owned { .. } => u16::MAX,
        }
    }

    proptest! {
        /// Behaves as a FIFO queue (the VecDeque it replaces) for any mix of
        /// pushes and pops, and holds no heap memory whenever it has at most
        /// one chunk after a pop.
        #[test]
        fn is_a_fifo(ops in proptest::collection::vec(any::<bool>(), 0..200)) {
            let mut q = SendQ::default();
            let mut model = VecDeque::new();
            let mut next = 0u16;
            for push in ops {
                if push {
                    q.push_back(buf(next));
                    model.push_back(next);
                    next += 1;
                } else {
                    let got = q.pop_front().map(|c| bid(&c));
                    prop_assert_eq!(got, model.pop_front());
                    if q.len() <= 1 {
                        prop_assert_eq!(q.heap_capacity(), 0);
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.is_empty(), model.is_empty());
                prop_assert_eq!(q.front().map(bid), model.front().copied());
                let all: Vec<u16> = q.iter().map(bid).collect();
                prop_assert_eq!(all, model.iter().copied().collect::<Vec<_>>());
            }
            let drained: Vec<u16> = q.drain().map(|c| bid(&c)).collect();
            prop_assert_eq!(drained, model.into_iter().collect::<Vec<_>>());
            prop_assert!(q.is_empty());
            prop_assert_eq!(q.heap_capacity(), 0);
        }
    }

    #[test]
    fn one_chunk_at_a_time_never_allocates() {
        let mut q = SendQ::default();
        for i in 0..1000 {
            q.push_back(buf(i));
            assert_eq!(q.heap_capacity(), 0);
            assert!(q.pop_front().is_some());
        }
    }
}
