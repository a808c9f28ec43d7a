//! Splice mode: the payload of a long data frame goes socket → pipe → the
//! other side's socket with non-blocking splice(2), never entering user
//! space. The session decides each step; the shard performs it at once and
//! reports the result, or waits for readiness with a poll.
//!
//! splice(2) blocks on a blocking socket whatever its flags say; every
//! socket a session gets is already `O_NONBLOCK` (accepted with
//! `SOCK_NONBLOCK`, Conman's created non-blocking), so nothing is set here:
//! an ioctl at splice time could reach an fd number the session had closed
//! and the process had reused.

use std::sync::atomic::Ordering::Relaxed;

use super::{Env, Kind, Op, Pipe, Session, Who};

/// A side in splice mode.
pub(super) struct Splice {
    /// `None` until the shard hands one over.
    pipe: Option<Pipe>,
    /// Bytes in the pipe not yet written to the other side.
    in_pipe: u32,
    /// The multishot receive has ended and what it delivered is sent:
    /// bytes now flow through the pipe only.
    pub(super) started: bool,
    /// A POLLIN on this side's socket is in flight.
    poll_in: bool,
    /// A POLLOUT on the other side's socket is in flight.
    poll_out: bool,
    /// The source may have bytes: true until a splice from it comes back
    /// short, and again after each readiness.
    readable: bool,
    /// A splice op was asked for and its result is not in yet.
    busy: bool,
    /// What that splice asked for.
    want: usize,
}

impl Splice {
    /// Bytes of this splice are in the pipe or on their way to the other
    /// side's socket: that socket must stay open (and writable) for them.
    pub(super) fn owes_peer(&self) -> bool {
        self.in_pipe > 0 || self.busy || self.poll_out
    }
}

impl Session {
    /// After a buffer from `from` was relayed: if a long data frame is under
    /// way, stop the buffered receive so its payload can be spliced.
    pub(super) fn maybe_splice(&mut self, env: &mut Env, from: Who) {
        let min = env.cfg.buffers.splice_min;
        // A frame being held goes out whole, from the buffers it came in.
        let held = self.holding(from.outbound());
        // Over TLS the plaintext never exists in the kernel: nothing to
        // splice either way.
        let tls = self.tls.is_some();
        let (src, _, tracker) = self.split(from);
        if min == 0
            || tls
            || held
            || src.splice.is_some()
            || src.eof
            || tracker.data_payload_remaining() < min
        {
            return;
        }
        src.splice = Some(Box::new(Splice {
            pipe: None,
            in_pipe: 0,
            started: false,
            poll_in: false,
            poll_out: false,
            readable: true,
            busy: false,
            want: 0,
        }));
        env.op(Op::NeedPipe { from });
        self.pause_recv(env, from);
    }

    /// The pipe asked for with `Op::NeedPipe`, or `None` (out of
    /// descriptors, say: copying still works).
    pub fn handle_pipe(&mut self, env: &mut Env, from: Who, pipe: Option<Pipe>) {
        let src = self.side(from);
        let waiting = src.splice.as_ref().is_some_and(|sp| sp.pipe.is_none());
        match pipe {
            Some(pipe) if waiting => {
                if let Some(sp) = src.splice.as_mut() {
                    sp.pipe = Some(pipe);
                }
            }
            Some(pipe) => env.op(Op::ReleasePipe { pipe, empty: true }),
            None if waiting => {
                src.splice = None;
                src.paused = false;
                self.arm_recv(env, from);
            }
            None => {}
        }
        self.advance(env);
    }

    /// Splicing begins once the multishot receive has ended (all it took is
    /// tracked) and everything queued before is sent, so bytes stay in order.
    pub(super) fn start_splice(&mut self, env: &mut Env, from: Who) {
        let (src, dst, _) = self.split(from);
        let Some(sp) = src.splice.as_mut() else {
            return;
        };
        if sp.started
            || sp.pipe.is_none()
            || src.recv_armed
            || !(dst.drained() || dst.shut || dst.closed)
        {
            return;
        }
        sp.started = true;
        sp.readable = true;
        self.pump(env, from);
    }

    /// A POLLIN on `socket` (its own splice) or a POLLOUT on it (the splice
    /// from the other side) completed.
    pub fn handle_poll(&mut self, env: &mut Env, socket: Who, from: Who) {
        self.side(socket).done_op();
        if let Some(sp) = self.side(from).splice.as_mut() {
            if socket == from {
                sp.poll_in = false;
            } else {
                sp.poll_out = false;
            }
            sp.readable = true;
        }
        self.pump(env, from);
        self.advance(env);
    }

    /// A frame is being spliced to `to` and waits for its socket to take
    /// more.
    pub(super) fn splice_waits_on(&self, to: Who) -> bool {
        self.side_ref(to.other())
            .splice
            .as_ref()
            .is_some_and(|sp| sp.poll_out)
    }

