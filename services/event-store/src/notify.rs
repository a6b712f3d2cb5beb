//! Announcing commits on `LISTEN kiroku_events`, coalesced, after the appending transaction.
//!
//! NOTIFY inside the appending transaction would be simpler, but PostgreSQL serialises every committing
//! transaction that has notified (a database-wide lock held through the commit and its WAL flush): measured
//! here, it cut 16-writer append throughput by 40 %. So appends only wake a background task, which sends one
//! `pg_notify` for however many commits happened while its previous one was in flight. A crash between a
//! commit and its announcement delays followers until their next poll; it loses nothing.

use std::sync::{Arc, OnceLock, Weak};

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::EVENTS_CHANNEL;

#[derive(Debug, Default)]
pub(crate) struct CommitAnnouncer {
    wake: Notify,
    started: OnceLock<()>,
}

impl CommitAnnouncer {
    /// Asks for an announcement soon; never waits.
    pub(crate) fn committed(self: &Arc<Self>, pool: &PgPool) {
        self.started.get_or_init(|| {
            tokio::spawn(announce(Arc::downgrade(self), pool.clone()));
        });
        self.wake.notify_one();
    }
}

async fn announce(announcer: Weak<CommitAnnouncer>, pool: PgPool) {
    loop {
        let Some(strong) = announcer.upgrade() else { return };
        // Wake up at least every few seconds, so that the task ends soon after the last store handle.
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), strong.wake.notified()).await;
        drop(strong);
        if woken.is_err() {
            continue;
        }
        if pool.is_closed() {
            return;
        }
        if let Err(error) = sqlx::query("SELECT pg_notify($1, '')").bind(EVENTS_CHANNEL).execute(&pool).await {
            tracing::debug!(%error, "could not announce a commit; followers will poll");
        }
    }
}
