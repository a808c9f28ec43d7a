//! A session's ops as io_uring entries and syscalls. Asynchronous ops get a
//! record in the op table that owns their memory; synchronous ones (splice,
//! shutdown, close, a pipe) run at once and their result goes straight back
//! to the session.

use std::collections::VecDeque;

use io_uring::{opcode, squeue, types};
use tracing::debug;

use super::ops::{ConnectMem, Direct, Gather, Rec, IGNORE};
use super::{bufring, ctl, listener, pipe, Entry, Io};
use crate::metrics::Phase as Timing;
use crate::session::{Batch, Chunk, Op, Who};

impl Io {
    pub(super) fn perform(&mut self, slot: u32, e: &mut Entry, op: Op, out: &mut VecDeque<Op>) {
        let gen = e.gen;
        match op {
            Op::Recv {
                who,
                fd,
                single,
                tls,
            } => {
                let pool = self.bufs.pool(tls);
                let (group, size) = (pool.group(), pool.buf_size());
                let entry = if single {
                    opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), size)
                        .buf_group(group)
                        .build()
                        .flags(squeue::Flags::BUFFER_SELECT)
                } else {
                    opcode::RecvMulti::new(types::Fd(fd), group).build()
                };
                self.direct_inflight += 1;
                // SAFETY: no pointer: the kernel picks a ring buffer, which
                // is ours again only with the completion naming it.
                unsafe { self.push(entry.user_data(Direct::Recv(who, tls).user_data(slot, gen))) };
            }
            Op::CancelRecv { who, tls } => self.cancel(Direct::Recv(who, tls).user_data(slot, gen)),
            Op::Send {
                who,
                fd,
                batch,
                fin,
            } => {
                e.sends[who as usize] = self.send(slot, gen, who, fd, batch, fin);
            }
            Op::CancelSend { who } => {
                let ud = e.sends[who as usize];
                if ud != super::NONE {
                    self.cancel(ud);
                }
            }
            Op::Verify => self.verify(slot, e, out),
            Op::Placement {
                seq,
                attempt,
                exclude,
            } => self.placement(slot, e, seq, attempt, exclude, out),
            Op::Connect { addr, keepalive } => {
                let via_ring = self.ring_sockopts;
                let keepalive = keepalive.then_some(&self.cfg.keepalive);
                let res = listener::conman_socket(
                    &addr,
                    keepalive,
                    !via_ring,
                    self.cfg.conman.tcp_congestion.as_deref(),
                )
                    .map_err(|err| {
                        if let Some(held_back) = self.socket_warn.check(self.now) {
                            tracing::warn!(shard = self.shard, %err, held_back, "cannot create a Conman socket");
                        }
                        err.raw_os_error().unwrap_or(libc::EIO)
                    });
                let took = e.s.handle_socket(&mut env!(self, out), res);
                let Ok(fd) = res else {
                    return;
                };
                if !took {
                    // SAFETY: the socket was created just above and nothing
                    // else knows its number.
                    unsafe { libc::close(fd) };
                    return;
                }
                // Nagle off (and keepalive, unless the session defers it)
                // as ring entries rather than a setsockopt(2) each.
                let (opts, n) = if via_ring {
                    listener::conman_sockopts(keepalive)
                } else {
                    Default::default()
                };
                let fresh = ConnectMem {
                    addr: socket2::SockAddr::from(addr),
                    opts: opts.map(|(_, _, v)| v),
                };
                let mem = match self.connects.pop() {
                    Some(mut pooled) => {
                        *pooled = fresh;
                        pooled
                    }
                    None => Box::new(fresh),
                };
                // Each value's address, taken before the box moves into the
                // connect's record: its heap memory stays where it is, and
                // alive until the connect completes.
                let value_ptrs: [*const libc::c_int; listener::CONMAN_SOCKOPTS] =
                    std::array::from_fn(|i| std::ptr::from_ref(&mem.opts[i]));
                // No linked timeout: the session's deadline bounds the
                // connect and cancels it (`Op::CancelConnect`).
                let connect =
                    opcode::Connect::new(types::Fd(fd), mem.addr.as_ptr(), mem.addr.len()).build();
                let connect_ud = self.ops.insert(Rec::Connect { slot, gen, mem });
                e.connect = connect_ud;
                // The whole chain must land in one submission for the links
                // to hold: make room first.
                let room = |ring: &mut io_uring::IoUring| {
                    let sq = ring.submission();
                    sq.capacity() - sq.len()
                };
                while room(&mut self.ring) < n + 1 {
                    let _ = self.ring.submit();
                }
                // SAFETY: each option entry points at its value in the
                // connect's record (a box, not moved by the insert), and is
                // hard-linked before the connect, which cannot complete
                // before it; the connect points at `mem.addr` in the same
                // box. The box leaves the record (for the pool) only at the
                // connect's completion, when the kernel is done with both.
                unsafe {
                    for (&opt, value) in opts[..n].iter().zip(value_ptrs) {
                        self.push(sockopt_entry(fd, opt, value));
                    }
                    self.push(connect.user_data(connect_ud));
                }
            }
            Op::TcpKeepalive { fd } => {
                // Rare (once per session that lives past its first liveness
                // look), so plain syscalls rather than ring entries whose
                // values would need a home until they complete.
                if let Err(err) = listener::set_keepalive_fd(fd, &self.cfg.keepalive) {
                    debug!(session = e.s.id, %err, "cannot set TCP keepalive on a Conman socket");
                }
            }
            Op::CancelConnect => {
                if e.connect != super::NONE {
                    self.cancel_connect(e.connect);
                }
            }
            Op::Shutdown { fd, both } => {
                let how = if both { libc::SHUT_RDWR } else { libc::SHUT_WR };
                // SAFETY: the session's socket, still open.
                unsafe { libc::shutdown(fd, how) };
            }
            Op::Close { fd } => {
                // In the ring rather than a close(2) of its own: it goes in
                // the turn's one io_uring_enter with everything else. The
                // number stays taken until then, so no socket made
                // meanwhile can be handed the same fd. What the session
                // still has in flight on it (a receive cancelled just
                // before, its last send) holds its own reference to the
                // socket until it ends, and the FIN goes then; the session
                // names no op by this fd any more. Its result is of no use:
                // close fails only for a bad fd.
                // SAFETY: no pointer.
                unsafe { self.push(opcode::Close::new(types::Fd(fd)).build().user_data(IGNORE)) };
            }
            Op::Recycle { bid } => self.bufs.recycle(bid),
            Op::Retain { bid } => self.bufs.retain(bid),
            Op::VmFailed { vm } => {
                // Static placement keeps this; the Controlplane judges VM
                // health itself.
                let timeout = std::time::Duration::from_millis(self.cfg.placement.fail_timeout_ms);
                if let (Some(local), false) = (&self.local_placement, timeout.is_zero()) {
                    local.mark_down(&vm, self.now, timeout);
                }
            }
            Op::Reset { fd } => reset(fd),
            Op::NeedPipe { from } => {
                let pipe = match self.pipes.pop() {
                    Some(p) => Some(p),
                    None => pipe::new_pipe(self.cfg.buffers.pipe_size)
                        .inspect_err(|err| debug!(session = e.s.id, %err, "no pipe for splice"))
                        .ok(),
                };
                e.s.handle_pipe(&mut env!(self, out), from, pipe);
            }
            Op::ReleasePipe { pipe, empty } => {
                if empty && self.pipes.len() < pipe::POOL {
                    self.pipes.push(pipe);
                } else {
                    pipe::close_pipe(pipe);
                }
            }
            Op::SpliceIn {
                from,
                socket,
                pipe,
                len,
            } => {
                let res = pipe::splice_nb(socket, pipe, len);
                e.s.handle_spliced_in(&mut env!(self, out), from, res);
            }
            Op::SpliceOut {
                from,
                pipe,
                socket,
                len,
            } => {
                let res = pipe::splice_nb(pipe, socket, len);
                e.s.handle_spliced_out(&mut env!(self, out), from, res);
            }
            Op::Poll { socket, fd, from } => {
                let events = if socket == from {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                };
                let ud = Direct::Poll { socket, from }.user_data(slot, gen);
                self.direct_inflight += 1;
                // SAFETY: no pointer.
                unsafe {
                    self.push(
                        opcode::PollAdd::new(types::Fd(fd), events as u32)
                            .build()
                            .user_data(ud),
                    )
                };
            }
        }
    }

    /// Returns the send's user_data.
    fn send(&mut self, slot: u32, gen: u16, who: Who, fd: i32, batch: Batch, fin: bool) -> u64 {
        // MSG_MORE keeps a partial segment in the send queue (TCP_NODELAY
        // notwithstanding) until the close behind this send, whose FIN
        // then rides on it (tcp_send_fin). Should the send end up waiting
        // for room, the close still waits for it: the send holds the
        // socket, and the FIN is sent when it lets go.
        let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL | if fin { libc::MSG_MORE } else { 0 };
        let chunk_ptr = |bufs: &bufring::Pools, c: &Chunk| -> (*mut u8, usize) {
            match c {
                // The send's record holds the buffer (it is recycled only on
                // the completion); chunk_ptr checks the range and ownership.
                Chunk::Buf { bid, off, len } => (bufs.chunk_ptr(*bid, *off, *len), *len as usize),
                Chunk::Owned { data, off } => (
                    data[*off as usize..].as_ptr() as *mut u8,
                    data.len() - *off as usize,
                ),
            }
        };
        let (entry, gather) = match &batch {
            Batch::One(c) => {
                let (ptr, len) = chunk_ptr(&self.bufs, c);
                // MSG_WAITALL: the kernel retries a short send itself, so a
                // side may close with its last send still in flight.
                let entry = opcode::Send::new(types::Fd(fd), ptr, len as u32)
                    .flags(flags)
                    .build();
                (entry, None)
            }
            Batch::Many(chunks) => {
                let mut g = self.gathers.pop().unwrap_or_else(Gather::new);
                for (i, c) in chunks.iter().enumerate() {
                    let (ptr, len) = chunk_ptr(&self.bufs, c);
                    g.iov[i] = libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: len,
                    };
                }
                g.msg.msg_iov = g.iov.as_mut_ptr();
                g.msg.msg_iovlen = chunks.len();
                let entry = opcode::SendMsg::new(types::Fd(fd), &g.msg)
                    .flags(flags as u32)
                    .build();
                (entry, Some(g))
            }
        };
        // Owned chunks are boxed and ring buffers stay where they are, so
        // moving the batch into the record keeps every pointer valid.
        let ud = self.ops.insert(Rec::Send {
            slot,
            gen,
            who,
            batch,
            gather,
        });
        // SAFETY: the entry points at the chunks (boxed bytes, or ring
        // buffers the record holds a reference to) and, gathered, at the
        // Gather box's msghdr and iovecs; all are in the record until the
        // completion, and none moves with it.
        unsafe { self.push(entry.user_data(ud)) };
        ud
    }

    /// Gives the ring buffers of a send nobody will complete back.
    pub(super) fn recycle_batch(&mut self, batch: Batch) {
        for c in batch.chunks() {
            if let Chunk::Buf { bid, .. } = c {
                self.bufs.recycle(*bid);
            }
        }
    }

    /// A token from the cache is answered at once; a fresh one waits for
    /// the end of the loop turn to be verified with the turn's others, or
    /// alone if batching is off.
    fn verify(&mut self, slot: u32, e: &mut Entry, out: &mut VecDeque<Op>) {
        let t0 = std::time::Instant::now();
        let verdict = match e.s.token() {
            None => Err("missing"),
            Some(t) => {
                let verdict =
                    match self
                        .verify_cache
                        .cached(&self.keys, t, self.now_unix, &self.verify)
                    {
                        Some(hit) => hit,
                        None if self.cfg.token.batch_verify => {
                            self.verify_queue.push((slot, e.gen));
                            return;
                        }
                        None => self.verify_cache.verify_fresh(
                            &self.keys,
                            t,
                            self.now_unix,
                            &self.verify,
                        ),
                    };
                self.unless_revoked(verdict)
            }
        };
        self.stats.setup_duration(Timing::Token, t0.elapsed());
        e.s.handle_token(&mut env!(self, out), verdict);
    }

    /// Static placement is answered here; otherwise the control shard is
    /// asked and its reply comes back through `Shard::on_ctl_recv`.
    fn placement(
        &mut self,
        slot: u32,
        e: &mut Entry,
        seq: u16,
        attempt: u8,
        exclude: Vec<String>,
        out: &mut VecDeque<Op>,
    ) {
        let Some(ident) = e.s.ident().cloned() else {
            return;
        };
        let result = if let Some(local) = &self.local_placement {
            local.pick(ident.repl(), &exclude, &self.evacuated, self.now)
        } else if self.ctl.dead {
            e.s.handle_control_lost(&mut env!(self, out));
            return;
        } else {
            let id = ctl::request_id(slot, e.gen, seq);
            self.ctl_send(|buf| {
                crate::control::wire::ToControl::Placement {
                    id,
                    repl: ident.repl().to_owned(),
                    cluster: ident.cluster().to_owned(),
                    attempt,
                    exclude,
                }
                .encode(buf)
            });
            return;
        };
        e.s.handle_placement(&mut env!(self, out), seq, result);
    }
}

