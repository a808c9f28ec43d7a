//! The test's own WebSocket wire code, shared by the clients and the fake
//! Conmans: an incremental frame reader that hands payload over as it
//! arrives (so bytes of a frame cut by a reset are still checked), a write
//! queue that can stop at an exact byte, and non-blocking socket helpers
//! (reset, unsent bytes, poll).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::Socket;

/// One thing the reader found.
pub enum Ev<'a> {
    /// Payload bytes of a data frame (unmasked), in order; may be a part.
    Data { opcode: u8, chunk: &'a [u8] },
    /// A whole control frame (Close, Ping, Pong).
    Control { opcode: u8, payload: &'a [u8] },
    /// The end of a data frame.
    DataEnd { opcode: u8 },
}

struct Cur {
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    got: u64,
}

/// Frames parsed from a byte stream fed in arbitrary pieces.
pub struct FrameReader {
    /// Frames from a client are masked, frames from Conman are not.
    masked: bool,
    hdr: Vec<u8>,
    cur: Option<Cur>,
    ctl: Vec<u8>,
    scratch: Vec<u8>,
}

/// Our peers never send larger frames.
const MAX_LEN: u64 = 1 << 20;

fn header_len(h: &[u8]) -> usize {
    if h.len() < 2 {
        return 2;
    }
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if h[1] & 0x80 != 0 { 4 } else { 0 }
}

impl FrameReader {
    pub fn new(masked: bool) -> FrameReader {
        FrameReader {
            masked,
            hdr: Vec::with_capacity(14),
            cur: None,
            ctl: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// True between frames.
    pub fn at_boundary(&self) -> bool {
        self.cur.is_none() && self.hdr.is_empty()
    }

    /// Feeds bytes; calls `f` for what they complete. An error names a
    /// frame our peers never send (the relay changed the bytes).
    pub fn feed(&mut self, mut data: &[u8], f: &mut dyn FnMut(Ev)) -> Result<(), String> {
        while !data.is_empty() {
            let Some(cur) = self.cur.as_mut() else {
                let want = header_len(&self.hdr);
                let take = (want - self.hdr.len()).min(data.len());
                self.hdr.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.hdr.len() == header_len(&self.hdr) {
                    self.start_frame(f)?;
                }
                continue;
            };
            let take = ((cur.len - cur.got) as usize).min(data.len());
            let chunk = match cur.mask {
                Some(k) => {
                    self.scratch.clear();
                    let at = cur.got as usize;
                    self.scratch.extend(
                        data[..take]
                            .iter()
                            .enumerate()
                            .map(|(i, b)| b ^ k[(at + i) % 4]),
                    );
                    &self.scratch[..]
                }
                None => &data[..take],
            };
            cur.got += take as u64;
            if cur.opcode >= 8 {
                self.ctl.extend_from_slice(chunk);
            } else {
                f(Ev::Data {
                    opcode: cur.opcode,
                    chunk,
                });
            }
            data = &data[take..];
            if cur.got == cur.len {
                self.end_frame(f);
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, f: &mut dyn FnMut(Ev)) -> Result<(), String> {
        let h = std::mem::take(&mut self.hdr);
        let opcode = h[0] & 0x0f;
        let fin = h[0] & 0x80 != 0;
        let masked = h[1] & 0x80 != 0;
        let (len, rest) = match h[1] & 0x7f {
            126 => (u16::from_be_bytes([h[2], h[3]]) as u64, &h[4..]),
            127 => (u64::from_be_bytes(h[2..10].try_into().unwrap()), &h[10..]),
            n => (n as u64, &h[2..]),
        };
        let what = format!("frame header {h:02x?}");
        if h[0] & 0x70 != 0 {
            return Err(format!("RSV bits set: {what}"));
        }
        if masked != self.masked {
            return Err(format!(
                "mask bit {masked}, expected {}: {what}",
                self.masked
            ));
        }
        match opcode {
            1 | 2 if fin => {}
            8..=10 if fin && len <= 125 => {}
            _ => return Err(format!("a frame our peers never send: {what}")),
        }
        if len > MAX_LEN {
            return Err(format!("length {len}: {what}"));
        }
        let mask = masked.then(|| rest[..4].try_into().unwrap());
        self.hdr = h;
        self.hdr.clear();
        self.cur = Some(Cur {
            opcode,
            mask,
            len,
            got: 0,
        });
        if len == 0 {
            self.end_frame(f);
        }
        Ok(())
    }

    fn end_frame(&mut self, f: &mut dyn FnMut(Ev)) {
        let cur = self.cur.take().expect("a frame in progress");
        if cur.opcode >= 8 {
            f(Ev::Control {
                opcode: cur.opcode,
                payload: &self.ctl,
            });
            self.ctl.clear();
        } else {
            f(Ev::DataEnd { opcode: cur.opcode });
        }
    }
}

/// Bytes queued for one socket, in segments so that a control frame can go
/// in at the next frame boundary and an exact byte can end the writing.
#[derive(Default)]
pub struct WriteQueue {
    segs: VecDeque<Seg>,
    /// Bytes written so far.
    pub written: u64,
    /// Stop once this many bytes are written (a planned reset point).
    pub stop_at: Option<u64>,
}

struct Seg {
    bytes: Vec<u8>,
    pos: usize,
}

impl WriteQueue {
    pub fn push(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.segs.push_back(Seg { bytes, pos: 0 });
        }
    }

    /// Queues `bytes` right after the segment being written (a frame
    /// boundary), ahead of the rest.
    pub fn push_urgent(&mut self, bytes: Vec<u8>) {
        let at = match self.segs.front() {
            Some(s) if s.pos > 0 => 1,
            _ => 0,
        };
        self.segs.insert(at, Seg { bytes, pos: 0 });
    }

    /// Drops every segment not yet started.
    pub fn drop_unstarted(&mut self) {
        let keep = match self.segs.front() {
            Some(s) if s.pos > 0 => 1,
            _ => 0,
        };
        self.segs.truncate(keep);
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.segs.iter().map(|s| s.bytes.len() - s.pos).sum()
    }

    /// Wants to write: something queued and the stop point not reached.
    pub fn wants_write(&self) -> bool {
        !self.segs.is_empty() && !self.stopped()
    }

    pub fn stopped(&self) -> bool {
        self.stop_at.is_some_and(|s| self.written >= s)
    }

    /// Writes until the socket is full, the queue empty or the stop point
    /// reached.
    pub fn flush(&mut self, mut sock: &Socket) -> io::Result<()> {
        while let Some(seg) = self.segs.front_mut() {
            let mut end = seg.bytes.len();
            if let Some(stop) = self.stop_at {
                let left = stop.saturating_sub(self.written) as usize;
                if left == 0 {
                    return Ok(());
                }
                end = end.min(seg.pos + left);
            }
            match sock.write(&seg.bytes[seg.pos..end]) {
                Ok(n) => {
                    seg.pos += n;
                    self.written += n as u64;
                    if seg.pos == seg.bytes.len() {
                        self.segs.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What one non-blocking read found.
pub enum Read1 {
    Data(usize),
    WouldBlock,
    Eof,
    Reset,
}

pub fn read1(mut sock: &Socket, buf: &mut [u8]) -> Read1 {
    loop {
        return match sock.read(buf) {
            Ok(0) => Read1::Eof,
            Ok(n) => Read1::Data(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read1::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => Read1::Reset,
        };
    }
}

/// SO_LINGER 0: closing `sock` sends the peer a RST, not a FIN.
pub fn arm_reset(sock: &Socket) {
    sock.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
}

/// Bytes written but not yet taken in by the peer's kernel (on loopback:
/// not yet in the peer's receive queue).
pub fn unsent(sock: &Socket) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the pointer.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        0
    } else {
        n as usize
    }
}

/// poll(2) over `fds`; returns when one is ready or `timeout` passes.
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) {
    // SAFETY: the pointer and length describe `fds`, alive for the call.
    let r = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted, "poll: {e}");
    }
}

pub fn pollfd(sock: &Socket, write: bool) -> libc::pollfd {
    libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN | if write { libc::POLLOUT } else { 0 },
        revents: 0,
    }
}

/// The end of an HTTP head in `buf`, if it is there.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A header's value in a parsed head.
pub fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_handles_every_split() {
        let mut wire = Vec::new();
        wire.extend(crate::support::frame(
            true,
            2,
            &[7u8; 300],
            Some([1, 2, 3, 4]),
        ));
        wire.extend(crate::support::frame(true, 9, b"hi", Some([5, 6, 7, 8])));
        wire.extend(crate::support::frame(true, 1, b"", Some([1, 1, 1, 1])));
        for cut in 0..wire.len() {
            let mut r = FrameReader::new(true);
            let mut data = Vec::new();
            let mut events = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                r.feed(part, &mut |ev| match ev {
                    Ev::Data { chunk, .. } => data.extend_from_slice(chunk),
                    Ev::Control { opcode, payload } => events.push((opcode, payload.to_vec())),
                    Ev::DataEnd { opcode } => events.push((opcode, vec![])),
                })
                .unwrap();
            }
            assert_eq!(data, vec![7u8; 300], "cut {cut}");
            assert_eq!(
                events,
                vec![(2, vec![]), (9, b"hi".to_vec()), (1, vec![])],
                "cut {cut}"
            );
            assert!(r.at_boundary());
        }
    }

    #[test]
    fn reader_refuses_unmasked_client_frames() {
        let mut r = FrameReader::new(true);
        let err = r
            .feed(&crate::support::frame(true, 2, b"x", None), &mut |_| {})
            .unwrap_err();
        assert!(err.contains("mask bit"), "{err}");
    }
}
