//! The shard-wide provided-buffer ring: multishot receives on every socket of
//! the shard pick buffers from it, and a buffer goes back only after the
//! bytes it holds were sent on (or copied out during setup). An idle session
//! therefore holds no buffer at all.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

pub const BGID: u16 = 0;

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
    pub fn new(uring: &IoUring, entries: u16, buf_size: u32) -> io::Result<Self> {
        assert!(entries.is_power_of_two());
        let ring_len = entries as usize * std::mem::size_of::<BufRingEntry>();
        let ring = Mapping::new(ring_len.max(4096))?;
        let bufs = Mapping::new(entries as usize * buf_size as usize)?;
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
                BGID,
                0,
            )?;
        }
        let mut br = BufRing {
            ring,
            bufs,
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

    fn push(&mut self, bid: u16) {
        let addr = self.buf_ptr(bid) as u64;
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
        debug_assert_eq!(self.refs[usize::from(bid)], 0, "buffer {bid} taken twice");
        self.refs[usize::from(bid)] = 1;
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
        let r = &mut self.refs[usize::from(bid)];
        debug_assert!(
            *r > 0,
            "retain of buffer {bid}, which user space does not own"
        );
        *r = r.saturating_add(1);
    }

    /// Drops one reference to a buffer; the last returns it to the kernel
    /// (visible after the next `publish`).
    pub fn recycle(&mut self, bid: u16) {
        let r = &mut self.refs[usize::from(bid)];
        debug_assert!(*r > 0, "buffer {bid} recycled twice");
        match *r {
            // Pushing it twice would hand the kernel one buffer for two
            // receives.
            0 => {}
            1 => {
                *r = 0;
                self.push(bid);
            }
            _ => *r -= 1,
        }
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        assert!(bid < self.entries, "buffer {bid} out of the ring");
        // SAFETY: bid < entries, so the offset is within the buffer mapping
        // (entries × buf_size bytes).
        unsafe {
            self.bufs
                .ptr
                .as_ptr()
                .add(bid as usize * self.buf_size as usize)
        }
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
            self.refs.get(usize::from(bid)).is_some_and(|&r| r > 0),
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

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> u32 {
        self.entries as u32 - self.out
    }

    pub fn unregister(&self, uring: &IoUring) {
        let _ = uring.submitter().unregister_buf_ring(BGID);
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

impl crate::session::RingBytes for BufRing {
    fn bytes(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        self.slice(bid, off, len)
    }
}
