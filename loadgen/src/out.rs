//! Lines on stdout that another process waits for: `listening ADDR` from
//! the backends, `holding N` from an `idle` run, the JSON report.

use std::io::{self, Write};

/// Prints a line that another process is waiting for, flushed at once.
pub fn print_flushed(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
