//! The socketpair to the control shard: placement requests out, replies in.

use std::os::fd::RawFd;

use io_uring::{cqueue, opcode, types};
use tracing::{error, warn};

use super::ops::Rec;
use super::{bufring, Io};
use crate::control::wire::{PlacementResult, ToShard};
use crate::metrics::ShardStats;

pub struct Ctl {
    pub fd: RawFd,
    inbuf: Vec<u8>,
    /// Encoded requests not yet handed to the kernel.
    out: Vec<u8>,
    send_in_flight: bool,
    pub recv_armed: bool,
    /// The control shard went away: placements fail fast.
    pub dead: bool,
    /// A send failed: the sessions waiting for a reply must be failed.
    pub lost: bool,
    /// The receive found no buffer: armed again once buffers are back.
    pub starved: bool,
}

impl Ctl {
    pub fn new(fd: RawFd) -> Ctl {
        Ctl {
            fd,
            inbuf: Vec::new(),
            out: Vec::new(),
            send_in_flight: false,
            recv_armed: false,
            dead: false,
            lost: false,
            starved: false,
        }
    }
}

/// A placement request's id: the session's slot and generation, and the
/// session's own sequence number, so a late reply finds nobody.
pub fn request_id(slot: u32, gen: u16, seq: u16) -> u64 {
    (u64::from(slot) << 32) | (u64::from(gen) << 16) | u64::from(seq)
}

impl Io {
    pub(super) fn arm_ctl_recv(&mut self) {
        if self.ctl.recv_armed || self.ctl.dead || self.ctl.starved {
            return;
        }
        self.ctl.recv_armed = true;
        let ud = self.ops.insert(Rec::CtlRecv);
        let fd = self.ctl.fd;
        // SAFETY: no pointer: the kernel picks ring buffers.
        unsafe {
            self.push(
                opcode::RecvMulti::new(types::Fd(fd), bufring::BGID)
                    .build()
                    .user_data(ud),
            )
        };
    }

    /// Queues an encoded message and sends it unless a send is in flight.
    pub(super) fn ctl_send(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.ctl.out);
        self.ctl_kick(Vec::new(), 0);
    }

    /// Sends `buf[off..]` if anything is left of it, else what is queued.
    fn ctl_kick(&mut self, mut buf: Vec<u8>, off: usize) {
        let c = &mut self.ctl;
        if c.send_in_flight || c.dead {
            return;
        }
        let off = if off < buf.len() {
            off
        } else if c.out.is_empty() {
            return;
        } else {
            buf.clear();
            std::mem::swap(&mut buf, &mut c.out);
            0
        };
        c.send_in_flight = true;
        let (fd, ptr, len) = (c.fd, buf[off..].as_ptr(), buf.len() - off);
        // The record owns `buf`; moving the Vec does not move its heap bytes.
        let ud = self.ops.insert(Rec::CtlSend { buf, off });
        // SAFETY: `ptr` points into `buf`'s heap bytes, which the record
        // owns until the send completes.
        unsafe {
            self.push(
                opcode::Send::new(types::Fd(fd), ptr, len as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(ud),
            )
        };
    }

    pub(super) fn on_ctl_send(&mut self, res: i32, buf: Vec<u8>, off: usize) {
        self.ctl.send_in_flight = false;
        if res <= 0 {
            // The receive side notices the loss and fails waiting sessions.
            warn!(
                shard = self.shard,
                err = res,
                "send to the control shard failed"
            );
            self.ctl.dead = true;
            self.ctl.lost = true;
            return;
        }
        self.ctl_kick(buf, off + res as usize);
    }

    /// A receive completion from the control shard: the placement replies
    /// it completed, or `Err` when the control shard is gone.
    pub(super) fn ctl_received(
        &mut self,
        res: i32,
        flags: u32,
    ) -> Result<Vec<(u64, PlacementResult)>, ()> {
        if res <= 0 {
            return match -res {
                libc::ENOBUFS => {
                    ShardStats::inc(&self.stats.buffer_exhausted);
                    self.ctl.starved = true;
                    Ok(Vec::new())
                }
                libc::ECANCELED if self.ctl.dead => Ok(Vec::new()),
                _ => Err(()),
            };
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.bufs.taken(bid);
            let data = self.bufs.slice(bid, 0, res as u32);
            self.ctl.inbuf.extend_from_slice(data);
            self.bufs.recycle(bid);
        }
        let mut replies = Vec::new();
        loop {
            match ToShard::decode(&self.ctl.inbuf) {
                Ok(Some((msg, used))) => {
                    self.ctl.inbuf.drain(..used);
                    let ToShard::Placement { id, result } = msg;
                    replies.push((id, result));
                }
                Ok(None) => return Ok(replies),
                Err(e) => {
                    error!(shard = self.shard, err = %e, "bad message from the control shard");
                    return Err(());
                }
            }
        }
    }
}
