//! Revocation sync with the Controlplane (Controlplane mode): the control
//! shard forwards each revocation made on this proxy's admin API
//! (`POST /v1/revocations`) within `FORWARD_CHECK`, and every
//! `controlplane.revocations_poll_ms` asks for the ones made anywhere since
//! its cursor (`GET /v1/revocations?since=CURSOR`), which it puts in force.
//! So a revocation posted to any proxy reaches every proxy of the fleet
//! within about one period (two at most, after a failed forward).
//!
//! Failures are counted (`eval_revocation_sync_failures_total{op}`) and
//! logged at most once per `log_every::EVERY`; they never touch placement:
//! the placement breaker and counters do not see these requests. A forward
//! that failed is kept and tried again next period; a poll that failed
//! keeps its cursor.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::client::Client;
use super::http;
use crate::log_every::LogEvery;
use crate::revocations::Revocations;
use crate::token::revoke::Wire;

/// How often the loop looks for a revocation made here, between polls, so
/// that it is forwarded at once rather than at the next period.
const FORWARD_CHECK: Duration = Duration::from_millis(100);

pub(crate) async fn run(client: Rc<Client>, store: Arc<Revocations>, every: Duration) {
    let mut cursor = String::new();
    let mut log = LogEvery::default();
    loop {
        let mut forwarded = forward(&client, &store, &mut log).await;
        match poll(&client, &cursor).await {
            Ok(answer) => {
                let list: Vec<_> = answer
                    .revocations
                    .into_iter()
                    .filter_map(|w| w.into_stored().ok())
                    .collect();
                if !list.is_empty() {
                    // Off the executor: a change rewrites and fsyncs
                    // token.revoked_file, and placements must not wait.
                    let s = store.clone();
                    let added = glommio::executor()
                        .spawn_blocking(move || s.add(list, false))
                        .await;
                    match added {
                        Ok(n) => debug!(added = n, "revocations from the Controlplane"),
                        Err(e) => {
                            if let Some(held_back) = log.check(Instant::now()) {
                                warn!(err = %e, held_back, "revocations from the Controlplane not all applied");
                            }
                        }
                    }
                }
                cursor = answer.cursor;
            }
            Err(why) => {
                store.poll_failures.fetch_add(1, Relaxed);
                if let Some(held_back) = log.check(Instant::now()) {
                    warn!(%why, held_back, "revocation poll of the Controlplane failed; retrying next period");
                }
            }
        }
        // Until the next poll, a new local revocation is forwarded within
        // FORWARD_CHECK; after a failed forward only the next period tries
        // again, so a Controlplane that is down is not asked ten times a
        // second.
        let next = Instant::now() + every;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            glommio::timer::sleep(left.min(FORWARD_CHECK)).await;
            if forwarded && store.has_outbox() {
                forwarded = forward(&client, &store, &mut log).await;
            }
        }
    }
}

/// Sends the revocations made here, one request each, in order; false
/// when one failed (it and those after it are kept for the next try).
async fn forward(client: &Client, store: &Revocations, log: &mut LogEvery) -> bool {
    let pending = store.take_outbox();
    for (i, r) in pending.iter().enumerate() {
        let body = serde_json::to_string(&Wire::from_revocation(r)).unwrap_or_default();
        let sent = client
            .call(|out, url, host| http::write_revocation_post(out, url, host, &body))
            .await;
        let failed = match sent {
            Ok(resp) if (200..300).contains(&resp.status) => None,
            Ok(resp) => Some(format!("status {}", resp.status)),
            Err(e) => Some(e.as_str().to_string()),
        };
        if let Some(why) = failed {
            store.forward_failures.fetch_add(1, Relaxed);
            if let Some(held_back) = log.check(Instant::now()) {
                warn!(%why, held_back, "revocation forward to the Controlplane failed; retrying next period");
            }
            store.requeue(pending[i..].to_vec());
            return false;
        }
    }
    true
}

async fn poll(client: &Client, cursor: &str) -> Result<http::RevocationsAnswer, String> {
    let resp = client
        .call(|out, url, host| http::write_revocations_poll(out, url, host, cursor))
        .await
        .map_err(|e| e.as_str().to_string())?;
    http::revocations_answer(&resp).map_err(|e| format!("status {}: {e}", resp.status))
}
