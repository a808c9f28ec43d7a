//! The operation table: one record per submitted io_uring entry, owning
//! every byte the kernel may read or write for it (buffers, iovecs, msghdr,
//! sockaddr, timespec), until that entry's last completion arrives.
//!
//! This is tokio-uring's `Lifecycle::Ignored` without futures: a session
//! that ends, fails or forgets an operation never frees its memory; the
//! record does, when the completion comes. A record's memory sits behind a
//! `Box` (or in the provided-buffer ring), so it stays put while the table
//! grows.

use crate::session::{Batch, Who};

/// user_data of entries whose completion is only swallowed: cancels.
pub const IGNORE: u64 = u64::MAX;

/// Operations that own no memory (a receive into the provided-buffer ring,
/// a readiness poll) need no record: their user_data says what they are.
/// The top bit tells them from records, whose generation stays below it.
const DIRECT: u64 = 1 << 63;

/// What a record-less operation is, for one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    /// A receive, from the TLS pool or the main one.
    Recv(Who, bool),
    /// Readiness of `socket` for the splice from `from`.
    Poll { socket: Who, from: Who },
}

impl Direct {
    fn code(self) -> u64 {
        let w = |who| matches!(who, Who::Conman) as u64;
        match self {
            Direct::Recv(who, false) => 1 + w(who),
            Direct::Recv(who, true) => 7 + w(who),
            Direct::Poll { socket, from } => 3 + w(socket) * 2 + w(from),
        }
    }

    fn from_code(code: u64) -> Option<Direct> {
        let w = |b| if b == 0 { Who::Client } else { Who::Conman };
        match code {
            1 | 2 => Some(Direct::Recv(w(code - 1), false)),
            7 | 8 => Some(Direct::Recv(w(code - 7), true)),
            3..=6 => Some(Direct::Poll {
                socket: w((code - 3) / 2),
                from: w((code - 3) % 2),
            }),
            _ => None,
        }
    }

    /// The user_data of this operation for session `slot`/`gen`.
    pub fn user_data(self, slot: u32, gen: u16) -> u64 {
        DIRECT | (self.code() << 48) | (u64::from(slot) << 16) | u64::from(gen)
    }

    /// The operation, slot and generation named by `ud`, if it names one.
    pub fn parse(ud: u64) -> Option<(Direct, u32, u16)> {
        if ud & DIRECT == 0 {
            return None;
        }
        let d = Direct::from_code((ud >> 48) & 0x7fff)?;
        Some((d, (ud >> 16) as u32, ud as u16))
    }
}

/// Kernel-visible memory of one `sendmsg`.
pub struct Gather {
    pub iov: [libc::iovec; crate::session::GATHER_MAX],
    pub msg: libc::msghdr,
}

impl Gather {
    pub fn new() -> Box<Gather> {
        // SAFETY: iovec and msghdr are plain C structs; all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

/// Kernel-visible memory of one connect: Conman's address, and the values
/// of the socket options set through the ring ahead of it (hard-linked
/// before the connect, so they complete before it does). Pooled by the
/// shard: a connect per handshake would otherwise allocate it each time.
pub struct ConnectMem {
    pub addr: socket2::SockAddr,
    pub opts: [libc::c_int; super::listener::CONMAN_SOCKOPTS],
}

/// What an entry in flight is, and what it owns.
pub enum Rec {
    /// The listener's multishot accept.
    Accept,
    /// The eventfd read that wakes the shard; the kernel writes `buf`.
    Wake {
        #[allow(dead_code)] // held for the kernel, never read here
        buf: Box<u64>,
    },
    /// Multishot receive from the control shard (into ring buffers).
    CtlRecv,
    /// Bytes to the control shard; the kernel reads `buf[off..]`.
    CtlSend { buf: Vec<u8>, off: usize },
    /// A session's send: the kernel reads the chunks (ring buffers or owned
    /// bytes) and, for a gathered send, `gather`.
    Send {
        slot: u32,
        gen: u16,
        who: Who,
        batch: Batch,
        gather: Option<Box<Gather>>,
    },
    /// Connect to Conman; the kernel reads `mem` (see [`ConnectMem`]).
    Connect {
        slot: u32,
        gen: u16,
        mem: Box<ConnectMem>,
    },
}

struct Slot {
    gen: u32,
    rec: Option<Rec>,
}

/// Records by user_data: slot index in the low 32 bits, the slot's
/// generation above, so a stale user_data (a cancel aimed at an operation
/// that already ended) can never match a newer operation.
#[derive(Default)]
pub struct OpTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

impl OpTable {
    /// Stores `rec`; the returned user_data names it until `remove`.
    pub fn insert(&mut self, rec: Rec) -> u64 {
        self.live += 1;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { gen: 0, rec: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[idx as usize];
        debug_assert!(slot.rec.is_none());
        // Below the top bit, which marks record-less operations.
        slot.gen = slot.gen.wrapping_add(1) & 0x7fff_ffff;
        slot.rec = Some(rec);
        (u64::from(slot.gen) << 32) | u64::from(idx)
    }

    fn slot(&self, ud: u64) -> Option<&Slot> {
        let s = self.slots.get((ud & 0xffff_ffff) as usize)?;
        (s.gen == (ud >> 32) as u32).then_some(s)
    }

    /// The record of an entry still in flight (a multishot's next
    /// completion).
    pub fn get(&self, ud: u64) -> Option<&Rec> {
        self.slot(ud)?.rec.as_ref()
    }

    /// The record of an entry whose last completion arrived: its memory is
    /// the caller's now.
    pub fn remove(&mut self, ud: u64) -> Option<Rec> {
        self.slot(ud)?;
        let idx = (ud & 0xffff_ffff) as u32;
        let rec = self.slots[idx as usize].rec.take()?;
        self.free.push(idx);
        debug_assert!(self.live > 0);
        self.live -= 1;
        Some(rec)
    }

    /// Entries in flight.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_user_data_never_matches_a_reused_slot() {
        let mut t = OpTable::default();
        let a = t.insert(Rec::Accept);
        assert!(t.remove(a).is_some());
        let b = t.insert(Rec::CtlRecv);
        assert_eq!(a & 0xffff_ffff, b & 0xffff_ffff, "slot reused");
        assert!(t.get(a).is_none());
        assert!(t.remove(a).is_none());
        assert!(matches!(t.get(b), Some(Rec::CtlRecv)));
        assert_eq!(t.len(), 1);
        assert!(t.remove(b).is_some());
        assert!(t.is_empty());
        assert!(t.remove(IGNORE).is_none());
        assert!(Direct::parse(a).is_none() && Direct::parse(b).is_none());
    }

    #[test]
    fn direct_user_data_round_trips_and_never_meets_ignore() {
        let all = [
            Direct::Recv(Who::Client, false),
            Direct::Recv(Who::Conman, false),
            Direct::Recv(Who::Client, true),
            Direct::Recv(Who::Conman, true),
            Direct::Poll {
                socket: Who::Client,
                from: Who::Client,
            },
            Direct::Poll {
                socket: Who::Client,
                from: Who::Conman,
            },
            Direct::Poll {
                socket: Who::Conman,
                from: Who::Client,
            },
            Direct::Poll {
                socket: Who::Conman,
                from: Who::Conman,
            },
        ];
        for d in all {
            for (slot, gen) in [(0, 0), (u32::MAX, u16::MAX), (12345, 7)] {
                let ud = d.user_data(slot, gen);
                assert_ne!(ud, IGNORE);
                assert_eq!(Direct::parse(ud), Some((d, slot, gen)));
            }
        }
        assert_eq!(Direct::parse(IGNORE), None);
    }
}
