//! The session registry's way into the data shards, and the set of
//! evacuated VMs.
//!
//! Each shard keeps its own sessions; nothing is shared on the data path.
//! A registry request (`GET /sessions`, a close, an evacuation) is posted
//! to every shard's [`Mailbox`] (a bounded channel) and the shard is woken
//! through its eventfd, the one the drain already writes: the shard looks
//! at its mailbox only when that eventfd fires, so its loop pays nothing
//! per event and never blocks (a reply is a send on an unbounded channel).
//! The caller (the admin thread) waits for one reply per shard, up to
//! [`REPLY_DEADLINE`], and merges them.
//!
//! [`Evacuations`] is the process's set of evacuated VMs: written by the
//! admin API, read by placement (each data shard's static placement and
//! the control shard's placer), which keep a local copy and look at one
//! atomic epoch to know when to refresh it (a shard at its wake-up, the
//! placer per request). Evacuations live in memory: a restarted process
//! starts with none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::session::registry::{Filter, Info};

/// Most VMs evacuated at once: each is an `exclude` on every Controlplane
/// request, and a name every placement compares against.
pub const MAX_EVACUATED: usize = 256;

/// Commands waiting in one shard's mailbox; past this the caller is told
/// the shard is busy rather than queueing without bound.
const MAILBOX: usize = 64;

/// How long the admin thread waits for every shard's reply. A shard
/// answers within its loop turn; only a shard stuck far beyond anything
/// normal misses this.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(2);

/// The evacuated VMs, shared by the admin API (writer) and placement
/// (readers, through a local copy).
#[derive(Debug, Default)]
pub struct Evacuations {
    epoch: AtomicU64,
    vms: Mutex<Arc<Vec<String>>>,
}

/// Why a VM could not be evacuated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooMany;

impl Evacuations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<Vec<String>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `vm`; `Ok(false)` if it was already evacuated.
    pub fn add(&self, vm: &str) -> Result<bool, TooMany> {
        let mut vms = self.lock();
        if vms.iter().any(|v| v == vm) {
            return Ok(false);
        }
        if vms.len() >= MAX_EVACUATED {
            return Err(TooMany);
        }
        let mut next = Vec::clone(&vms);
        next.push(vm.to_owned());
        next.sort();
        *vms = Arc::new(next);
        self.epoch.fetch_add(1, Ordering::Release);
        Ok(true)
    }

    /// Removes `vm`; false if it was not evacuated.
    pub fn remove(&self, vm: &str) -> bool {
        let mut vms = self.lock();
        if !vms.iter().any(|v| v == vm) {
            return false;
        }
        *vms = Arc::new(vms.iter().filter(|v| *v != vm).cloned().collect());
        self.epoch.fetch_add(1, Ordering::Release);
        true
    }

    pub fn list(&self) -> Arc<Vec<String>> {
        self.lock().clone()
    }

    /// Brings a reader's copy up to date: one atomic load when nothing
    /// changed since `seen`, the lock only when something did.
    pub fn refresh(&self, seen: &mut u64, copy: &mut Arc<Vec<String>>) {
        let now = self.epoch.load(Ordering::Acquire);
        if now != *seen {
            // The epoch moves after the list: the copy is at least as new.
            *copy = self.list();
            *seen = now;
        }
    }
}

/// What a shard is asked to do.
#[derive(Debug)]
pub enum Command {
    /// Up to `limit` of its sessions that match.
    List { filter: Filter, limit: usize },
    /// Close the session with this id, if it is here.
    Close { id: u64, code: u16 },
    /// Pick up the evacuated set; plan the closes of the sessions on `vm`
    /// over `spread` (an attempt on it moves to another VM at once).
    Evacuate { vm: String, spread: Duration },
    /// Pick up the evacuated set (after a restore).
    Refresh,
}

/// A shard's answer.
#[derive(Debug, Default)]
pub struct Reply {
    pub shard: usize,
    /// `List`: the matching sessions (at most the limit); `matched`
    /// counts them all.
    pub sessions: Vec<Info>,
    pub matched: usize,
    /// `Close`: found and closed. `Evacuate`: closes planned.
    pub closed: usize,
    /// `Evacuate`: setup attempts moved to another VM.
    pub moved: usize,
}

