//! The glommio glue: one reader and one writer task per data shard socket,
//! and one task per Controlplane request. Decisions are the placer's.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::UnixStream;
use tracing::{debug, error};

use super::client::Client;
use super::clock::Clock;
use super::placer::{Action, Failure, Fetch, Placer};
use super::wire::PlacementFailure;
use super::wire::{PlacementResult, ToControl, ToShard};

/// One shard's socket, split: the reader and the writer each get their own
/// descriptor (a `dup` of the same socket), so the two tasks never share a
/// glommio stream.
pub(crate) struct ShardSocket {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

/// Replies for one shard, encoded as they are decided and written in
/// batches by the shard's writer task.
#[derive(Default)]
struct Outbox {
    buf: RefCell<Vec<u8>>,
    waker: Cell<Option<Waker>>,
    /// The shard is gone: replies are dropped.
    closed: Cell<bool>,
}

impl Outbox {
    fn push(&self, msg: &ToShard) {
        if self.closed.get() {
            return;
        }
        msg.encode(&mut self.buf.borrow_mut());
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Waits for bytes to write, then swaps them for `spare` (emptied).
    async fn take(&self, spare: &mut Vec<u8>) {
        spare.clear();
        poll_fn(|cx| {
            let mut buf = self.buf.borrow_mut();
            if buf.is_empty() {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                std::mem::swap(&mut *buf, spare);
                Poll::Ready(())
            }
        })
        .await
    }
}

struct Service {
    placer: RefCell<Placer>,
    client: Option<Rc<Client>>,
    outboxes: Vec<Outbox>,
    clock: Clock,
}

/// Serves every shard until each has closed its end.
pub(crate) async fn run(
    placer: Placer,
    client: Option<Rc<Client>>,
    shards: Vec<ShardSocket>,
    clock: Clock,
) {
    let svc = Rc::new(Service {
        placer: RefCell::new(placer),
        client,
        outboxes: shards.iter().map(|_| Outbox::default()).collect(),
        clock,
    });
    let mut readers = Vec::with_capacity(shards.len());
    for (shard, s) in shards.into_iter().enumerate() {
        // SAFETY: each descriptor is owned (moved out of its OwnedFd) and
        // handed to exactly one stream, which closes it.
        let (rx, tx) = unsafe {
            (
                UnixStream::from_raw_fd(s.read.into_raw_fd()),
                UnixStream::from_raw_fd(s.write.into_raw_fd()),
            )
        };
        glommio::spawn_local(write_shard(svc.clone(), shard, tx)).detach();
        readers.push(glommio::spawn_local(read_shard(svc.clone(), shard, rx)));
    }
    for r in readers {
        r.await;
    }
    debug!("every data shard closed its control socket; control shard exits");
}

async fn read_shard(svc: Rc<Service>, shard: usize, mut sock: UnixStream) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match sock.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                debug!(shard, error = %e, "control socket read failed");
                return;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        loop {
            match ToControl::decode(&buf[off..]) {
                Ok(Some((msg, used))) => {
                    off += used;
                    svc.handle(shard, msg);
                }
                Ok(None) => break,
                Err(e) => {
                    // Both ends are this program: a bad message is a bug, and
                    // nothing after it can be framed.
                    error!(shard, error = %e, "bad message from data shard; dropping its control socket");
                    svc.outboxes[shard].closed.set(true);
                    return;
                }
            }
        }
        buf.drain(..off);
    }
}

async fn write_shard(svc: Rc<Service>, shard: usize, mut sock: UnixStream) {
    let outbox = &svc.outboxes[shard];
    let mut bytes = Vec::with_capacity(4096);
    while !outbox.closed.get() {
        outbox.take(&mut bytes).await;
        if let Err(e) = sock.write_all(&bytes).await {
            debug!(shard, error = %e, "control socket write failed");
            outbox.closed.set(true);
        }
    }
}

impl Service {
    fn handle(self: &Rc<Self>, shard: usize, msg: ToControl) {
        let ToControl::Placement { id, .. } = msg;
        let action = self
            .placer
            .borrow_mut()
            .handle_request(shard, msg, self.clock.now());
        match action {
            Action::Reply(result) => self.reply(shard, id, result),
            Action::Fetch(f) => self.fetch(f),
            Action::Wait => {}
        }
    }

    fn reply(&self, shard: usize, id: u64, result: PlacementResult) {
        self.outboxes[shard].push(&ToShard::Placement { id, result });
    }

    fn fetch(self: &Rc<Self>, f: Fetch) {
        let svc = self.clone();
        glommio::spawn_local(async move {
            let outcome = match &svc.client {
                Some(c) => c.fetch(&f.repl, &f.exclude).await,
                None => Err(Failure::from(PlacementFailure::Unavailable)),
            };
            let done = svc
                .placer
                .borrow_mut()
                .handle_fetch_done(&f.repl, outcome, svc.clock.now());
            for (w, result) in done.replies {
                svc.reply(w.shard, w.id, result);
            }
            if let Some(again) = done.refetch {
                svc.fetch(again);
            }
        })
        .detach();
    }
}
