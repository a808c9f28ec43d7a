//! The shard-wide provided-buffer rings: multishot receives on every socket of
//! the shard pick buffers from them, and a buffer goes back only after the
//! bytes it holds were sent on (or copied out during setup). An idle session
//! therefore holds no buffer at all.
//!
//! Two pools ([`Pools`]): the main one, and a small one of larger buffers
//! for sessions that speak TLS on a side (both of their sides). Relaying
//! over TLS, larger receives cost less per MiB (measured: 12 % less CPU with
//! 64 KiB buffers): fewer receives and window updates, and Conman's
//! plaintext sealed and sent in fewer, larger bursts. Plaintext sessions
//! keep the main pool's 16 KiB buffers, with which splicing large frames
//! costs less. A TLS-pool buffer may stay queued toward a slow peer like any
//! other; the pool's own low mark (`RingBytes::low`) makes sessions copy
//! instead, and a receive that finds it empty takes a main buffer. Buffer
//! ids are shard-wide: the main pool's run from 0, the TLS pool's follow
//! them, so a chunk or a recycle names its pool by its id alone.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The buffer group of the main pool.
pub const BGID: u16 = 0;
/// The buffer group of the TLS pool.
pub const BGID_TLS: u16 = 1;

struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: anonymous private mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return; // leaked (see `BufRing::leak`)
        }
        // SAFETY: we own the mapping.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    /// The buffer group the ring is registered as.
    bgid: u16,
    /// The shard-wide id of this ring's first buffer (the kernel names
    /// buffers from 0 within their group).
    base: u16,
    entries: u16,
    buf_size: u32,
    tail: u16,
    /// Buffers currently owned by user space (received, not yet recycled).
    out: u32,
    /// Per buffer owned by user space: how many queued chunks refer to it.
    /// A receive split between bytes passed on and bytes held back (a frame
    /// not yet complete) is two chunks of one buffer; it goes back to the
    /// kernel only when both are done.
    refs: Box<[u8]>,
    /// Some buffer was filled since the last trim.
    dirty: bool,
    /// Some buffer was taken since the last `trim_if_idle` call.
    recent: bool,
}

