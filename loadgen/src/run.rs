//! Runs a load: checks limits, starts the worker threads, shows progress,
//! prints `holding N` for `idle` and `storm`, conducts a storm (`killed
//! PID`), merges the threads' results into a report.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{Mode, RunConfig};
use crate::net::{raise_nofile_limit, RESERVED_FDS};
use crate::out::print_flushed;
use crate::report::{Report, ThreadResult};
use crate::storm::{self, Conductor, StormShared};
use crate::wire::Payloads;
use crate::worker::{Msg, Progress, Shared, Worker};

/// Runs the load and returns its report.
pub fn run(cfg: RunConfig, json: bool) -> Result<Report> {
    let limit = raise_nofile_limit().context("raising the open-files limit")?;
    if cfg.max_sockets() + RESERVED_FDS > limit {
        bail!(
            "{} connections need more than the open-files limit of {limit} \
             (keep --conns/--workers at or below {})",
            cfg.max_sockets(),
            limit.saturating_sub(RESERVED_FDS)
        );
    }
    let threads = cfg.threads;
    let mode = cfg.mode;
    let conns = cfg.conns;
    let duration = match mode {
        Mode::Idle => cfg.hold,
        _ => cfg.duration,
    };
    let mut conductor = (mode == Mode::Storm).then(|| Conductor::new(cfg.storm.clone()));
    let shared = Arc::new(Shared {
        payloads: Payloads::new(cfg.max_message()),
        barrier: Barrier::new(threads),
        progress: Progress::default(),
        epoch: Instant::now(),
        storm: StormShared::new(cfg.storm.watch_pids.clone()),
        cfg,
    });
    let clock = |shared: &Shared| shared.epoch.elapsed().as_nanos() as u64;
    // A storm's kill and end are timed from this loop.
    let tick = match mode {
        Mode::Storm => Duration::from_millis(5),
        _ => Duration::from_millis(200),
    };
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(threads);
    for index in 0..threads {
        let shared = Arc::clone(&shared);
        let tx = tx.clone();
        let handle = thread::Builder::new()
            .name(format!("load-{index}"))
            .spawn(move || {
                let result = match Worker::new(index, &shared) {
                    Ok(worker) => worker.run(&tx),
                    Err(e) => failed_thread(&shared, &e),
                };
                tx.send(Msg::Done(Box::new(result))).ok();
            })
            .context("spawning a load thread")?;
        handles.push(handle);
    }
    drop(tx);

    let bar = progress_bar(json, duration);
    let started = Instant::now();
    let mut ready = 0;
    let mut held = 0;
    let mut results = Vec::with_capacity(threads);
    while results.len() < threads {
        match rx.recv_timeout(tick) {
            Ok(Msg::Ready(n)) => {
                ready += 1;
                held += n;
                if ready == threads {
                    print_flushed(&format!("holding {held}"))?;
                    if let Some(c) = &mut conductor {
                        c.on_holding(&shared.storm, clock(&shared));
                    }
                }
            }
            Ok(Msg::Done(result)) => results.push(*result),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if let Some(c) = &mut conductor {
            match c.tick(&shared.storm, clock(&shared)) {
                Ok(Some(line)) => print_flushed(&line)?,
                Ok(None) => {}
                Err(e) => {
                    // The workers must still end, or the join waits forever.
                    shared
                        .storm
                        .stop
                        .store(true, std::sync::atomic::Ordering::Release);
                    eprintln!("eval-loadgen: {e}");
                }
            }
        }
        if let Some(bar) = &bar {
            update_bar(bar, &shared.progress, started, duration);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    for handle in handles {
        if handle.join().is_err() {
            bail!("a load thread panicked");
        }
    }
    let mut report = Report::new(mode, conns, &results);
    if shared.cfg.tls.is_none() {
        report.tls = None;
    }
    if mode == Mode::Storm {
        let recs: Vec<_> = results.iter().filter_map(|r| r.storm.as_deref()).collect();
        let storm = storm::report(&shared.cfg.storm, conns, &recs, &shared.storm);
        if storm.failed_sessions > 0 {
            report
                .errors
                .insert("session_failed".into(), storm.failed_sessions);
        }
        if storm.lost == 0 {
            // Nothing to recover from: the run proves nothing.
            report.errors.insert("no_session_lost".into(), 1);
        }
        report.storm = Some(storm);
    }
    Ok(report)
}

/// A thread that could not even start still meets the others at the
/// barrier, or they would wait for it forever.
fn failed_thread(shared: &Shared, e: &std::io::Error) -> ThreadResult {
    eprintln!("eval-loadgen: starting a load thread: {e}");
    if !matches!(shared.cfg.mode, Mode::Idle | Mode::Storm) {
        shared.barrier.wait();
    }
    ThreadResult {
        rec: Default::default(),
        errors: [("worker".to_owned(), 1)].into(),
        elapsed: Duration::ZERO,
        storm: None,
    }
}

fn progress_bar(json: bool, duration: Option<Duration>) -> Option<ProgressBar> {
    if json || !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = match duration {
        Some(d) => ProgressBar::new(d.as_millis() as u64).with_style(
            ProgressStyle::with_template("{bar:30} {elapsed}/{duration} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    };
    Some(bar)
}

fn update_bar(bar: &ProgressBar, p: &Progress, started: Instant, duration: Option<Duration>) {
    let elapsed = started.elapsed();
    if let Some(d) = duration {
        bar.set_position(elapsed.min(d).as_millis() as u64);
    } else {
        bar.tick();
    }
    let secs = elapsed.as_secs_f64().max(1e-3);
    let messages = p.messages.load(Ordering::Relaxed);
    bar.set_message(format!(
        "{} open, {messages} msgs ({:.0}/s), {} handshakes, {} errors",
        p.established.load(Ordering::Relaxed),
        messages as f64 / secs,
        p.handshakes.load(Ordering::Relaxed),
        p.errors.load(Ordering::Relaxed),
    ));
}