/// Aborts a connection with a RST now: SO_LINGER 0 makes the eventual
/// close(2) reset too, and connect(AF_UNSPEC) disconnects at once (Linux's
/// tcp_disconnect sends the RST and fails pending operations, so nothing
/// in flight waits for the close).
fn reset(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: the session's socket, still open; both pointers are to
    // locals that outlive the calls, with their exact sizes.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::connect(
            fd,
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}

/// The ring entry setting option `opt` of socket `fd` to `*value`, for a
/// chain before a connect: hard-linked, so the connect runs after it
/// however it went (the startup probe showed that the ring sets options)
/// and so no later than it is done with `value`, which the caller keeps
/// alive until the connect completes; no completion unless it fails.
fn sockopt_entry(
    fd: std::os::fd::RawFd,
    opt: listener::SockOpt,
    value: *const libc::c_int,
) -> squeue::Entry {
    let (level, name, _) = opt;
    opcode::SetSockOpt::new(
        types::Fd(fd),
        level as u32,
        name as u32,
        value.cast(),
        std::mem::size_of::<libc::c_int>() as u32,
    )
    .build()
    .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
    .user_data(IGNORE)
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    use io_uring::{opcode, IoUring};

    use super::*;
    use crate::config::KeepaliveConfig;

    /// The ring path must leave a Conman socket exactly as the
    /// setsockopt(2) path does.
    #[test]
    fn options_set_through_the_ring_match_the_syscall_ones() {
        let mut ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(64)
            .unwrap();
        if !super::super::ring_sets_sockopts(&mut ring) {
            eprintln!("skipped: this kernel's ring does not set socket options (before 6.7)");
            return;
        }
        let k = KeepaliveConfig {
            tcp_keepidle_s: 61,
            tcp_keepintvl_s: 11,
            tcp_keepcnt: 7,
            tcp_user_timeout_ms: 4321,
            ..KeepaliveConfig::default()
        };
        let addr = "127.0.0.1:9".parse().unwrap();
        let fd = listener::conman_socket(&addr, Some(&k), false, None).unwrap();
        // SAFETY: the socket just created, owned from here on.
        let s = unsafe { socket2::Socket::from_raw_fd(fd) };
        assert!(!s.nodelay().unwrap(), "options set before the ring did");
        let (opts, n) = listener::conman_sockopts(Some(&k));
        let values = Box::new(opts.map(|(_, _, v)| v));
        // SAFETY: `values` lives until the Nop after the chain completed.
        unsafe {
            let mut sq = ring.submission();
            for (i, &opt) in opts[..n].iter().enumerate() {
                sq.push(&sockopt_entry(fd, opt, values.as_ptr().add(i)))
                    .unwrap();
            }
            sq.push(&opcode::Nop::new().build().user_data(7)).unwrap();
        }
        let c = loop {
            ring.submit_and_wait(1).unwrap();
            if let Some(c) = ring.completion().next() {
                break c;
            }
        };
        assert_eq!(c.user_data(), 7, "an option failed: {}", c.result());
        drop(values);
        assert!(s.nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(61));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(11));
        assert_eq!(s.keepalive_retries().unwrap(), 7);
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(4321))
        );
    }
}
