//! `eval-loadgen echo-server`: the WebSocket echo backend behind every proxy
//! in the benchmark, so it must cost as little as possible per message.
//!
//! One mio (epoll) loop per thread, each with its own `SO_REUSEPORT`
//! listener. After the upgrade it is frame-aware but never holds a frame:
//! each client frame is echoed back as it streams in, same opcode, fin and
//! length, payload unmasked; Pings come back as Pongs, Pongs are dropped, a
//! Close is echoed and then the connection is closed. An idle connection
//! holds no buffer: reads go to one per-thread buffer and output is kept
//! per connection only while the socket is full (and then reading from that
//! connection pauses, which is the backpressure).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::thread;

use anyhow::{Context, Result};
use eval_proxy::proto::frame::{apply_mask, FrameHeader, OpCode, MAX_HEADER_LEN};
use eval_proxy::proto::handshake::accept_key;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::net::{raise_nofile_limit, reuseport_listener};
use crate::out::print_flushed;

const LISTENER: Token = Token(usize::MAX - 1);

const RX_BUF: usize = 256 * 1024;

/// Eval tokens make request lines up to 16 KiB; leave room for headers.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

const MAX_REQUEST_HEADERS: usize = 64;

/// Binds `listen` once per thread, prints `listening ADDR` and serves
/// until the process is killed.
pub fn run(listen: SocketAddr, threads: usize) -> Result<()> {
    raise_nofile_limit().context("raising the open-files limit")?;
    let first = reuseport_listener(listen).with_context(|| format!("binding {listen}"))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        // The first bind settled the port when `listen` asked for port 0.
        listeners.push(reuseport_listener(addr).with_context(|| format!("binding {addr}"))?);
    }
    let mut handles = Vec::with_capacity(threads);
    for (index, listener) in listeners.into_iter().enumerate() {
        let handle = thread::Builder::new()
            .name(format!("echo-{index}"))
            .spawn(move || serve(listener))
            .context("spawning an echo thread")?;
        handles.push(handle);
    }
    print_flushed(&format!("listening {addr}"))?;
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("an echo thread panicked"),
        }
    }
    Ok(())
}

fn serve(mut listener: TcpListener) -> Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut slots: Vec<Option<Session>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut rx = vec![0u8; RX_BUF].into_boxed_slice();
    let mut tx: Vec<u8> = Vec::with_capacity(RX_BUF + 4096);
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&listener, &poll, &mut slots, &mut free);
                continue;
            }
            let index = event.token().0;
            let Some(Some(session)) = slots.get_mut(index) else {
                continue;
            };
            let read_closed = event.is_read_closed() || event.is_error();
            let keep = session.on_event(
                event.is_readable() || read_closed,
                event.is_writable(),
                read_closed,
                &mut rx,
                &mut tx,
            );
            if !keep {
                if let Some(mut session) = slots[index].take() {
                    poll.registry().deregister(&mut session.sock).ok();
                }
                free.push(index);
            }
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    slots: &mut Vec<Option<Session>>,
    free: &mut Vec<usize>,
) {
    loop {
        let (mut sock, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: the connection stays queued; say so
                // once per burst rather than spin on it.
                eprintln!("eval-loadgen echo-server: accept: {e}");
                return;
            }
        };
        sock.set_nodelay(true).ok();
        let index = free.pop().unwrap_or(slots.len());
        let registered = poll.registry().register(
            &mut sock,
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        );
        if registered.is_err() {
            free.push(index);
            continue;
        }
        if index == slots.len() {
            slots.push(None);
        }
        slots[index] = Some(Session::new(sock));
    }
}

enum State {
    /// Reading the upgrade request.
    Request(Vec<u8>),
    Open,
    /// Answered, echoed the Close or refused: close once output is out.
    Closing,
}

/// The frame being echoed: payload bytes left, its mask and the offset
/// into the payload (masking is position-dependent), whether it is dropped
/// (a Pong) and whether it is a Close.
#[derive(Clone, Copy)]
struct InFrame {
    left: u64,
    mask: Option<[u8; 4]>,
    offset: usize,
    drop: bool,
    close: bool,
}

struct Session {
    sock: TcpStream,
    state: State,
    head: [u8; MAX_HEADER_LEN],
    head_len: usize,
    frame: Option<InFrame>,
    /// Output the socket did not take; reading pauses until it is out.
    pending: Vec<u8>,
    pending_pos: usize,
}

impl Session {
    fn new(sock: TcpStream) -> Self {
        Self {
            sock,
            state: State::Request(Vec::new()),
            head: [0; MAX_HEADER_LEN],
            head_len: 0,
            frame: None,
            pending: Vec::new(),
            pending_pos: 0,
        }
    }

    /// Returns false when the connection is done.
    fn on_event(
        &mut self,
        readable: bool,
        writable: bool,
        read_closed: bool,
        rx: &mut [u8],
        tx: &mut Vec<u8>,
    ) -> bool {
        let was_paused = !self.pending.is_empty();
        if was_paused {
            if !writable {
                return true;
            }
            match self.write_pending() {
                Ok(true) => {}
                Ok(false) => return true,
                Err(_) => return false,
            }
        }
        if matches!(self.state, State::Closing) {
            return false;
        }
        if readable || was_paused {
            return self.read(read_closed, rx, tx);
        }
        true
    }

