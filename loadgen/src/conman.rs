//! `eval-loadgen conman`: the library's fake Conman as its own process.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use eval_proxy::dev::conman::{spawn, Behavior, ConmanConfig};

use crate::net::raise_nofile_limit;
use crate::out::print_flushed;

/// Serves until the process is killed.
pub fn run(listen: SocketAddr, behavior: Behavior) -> Result<()> {
    raise_nofile_limit().context("raising the open-files limit")?;
    let conman = spawn(ConmanConfig { listen, behavior })
        .with_context(|| format!("starting the fake conman on {listen}"))?;
    print_flushed(&format!("listening {}", conman.local_addr))?;
    loop {
        // Connections are served by the conman's own threads; the handle
        // must stay alive, and park() may return spuriously.
        std::thread::park();
    }
}
