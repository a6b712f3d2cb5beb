//! Idempotency records are kept 48 hours, then pruned: by age, a thousand per short statement, until none older
//! is left, every minute (and at start-up). On a schedule of its own, whatever the write rate: it used to ride on
//! the relay, which pruned ten thousand a minute at most and none while it had a backlog, so that a busy log grew
//! its records without bound. One command process prunes at a time (the event store's leader lock
//! `prune:idempotency`, taken for each round); the others skip the round.

use std::time::Duration;

use kiroku_event_store::EventStore;
use kiroku_platform::Shutdown;

/// How long an answer is kept for a retry (AIP-155 asks for at least a day).
pub(crate) const RETENTION: Duration = Duration::from_secs(48 * 3600);
/// How often a round starts.
const EVERY: Duration = Duration::from_secs(60);
/// Records per statement: each is a short transaction of its own.
const BATCH: i64 = 1000;

/// Prunes every [`EVERY`] until shutdown.
pub(crate) async fn prune_idempotency_records(store: EventStore, shutdown: Shutdown) {
    loop {
        match prune_once(&store, &shutdown).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned old idempotency records"),
            Err(error) => tracing::warn!(error = format!("{error:#}"), "could not prune idempotency records"),
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One round: everything older than [`RETENTION`], unless another process holds the round.
async fn prune_once(store: &EventStore, shutdown: &Shutdown) -> anyhow::Result<u64> {
    let mut lock = store.leader_lock("prune:idempotency").await?;
    if !lock.try_acquire().await? {
        return Ok(0);
    }
    let mut pruned = 0;
    let outcome = loop {
        match store.prune_idempotency_records(RETENTION, BATCH).await {
            Ok(deleted) => {
                pruned += deleted;
                if deleted < BATCH as u64 || shutdown.is_triggered() {
                    break Ok(pruned);
                }
            }
            Err(error) => break Err(error.into()),
        }
        // A moment between statements, so that a long round never crowds out the appends.
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    lock.release().await;
    outcome
}