impl BufRing {
    /// Registers `entries` buffers of `buf_size` bytes with the ring.
    /// Memory is mapped, not touched: pages become resident only as buffers
    /// are first used, so a lightly loaded shard stays small.
    pub fn new(
        uring: &IoUring,
        bgid: u16,
        base: u16,
        entries: u16,
        buf_size: u32,
    ) -> io::Result<Self> {
        assert!(entries.is_power_of_two());
        let ring_len = entries as usize * std::mem::size_of::<BufRingEntry>();
        let ring = Mapping::new(ring_len.max(4096))?;
        let bufs = Mapping::new(entries as usize * buf_size as usize)?;
        // The kernel hands buffers out in ring order, so receives walk the
        // whole pool (16 MiB by default): in 4 KiB pages nearly every
        // receive's copy missed the TLB (`_copy_to_iter` was 2-3x nginx's
        // per handshake); in 2 MiB pages the pool needs a few entries.
        // Only advice (THP may be off): the result does not matter.
        // SAFETY: advice on our own fresh mapping.
        unsafe {
            libc::madvise(bufs.ptr.as_ptr().cast(), bufs.len, libc::MADV_HUGEPAGE);
        }
        // SAFETY: the ring memory is page-aligned and stays mapped as long
        // as `self`. Registration pins its pages, so the kernel never
        // follows a stale address into it. The buffers are another matter:
        // the kernel writes into them by address, so they must outlive every
        // receive that may pick one; the shard unregisters and waits for its
        // operations before dropping this, and calls `leak` when some never
        // complete.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                ring.ptr.as_ptr() as u64,
                entries,
                bgid,
                0,
            )?;
        }
        let mut br = BufRing {
            ring,
            bufs,
            bgid,
            base,
            entries,
            buf_size,
            tail: 0,
            out: entries as u32,
            refs: vec![0; usize::from(entries)].into_boxed_slice(),
            dirty: false,
            recent: false,
        };
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn entry(&mut self, idx: u16) -> &mut BufRingEntry {
        let i = (idx & (self.entries - 1)) as usize;
        // SAFETY: i < entries and the mapping holds `entries` entries.
        unsafe { &mut *(self.ring.ptr.as_ptr() as *mut BufRingEntry).add(i) }
    }

    /// `bid`'s index within this ring; checked, since a wrong pool would
    /// hand the kernel (or a send) another session's buffer.
    fn local(&self, bid: u16) -> usize {
        let i = bid.wrapping_sub(self.base);
        assert!(i < self.entries, "buffer {bid} out of the ring");
        usize::from(i)
    }

    /// Whether `bid` is one of this ring's buffers.
    fn holds(&self, bid: u16) -> bool {
        bid.wrapping_sub(self.base) < self.entries
    }

    /// The shard-wide id of the buffer the kernel names `local` in a
    /// completion.
    pub fn global(&self, local: u16) -> u16 {
        assert!(
            local < self.entries,
            "kernel named buffer {local} of {}",
            self.entries
        );
        self.base + local
    }

    /// Hands buffer `local` (the kernel's id, within the group) back.
    fn push(&mut self, bid: u16) {
        let addr = self.buf_ptr(self.base + bid) as u64;
        let len = self.buf_size;
        let tail = self.tail;
        let e = self.entry(tail);
        e.set_addr(addr);
        e.set_len(len);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.out -= 1;
    }

    /// Makes recycled buffers visible to the kernel; called once per loop
    /// turn rather than per buffer.
    pub fn publish(&mut self) {
        // SAFETY: the tail field lives inside the first entry of our mapping.
        let tail = unsafe {
            &*(BufRingEntry::tail(self.ring.ptr.as_ptr() as *const BufRingEntry)
                as *const AtomicU16)
        };
        tail.store(self.tail, Ordering::Release);
    }

    /// Marks `bid` as handed to user space by a completion.
    pub fn taken(&mut self, bid: u16) {
        let i = self.local(bid);
        debug_assert_eq!(self.refs[i], 0, "buffer {bid} taken twice");
        self.refs[i] = 1;
        self.out += 1;
        self.dirty = true;
        self.recent = true;
    }

    /// Gives the pages of every buffer back to the kernel once no buffer
    /// was taken for a whole period between two calls and user space holds
    /// none: the ring cycles through all its buffers, so without this
    /// a shard that once saw traffic keeps the whole pool resident while
    /// its sessions sit idle. Returns whether it trimmed.
    ///
    /// Safe only between `io_uring_enter` calls on a `DEFER_TASKRUN` ring:
    /// the kernel copies into provided buffers only while running this
    /// thread's task work inside `io_uring_enter`, and a page dropped here
    /// is simply zero-filled again when next written.
    pub fn trim_if_idle(&mut self) -> bool {
        // Under traffic, user space often holds no buffer between two
        // completions; trimming then would make the next 1024 receives
        // fault in zeroed pages again (and stall the loop in madvise).
        if std::mem::take(&mut self.recent) || self.out != 0 || !self.dirty {
            return false;
        }
        // SAFETY: our own mapping; no buffer is held by user space and the
        // kernel does not write to it outside io_uring_enter (see above).
        unsafe {
            libc::madvise(
                self.bufs.ptr.as_ptr().cast(),
                self.bufs.len,
                libc::MADV_DONTNEED,
            )
        };
        self.dirty = false;
        true
    }

    /// One more chunk refers to `bid` (see `refs`).
    pub fn retain(&mut self, bid: u16) {
        let i = self.local(bid);
        let r = &mut self.refs[i];
        debug_assert!(
            *r > 0,
            "retain of buffer {bid}, which user space does not own"
        );
        *r = r.saturating_add(1);
    }

    /// Drops one reference to a buffer; the last returns it to the kernel
    /// (visible after the next `publish`).
    pub fn recycle(&mut self, bid: u16) {
        let i = self.local(bid);
        let r = &mut self.refs[i];
        debug_assert!(*r > 0, "buffer {bid} recycled twice");
        match *r {
            // Pushing it twice would hand the kernel one buffer for two
            // receives.
            0 => {}
            1 => {
                *r = 0;
                self.push(i as u16);
            }
            _ => *r -= 1,
        }
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        let i = self.local(bid);
        // SAFETY: `local` checked i < entries, so the offset is within the
        // buffer mapping (entries × buf_size bytes).
        unsafe { self.bufs.ptr.as_ptr().add(i * self.buf_size as usize) }
    }

    /// `len` bytes at `off` of buffer `bid`, which user space owns: for a
    /// send to read. Checked (always, not only in debug builds): a wrong
    /// chunk must stop the shard, never send a neighbouring buffer, which
    /// another session may own.
    pub fn chunk_ptr(&self, bid: u16, off: u32, len: u32) -> *mut u8 {
        assert!(
            u64::from(off) + u64::from(len) <= u64::from(self.buf_size),
            "chunk {off}+{len} past buffer {bid}"
        );
        assert!(
            self.refs[self.local(bid)] > 0,
            "buffer {bid} read while the kernel owns it"
        );
        // SAFETY: off + len <= buf_size (checked above), so the pointer stays
        // within buffer `bid`, which buf_ptr checked is in the mapping.
        unsafe { self.buf_ptr(bid).add(off as usize) }
    }

    /// The received bytes of a buffer user space owns.
    pub fn slice(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        let p = self.chunk_ptr(bid, off, len);
        // SAFETY: `chunk_ptr` checked the range lies in buffer `bid` and that
        // user space owns it: the kernel wrote these bytes before the
        // completion that handed the buffer over and writes it again only
        // after the last reference recycles it, which needs `&mut self`.
        unsafe { std::slice::from_raw_parts(p, len as usize) }
    }

    /// Buffers were filled since the last trim.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// The buffer group a receive names to pick from this ring.
    pub fn group(&self) -> u16 {
        self.bgid
    }

    /// Bytes per buffer: what a single-buffer receive may take.
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> u32 {
        self.entries as u32 - self.out
    }

    /// Under a quarter of the buffers left (at least one): sessions copy
    /// what they would hold rather than keep a buffer (`Env::ring_low`).
    pub fn low(&self) -> bool {
        self.available() < (u32::from(self.entries) / 4).max(1)
    }

    pub fn unregister(&self, uring: &IoUring) {
        let _ = uring.submitter().unregister_buf_ring(self.bgid);
    }

    /// Never unmaps: for an exit with operations still in flight, whose
    /// kernel side may yet write into these pages.
    pub fn leak(&mut self) {
        let empty = || Mapping {
            ptr: std::ptr::NonNull::dangling(),
            len: 0,
        };
        std::mem::forget(std::mem::replace(&mut self.ring, empty()));
        std::mem::forget(std::mem::replace(&mut self.bufs, empty()));
    }
}