/// A shard's end: commands in, replies out, and the evacuated set.
pub struct Inbox {
    rx: Receiver<(Command, Sender<Reply>)>,
    evacuations: Arc<Evacuations>,
}

impl Inbox {
    /// The next command, if any; never blocks.
    pub fn next(&self) -> Option<(Command, Sender<Reply>)> {
        self.rx.try_recv().ok()
    }

    /// See [`Evacuations::refresh`].
    pub fn refresh(&self, seen: &mut u64, copy: &mut Arc<Vec<String>>) {
        self.evacuations.refresh(seen, copy);
    }
}

/// The admin side of one shard's mailbox.
struct Mailbox {
    tx: SyncSender<(Command, Sender<Reply>)>,
    /// The shard's wake-up eventfd (owned by the process, never closed).
    wake: i32,
}

/// Why a registry request did not get every shard's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unanswered {
    /// These shards' mailboxes were full.
    Busy(Vec<usize>),
    /// These shards did not answer within [`REPLY_DEADLINE`].
    Late(Vec<usize>),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unanswered::Busy(s) => write!(f, "shards {s:?} are busy"),
            Unanswered::Late(s) => write!(
                f,
                "shards {s:?} did not answer within {} ms",
                REPLY_DEADLINE.as_millis()
            ),
        }
    }
}

/// The admin thread's handle on every shard's mailbox.
pub struct Registry {
    shards: Vec<Mailbox>,
    pub evacuations: Arc<Evacuations>,
}

impl Registry {
    /// One mailbox per shard, woken through `wake_fds[shard]`; the inboxes
    /// go to the shards, in order.
    pub fn new(wake_fds: &[i32], evacuations: Arc<Evacuations>) -> (Registry, Vec<Inbox>) {
        let (shards, inboxes) = wake_fds
            .iter()
            .map(|&wake| {
                let (tx, rx) = mpsc::sync_channel(MAILBOX);
                let evacuations = evacuations.clone();
                (Mailbox { tx, wake }, Inbox { rx, evacuations })
            })
            .unzip();
        (
            Registry {
                shards,
                evacuations,
            },
            inboxes,
        )
    }

