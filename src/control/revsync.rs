//! Revocation sync with the Controlplane (Controlplane mode): every
//! `controlplane.revocations_poll_ms` the control shard forwards the
//! revocations made on this proxy's admin API (`POST /v1/revocations`, one
//! each) and asks for the ones made anywhere since its cursor
//! (`GET /v1/revocations?since=CURSOR`), which it puts in force. So a
//! revocation posted to any proxy reaches every proxy of the fleet within
//! about two periods.
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

pub(crate) async fn run(client: Rc<Client>, store: Arc<Revocations>, every: Duration) {
    let mut cursor = String::new();
    let mut log = LogEvery::default();
    loop {
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
                break;
            }
        }
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
        glommio::timer::sleep(every).await;
    }
}

async fn poll(client: &Client, cursor: &str) -> Result<http::RevocationsAnswer, String> {
    let resp = client
        .call(|out, url, host| http::write_revocations_poll(out, url, host, cursor))
        .await
        .map_err(|e| e.as_str().to_string())?;
    http::revocations_answer(&resp).map_err(|e| format!("status {}: {e}", resp.status))
}