/// The shard's two pools (see the module doc). Every call naming a buffer
/// goes to the pool its id falls in.
pub struct Pools {
    pub main: BufRing,
    pub tls: BufRing,
}

impl Pools {
    pub fn new(uring: &IoUring, b: &crate::config::Buffers) -> io::Result<Self> {
        let main = BufRing::new(uring, BGID, 0, b.count as u16, b.size)?;
        let tls = BufRing::new(
            uring,
            BGID_TLS,
            b.count as u16,
            b.tls_count as u16,
            b.tls_size,
        )?;
        Ok(Pools { main, tls })
    }

    fn of(&self, bid: u16) -> &BufRing {
        if self.main.holds(bid) {
            &self.main
        } else {
            &self.tls
        }
    }

    fn of_mut(&mut self, bid: u16) -> &mut BufRing {
        if self.main.holds(bid) {
            &mut self.main
        } else {
            &mut self.tls
        }
    }

    /// The pool a receive of the given kind picks from.
    pub fn pool(&self, tls: bool) -> &BufRing {
        if tls {
            &self.tls
        } else {
            &self.main
        }
    }

    pub fn taken(&mut self, bid: u16) {
        self.of_mut(bid).taken(bid)
    }

    pub fn retain(&mut self, bid: u16) {
        self.of_mut(bid).retain(bid)
    }

    pub fn recycle(&mut self, bid: u16) {
        self.of_mut(bid).recycle(bid)
    }

    pub fn chunk_ptr(&self, bid: u16, off: u32, len: u32) -> *mut u8 {
        self.of(bid).chunk_ptr(bid, off, len)
    }

    pub fn slice(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        self.of(bid).slice(bid, off, len)
    }

    pub fn publish(&mut self) {
        self.main.publish();
        self.tls.publish();
    }

    pub fn dirty(&self) -> bool {
        self.main.dirty() || self.tls.dirty()
    }

    /// Trims each pool that has been idle (see `BufRing::trim_if_idle`);
    /// whether any was.
    pub fn trim_if_idle(&mut self) -> bool {
        let main = self.main.trim_if_idle();
        self.tls.trim_if_idle() || main
    }

    /// Buffers of the main pool the kernel can still fill: what the ring's
    /// low state and the retries after a shortage go by (TLS receives fall
    /// back to the main pool when theirs runs dry).
    pub fn available(&self) -> u32 {
        self.main.available()
    }

    pub fn unregister(&self, uring: &IoUring) {
        self.main.unregister(uring);
        self.tls.unregister(uring);
    }

    pub fn leak(&mut self) {
        self.main.leak();
        self.tls.leak();
    }
}

impl crate::session::RingBytes for Pools {
    fn bytes(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        self.slice(bid, off, len)
    }

    fn low(&self, bid: u16) -> bool {
        self.of(bid).low()
    }
}
