//! The session registry on a shard: commands from the admin API, looked at
//! when the shard's wake-up eventfd fires (`control::registry`). The shard
//! walks its sessions and performs; what matches, what is listed and what
//! a close sends are the sessions' own decisions (`session::registry`).

use std::cmp::Reverse;

use super::{Planned, Shard};
use crate::control::drain;
use crate::control::registry::{Command, Reply};
use crate::session::registry::OnVm;

impl Shard {
    /// Picks up the evacuated set, then answers every command waiting.
    pub(super) fn on_commands(&mut self) {
        self.inbox
            .refresh(&mut self.evacuated_seen, &mut self.io.evacuated);
        while let Some((cmd, reply)) = self.inbox.next() {
            let mut r = Reply {
                shard: self.io.shard,
                ..Reply::default()
            };
            match cmd {
                Command::List { filter, limit } => {
                    for e in self.sessions.iter().flatten() {
                        if e.s.matches(&filter) {
                            r.matched += 1;
                            if r.sessions.len() < limit {
                                r.sessions.push(e.s.info(self.io.shard, self.io.now));
                            }
                        }
                    }
                }
                Command::Close { id, code } => {
                    let slot = self
                        .sessions
                        .iter()
                        .position(|e| e.as_ref().is_some_and(|e| e.s.id == id));
                    if let Some(slot) = slot {
                        r.closed = 1;
                        self.drive(slot as u32, |s, env, _| s.handle_admin_close(env, code));
                    }
                }
                Command::Evacuate { vm, spread } => {
                    let (closed, moved) = self.evacuate(&vm, spread);
                    r.closed = closed;
                    r.moved = moved;
                }
                Command::Refresh => {}
            }
            // The admin thread may have given up waiting: nothing to do.
            let _ = reply.send(r);
        }
    }

    /// Plans the closes of the sessions relaying to `vm`, idle first and
    /// spread over `spread` (the drain's planner), and moves the setup
    /// attempts on it to other VMs now. Returns both counts.
    fn evacuate(&mut self, vm: &str, spread: std::time::Duration) -> (usize, usize) {
        let only = [vm.to_owned()];
        let mut open = Vec::new();
        let mut setup = Vec::new();
        for (slot, e) in self.sessions.iter().enumerate() {
            let Some(e) = e else { continue };
            match e.s.on_vm(&only) {
                Some(OnVm::Relay) => open.push(drain::Open {
                    key: (slot as u32, e.gen),
                    idle_since: e.s.idle_since(),
                }),
                Some(OnVm::Setup) => setup.push(slot as u32),
                None => {}
            }
        }
        let evacuated = self.io.evacuated.clone();
        for &slot in &setup {
            self.drive(slot, |s, env, _| s.handle_evacuate(env, &evacuated, 0));
        }
        let planned = open.len();
        for c in drain::plan_closes(self.io.now, spread, open, &mut self.io.rng) {
            let (slot, gen) = c.key;
            self.closes.push(Reverse((
                c.at,
                slot,
                gen,
                c.retry_after_ms,
                Planned::Evacuate,
            )));
        }
        tracing::info!(
            shard = self.io.shard,
            vm,
            closing = planned,
            moved = setup.len(),
            spread_ms = spread.as_millis() as u64,
            "evacuating"
        );
        (planned, setup.len())
    }
}