    fn read(&mut self, read_closed: bool, rx: &mut [u8], tx: &mut Vec<u8>) -> bool {
        loop {
            let n = match self.sock.read(rx) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            tx.clear();
            self.on_bytes(&rx[..n], tx);
            match self.write_out(tx) {
                Ok(true) => {}
                // Paused until writable.
                Ok(false) => return true,
                Err(_) => return false,
            }
            if matches!(self.state, State::Closing) {
                return false;
            }
            // A short read emptied the socket; epoll reports later data as
            // a new edge, so skip the read that would only say EAGAIN (but
            // not when this event already brought the FIN).
            if n < rx.len() && !read_closed {
                return true;
            }
        }
    }

    fn on_bytes(&mut self, bytes: &[u8], tx: &mut Vec<u8>) {
        match &mut self.state {
            State::Request(head) => {
                head.extend_from_slice(bytes);
                let head = std::mem::take(head);
                match answer_request(&head, tx) {
                    Ok(Some(used)) => {
                        self.state = State::Open;
                        self.on_frames(&head[used..], tx);
                    }
                    Ok(None) => self.state = State::Request(head),
                    Err(()) => self.state = State::Closing,
                }
            }
            State::Open => self.on_frames(bytes, tx),
            State::Closing => {}
        }
    }

    fn on_frames(&mut self, mut buf: &[u8], tx: &mut Vec<u8>) {
        while !buf.is_empty() && matches!(self.state, State::Open) {
            let Some(mut frame) = self.frame else {
                let have = self.head_len;
                let take = (MAX_HEADER_LEN - have).min(buf.len());
                let parsed = if have == 0 {
                    FrameHeader::parse(buf)
                } else {
                    self.head[have..have + take].copy_from_slice(&buf[..take]);
                    FrameHeader::parse(&self.head[..have + take])
                };
                let (header, head_len) = match parsed {
                    Ok(Some(parsed)) => parsed,
                    Ok(None) => {
                        if have == 0 {
                            self.head[..take].copy_from_slice(&buf[..take]);
                        }
                        self.head_len = have + take;
                        return;
                    }
                    Err(_) => {
                        self.state = State::Closing;
                        return;
                    }
                };
                self.head_len = 0;
                buf = &buf[head_len - have..];
                self.begin_frame(header, tx);
                continue;
            };
            let n = buf
                .len()
                .min(usize::try_from(frame.left).unwrap_or(usize::MAX));
            if !frame.drop {
                let start = tx.len();
                tx.extend_from_slice(&buf[..n]);
                if let Some(mask) = frame.mask {
                    apply_mask(&mut tx[start..], mask, frame.offset);
                }
            }
            buf = &buf[n..];
            frame.left -= n as u64;
            frame.offset += n;
            self.end_or_keep(frame);
        }
    }

    fn begin_frame(&mut self, header: FrameHeader, tx: &mut Vec<u8>) {
        let opcode = match header.opcode {
            OpCode::Ping => OpCode::Pong,
            other => other,
        };
        let drop = header.opcode == OpCode::Pong;
        if !drop {
            let out = FrameHeader {
                mask: None,
                opcode,
                ..header
            };
            let mut head = [0u8; MAX_HEADER_LEN];
            let len = out.encode(&mut head);
            tx.extend_from_slice(&head[..len]);
        }
        self.end_or_keep(InFrame {
            left: header.payload_len,
            mask: header.mask,
            offset: 0,
            drop,
            close: header.opcode == OpCode::Close,
        });
    }

    fn end_or_keep(&mut self, frame: InFrame) {
        if frame.left > 0 {
            self.frame = Some(frame);
        } else {
            self.frame = None;
            if frame.close {
                // Echoed the Close: nothing after it is read.
                self.state = State::Closing;
            }
        }
    }

    fn write_out(&mut self, tx: &[u8]) -> io::Result<bool> {
        let mut at = 0;
        while at < tx.len() {
            match self.sock.write(&tx[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending.extend_from_slice(&tx[at..]);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn write_pending(&mut self) -> io::Result<bool> {
        while self.pending_pos < self.pending.len() {
            match self.sock.write(&self.pending[self.pending_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.pending_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Give the memory back: an idle connection should hold no buffer.
        self.pending = Vec::new();
        self.pending_pos = 0;
        Ok(true)
    }
}

/// Answers the upgrade request in `head` into `tx`. `Ok(Some(n))`: upgraded,
/// frames start at `head[n..]`; `Ok(None)`: incomplete; `Err`: answered
/// with an error (or not at all) and the connection should close.
fn answer_request(head: &[u8], tx: &mut Vec<u8>) -> Result<Option<usize>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(head) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) if head.len() < MAX_REQUEST_HEAD => return Ok(None),
        _ => {
            tx.extend_from_slice(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return Err(());
        }
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let Some(key) = header("sec-websocket-key") else {
        // Health checks from proxies land here.
        let body = "eval-loadgen echo-server: WebSocket only\n";
        tx.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        return Err(());
    };
    tx.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    tx.extend_from_slice(accept_key(key).as_bytes());
    tx.extend_from_slice(b"\r\n");
    if let Some(first) = header("sec-websocket-protocol")
        .and_then(|list| list.split(',').next())
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        tx.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        tx.extend_from_slice(first.as_bytes());
        tx.extend_from_slice(b"\r\n");
    }
    tx.extend_from_slice(b"\r\n");
    Ok(Some(used))
}
