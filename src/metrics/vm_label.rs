//! The `vm` label of `eval_conman_attempt_failures_total`, bounded.
//!
//! Every label value is a series Prometheus keeps, so the set must not grow
//! with whatever a peer names. Static placement names its VMs in the config:
//! their count is the bound, and each keeps its own id. A Controlplane can
//! name any VM of the fleet; the first [`MAX_CONTROLPLANE_VMS`] distinct ones
//! that fail an attempt keep their id for the life of the process (so a
//! counter never moves from one series to another), and later ones share
//! [`OTHER`]. The table is process-wide, not per shard, so that one VM has
//! one label whichever shard saw it fail; it is only taken when an attempt
//! fails, next to the shard's own rare-event lock.

use std::sync::{Arc, Mutex};

use crate::config::{Config, PlacementSource};

/// Distinct Controlplane VM ids labelled one by one; with the stages and
/// reasons of a Conman attempt (2 × about 8) this bounds the series to
/// about a thousand.
pub const MAX_CONTROLPLANE_VMS: usize = 64;

/// The label of every Controlplane VM past the first [`MAX_CONTROLPLANE_VMS`].
pub const OTHER: &str = "other";

/// The label of an attempt that failed before a VM was chosen.
pub const UNKNOWN: &str = "unknown";

/// First-come table of labelled VM ids, at most `cap` of them.
#[derive(Debug)]
pub struct VmLabels {
    cap: usize,
    seen: Mutex<Vec<Arc<str>>>,
}

impl VmLabels {
    pub const fn new(cap: usize) -> Self {
        VmLabels {
            cap,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// `vm`'s label: its own id if it already has one or there is room for
    /// it, else [`OTHER`].
    pub fn label(&self, vm: &str) -> Arc<str> {
        // A panic while holding it leaves at worst a shorter table.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = seen.iter().find(|l| &***l == vm) {
            return l.clone();
        }
        if seen.len() < self.cap {
            let l: Arc<str> = Arc::from(vm);
            seen.push(l.clone());
            return l;
        }
        Arc::from(OTHER)
    }
}

static CONTROLPLANE_VMS: VmLabels = VmLabels::new(MAX_CONTROLPLANE_VMS);

/// The `vm` label for a failed attempt on `vm` under this config.
pub fn for_attempt(cfg: &Config, vm: Option<&str>) -> Arc<str> {
    match (vm, cfg.placement.mode) {
        (None, _) => Arc::from(UNKNOWN),
        // Only the config's VMs can be placed on: already bounded.
        (Some(vm), PlacementSource::Static) => Arc::from(vm),
        (Some(vm), PlacementSource::Controlplane) => CONTROLPLANE_VMS.label(vm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_keep_their_id_and_the_rest_share_other() {
        let t = VmLabels::new(2);
        assert_eq!(&*t.label("a"), "a");
        assert_eq!(&*t.label("b"), "b");
        assert_eq!(&*t.label("c"), OTHER);
        // A VM that had a label keeps it after the table is full.
        assert_eq!(&*t.label("a"), "a");
        assert_eq!(&*t.label("d"), OTHER);
    }

    #[test]
    fn static_vms_are_never_capped() {
        let cfg = Config::default();
        assert_eq!(cfg.placement.mode, PlacementSource::Static);
        for i in 0..(MAX_CONTROLPLANE_VMS + 5) {
            let vm = format!("vm-{i}");
            assert_eq!(&*for_attempt(&cfg, Some(&vm)), vm);
        }
        assert_eq!(&*for_attempt(&cfg, None), UNKNOWN);
    }
}