    /// Sends `make()` to every shard and collects their replies, in shard
    /// order.
    pub fn ask(&self, make: impl Fn() -> Command) -> Result<Vec<Reply>, Unanswered> {
        let (tx, rx) = mpsc::channel();
        let mut busy = Vec::new();
        let mut replies: Vec<Option<Reply>> = (0..self.shards.len()).map(|_| None).collect();
        let mut left = self.shards.len();
        for (i, m) in self.shards.iter().enumerate() {
            match m.tx.try_send((make(), tx.clone())) {
                Ok(()) => wake(m.wake),
                Err(TrySendError::Full(_)) => busy.push(i),
                // A shard that stopped (drained) has no session left.
                Err(TrySendError::Disconnected(_)) => {
                    replies[i] = Some(Reply {
                        shard: i,
                        ..Reply::default()
                    });
                    left -= 1;
                }
            }
        }
        drop(tx);
        if !busy.is_empty() {
            // Those that took it still act on it; their replies are dropped.
            return Err(Unanswered::Busy(busy));
        }
        let deadline = Instant::now() + REPLY_DEADLINE;
        while left > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(r) => {
                    if let Some(slot) = replies.get_mut(r.shard) {
                        if slot.replace(r).is_none() {
                            left -= 1;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        if left > 0 {
            let late = (0..replies.len())
                .filter(|&i| replies[i].is_none())
                .collect();
            return Err(Unanswered::Late(late));
        }
        Ok(replies.into_iter().flatten().collect())
    }
}

fn wake(fd: i32) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a live u64 to an eventfd the process
    // keeps open for its whole life.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

/// Merges the shards' listings: the `limit` oldest sessions first (the
/// longest-lived are what an operator looks for), then by id, and the
/// count of every match.
pub fn merge_lists(replies: Vec<Reply>, limit: usize) -> (Vec<Info>, usize) {
    let matched = replies.iter().map(|r| r.matched).sum();
    let mut all: Vec<Info> = replies.into_iter().flat_map(|r| r.sessions).collect();
    all.sort_unstable_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.id.cmp(&b.id)));
    all.truncate(limit);
    (all, matched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Kind;

    fn info(id: u64, age_ms: u64) -> Info {
        Info {
            id,
            shard: 0,
            ident: None,
            vm: None,
            phase: Kind::Relay,
            age_ms,
            since_client_ms: None,
            since_conman_ms: None,
            bytes_from_client: 0,
            bytes_from_conman: 0,
        }
    }

    #[test]
    fn the_set_changes_its_epoch_and_readers_see_it_once() {
        let e = Evacuations::default();
        let (mut seen, mut copy) = (0, Arc::new(Vec::new()));
        e.refresh(&mut seen, &mut copy);
        assert!(copy.is_empty());
        assert_eq!(e.add("vm-2"), Ok(true));
        assert_eq!(e.add("vm-1"), Ok(true));
        assert_eq!(e.add("vm-2"), Ok(false));
        e.refresh(&mut seen, &mut copy);
        assert_eq!(*copy, ["vm-1", "vm-2"]);
        let before = Arc::as_ptr(&copy);
        e.refresh(&mut seen, &mut copy);
        assert_eq!(Arc::as_ptr(&copy), before, "no change, no new copy");
        assert!(e.remove("vm-1"));
        assert!(!e.remove("vm-1"));
        e.refresh(&mut seen, &mut copy);
        assert_eq!(*copy, ["vm-2"]);
    }

    #[test]
    fn the_set_is_bounded() {
        let e = Evacuations::default();
        for i in 0..MAX_EVACUATED {
            assert_eq!(e.add(&format!("vm-{i}")), Ok(true));
        }
        assert_eq!(e.add("one-more"), Err(TooMany));
        assert_eq!(e.add("vm-0"), Ok(false), "already in: no room needed");
    }

    #[test]
    fn merged_listings_keep_the_oldest_and_count_every_match() {
        let a = Reply {
            shard: 0,
            sessions: vec![info(1, 10), info(2, 50)],
            matched: 7,
            ..Reply::default()
        };
        let b = Reply {
            shard: 1,
            sessions: vec![info(3, 30), info(4, 50)],
            matched: 2,
            ..Reply::default()
        };
        let (list, matched) = merge_lists(vec![a, b], 3);
        assert_eq!(matched, 9);
        assert_eq!(list.iter().map(|i| i.id).collect::<Vec<_>>(), [2, 4, 3]);
    }

    #[test]
    fn every_shard_answers_through_its_mailbox() {
        let fds: Vec<i32> = (0..3)
            // SAFETY: creating an eventfd; checked below.
            .map(|_| unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
            .collect();
        assert!(fds.iter().all(|&fd| fd >= 0));
        let (reg, inboxes) = Registry::new(&fds, Arc::default());
        let shards: Vec<_> = inboxes
            .into_iter()
            .enumerate()
            .map(|(i, inbox)| {
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline {
                        if let Some((Command::Close { id, .. }, reply)) = inbox.next() {
                            let closed = usize::from(id == i as u64);
                            let _ = reply.send(Reply {
                                shard: i,
                                closed,
                                ..Reply::default()
                            });
                            return;
                        }
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        let replies = reg.ask(|| Command::Close { id: 1, code: 1000 }).unwrap();
        assert_eq!(
            replies.iter().map(|r| r.closed).collect::<Vec<_>>(),
            [0, 1, 0]
        );
        for s in shards {
            s.join().unwrap();
        }
        // A shard that takes the command and never answers is named.
        let (slow, mut slow_inboxes) = Registry::new(&fds[..2], Arc::default());
        let kept = slow_inboxes.remove(1);
        let t0 = Instant::now();
        let err = std::thread::scope(|s| {
            let first = slow_inboxes.remove(0);
            s.spawn(move || loop {
                if let Some((_, reply)) = first.next() {
                    let _ = reply.send(Reply::default());
                    return;
                }
                std::thread::yield_now();
            });
            slow.ask(|| Command::Refresh).unwrap_err()
        });
        assert_eq!(err, Unanswered::Late(vec![1]));
        assert!(t0.elapsed() >= REPLY_DEADLINE);
        assert!(kept.next().is_some(), "the command waits for it");
        // Stopped shards hold no session: they count as empty answers.
        let replies = reg.ask(|| Command::Refresh).unwrap();
        assert_eq!(
            replies.iter().map(|r| r.shard).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        for fd in fds {
            // SAFETY: closing the eventfds made above.
            unsafe { libc::close(fd) };
        }
    }
}