    /// The result of `Op::SpliceIn`.
    pub fn handle_spliced_in(&mut self, env: &mut Env, from: Who, res: Result<usize, i32>) {
        let (id, dir) = (self.id, from.outbound());
        let (src, _, tracker) = self.split(from);
        let Some(sp) = src.splice.as_mut() else {
            return;
        };
        sp.busy = false;
        match res {
            Ok(0) => {
                // FIN inside the frame. The pipe may still hold bytes: they
                // go out first, then the loss is handled (see `pump`).
                src.eof = true;
                sp.readable = false;
            }
            Ok(n) => {
                sp.readable = n == sp.want;
                sp.in_pipe += n as u32;
                let frames = tracker.frames();
                tracker.skip_payload(n as u64);
                let frames = tracker.frames() - frames;
                env.stats.add_bytes(dir, n as u64, frames);
                env.stats.spliced_bytes.fetch_add(n as u64, Relaxed);
            }
            Err(libc::EAGAIN) => sp.readable = false,
            Err(err) => {
                tracing::debug!(session = id, err, "splice from peer failed");
                // As for a FIN: what was read is still delivered.
                src.eof = true;
                sp.readable = false;
            }
        }
        if let Ok(n @ 1..) = res {
            // The peer is alive, though its bytes never pass the session.
            self.note_heard(env.now, from);
            self.bytes[super::hold_index(dir)] += n as u64;
        }
        self.pump(env, from);
        self.advance(env);
    }

    /// The result of `Op::SpliceOut`.
    pub fn handle_spliced_out(&mut self, env: &mut Env, from: Who, res: Result<usize, i32>) {
        let id = self.id;
        let (src, dst, _) = self.split(from);
        let Some(sp) = src.splice.as_mut() else {
            return;
        };
        sp.busy = false;
        if let Ok(n) = res {
            sp.in_pipe -= n as u32;
        }
        match res {
            Ok(_) if sp.in_pipe == 0 => self.pump(env, from),
            // Short write or none: its socket buffer is full.
            Ok(_) | Err(libc::EAGAIN) => {
                sp.poll_out = true;
                dst.inflight += 1;
                env.op(Op::Poll {
                    socket: from.other(),
                    fd: dst.fd,
                    from,
                });
            }
            Err(err) => {
                tracing::debug!(session = id, err, "splice to peer failed");
                self.send_failed(env, from.other());
                self.end_splice(env, from, false);
            }
        }
        self.advance(env);
    }

    /// The next step of moving the current frame's payload from `from`
    /// through its pipe to the other side: fill the pipe while the source
    /// has bytes, then write it out in one go (fewer, larger sends wake the
    /// receiver less often); wait for readiness when a socket would block.
    fn pump(&mut self, env: &mut Env, from: Who) {
        let relaying = self.kind() == Kind::Relay;
        let (src, dst, tracker) = self.split(from);
        let Some(sp) = src.splice.as_mut() else {
            return;
        };
        let Some(pipe) = sp.pipe.as_ref() else {
            return;
        };
        if !sp.started || sp.poll_in || sp.poll_out || sp.busy {
            return;
        }
        if dst.shut || dst.closed || dst.fd < 0 {
            // Nobody left to deliver to; the closing path reads on.
            self.end_splice(env, from, false);
            return;
        }
        let remaining = tracker.data_payload_remaining();
        let filling = sp.readable && remaining > 0 && relaying && !src.eof && sp.in_pipe < pipe.cap;
        if sp.in_pipe > 0 && !filling {
            sp.busy = true;
            env.op(Op::SpliceOut {
                from,
                pipe: pipe.r,
                socket: dst.fd,
                len: sp.in_pipe as usize,
            });
            return;
        }
        if sp.in_pipe == 0 && (remaining == 0 || src.eof || !relaying) {
            // The frame is through (or the session is ending): back to
            // buffered receives, which see the next header.
            let lost = src.eof;
            self.end_splice(env, from, remaining == 0);
            if lost {
                // Reported only now that the pipe has been delivered.
                self.on_side_lost(env, from);
            }
            return;
        }
        if !sp.readable {
            sp.poll_in = true;
            src.inflight += 1;
            env.op(Op::Poll {
                socket: from,
                fd: src.fd,
                from,
            });
            return;
        }
        let want = remaining.min(u64::from(pipe.cap - sp.in_pipe)) as usize;
        sp.busy = true;
        sp.want = want;
        env.op(Op::SpliceIn {
            from,
            socket: src.fd,
            pipe: pipe.w,
            len: want,
        });
    }

    /// Leaves splice mode: the pipe goes back to the shard (pooled if
    /// empty) and buffered receives resume, single-buffer first if `probe`.
    pub(super) fn end_splice(&mut self, env: &mut Env, from: Who, probe: bool) {
        let src = self.side(from);
        if let Some(sp) = src.splice.take() {
            if let Some(pipe) = sp.pipe {
                // A pipe still holding bytes nobody will read is closed.
                let empty = sp.in_pipe == 0;
                env.op(Op::ReleasePipe { pipe, empty });
            }
        }
        src.paused = false;
        src.probe = probe;
        self.arm_recv(env, from);
    }
}
