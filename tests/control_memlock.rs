//! glommio refuses to start below 512 KiB of RLIMIT_MEMLOCK; `spawn` raises
//! the soft limit itself. Its own test binary: the limit is per process.

mod control_support;

use control_support::*;
use eval_proxy::control::{ControlConfig, PlacementMode};

fn memlock() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) },
        0
    );
    lim
}

#[test]
fn spawn_raises_a_low_memlock_soft_limit() {
    let before = memlock();
    assert!(
        before.rlim_max >= 512 * 1024,
        "this test lowers only the soft limit; the hard limit here is {} bytes",
        before.rlim_max
    );
    let low = libc::rlimit {
        rlim_cur: 64 * 1024,
        rlim_max: before.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &low) }, 0);
    let cfg = ControlConfig {
        mode: PlacementMode::Static {
            vms: conmans(2),
            repls: vec![],
        },
        admission: Default::default(),
    };
    let mut c = start(cfg, 1);
    assert_eq!(memlock().rlim_cur, 512 * 1024);
    c.shards[0].found("r", 0, &[]);
}
