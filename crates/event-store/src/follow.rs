//! Following the log: the one loop that reads the log in position order as it grows, for the relay, the
//! WatchEvents pump, and anyone else who needs every event exactly once.
//!
//! A [`Follower`] reads batches below the horizon (see [`EventStore::read_batch`]); when a read comes back short it
//! is caught up, and the next call waits for a commit announcement on [`EVENTS_CHANNEL`](crate::EVENTS_CHANNEL)
//! (sent after commit, coalesced; see `notify.rs`) or for the poll interval, whichever comes first. The poll covers
//! lost announcements, a lost listener connection, and the horizon moving without any commit of ours (another
//! database's transaction ending). Nothing is ever skipped: the follower's position only moves to what a read
//! covered.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::error::StoreError;
use crate::read::Batch;
use crate::types::Position;
use crate::{EVENTS_CHANNEL, EventStore};

/// A reader that follows the log from a position; see the module documentation.
pub struct Follower {
    store: EventStore,
    /// `None` when LISTEN could not be set up: the follower then polls only.
    listener: Option<PgListener>,
    after: Position,
    batch_size: u32,
    poll_interval: Duration,
    /// The last read came back short: wait before reading again.
    caught_up: bool,
}

impl EventStore {
    /// A follower of the log after `after`, reading `batch_size` events at a time and polling every
    /// `poll_interval` when no commit is announced.
    pub async fn follow(&self, after: Position, batch_size: u32, poll_interval: Duration) -> Follower {
        let listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut listener) => match listener.listen(EVENTS_CHANNEL).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::debug!(%error, "cannot LISTEN for commits; polling only");
                    None
                }
            },
            Err(error) => {
                tracing::debug!(%error, "cannot LISTEN for commits; polling only");
                None
            }
        };
        Follower {
            store: self.clone(),
            listener,
            after,
            batch_size: batch_size.max(1),
            poll_interval,
            caught_up: false,
        }
    }
}

impl Follower {
    /// The next batch after the follower's position; when the previous one reached the end of what is final,
    /// first waits for a commit announcement or the poll interval. The batch may be empty (nothing new became
    /// final); its `through` may still have moved with the horizon. Cancel-safe: the position moves only when a
    /// batch is returned.
    pub async fn next(&mut self) -> Result<Batch, StoreError> {
        if self.caught_up {
            self.wait().await;
        }
        let batch = self.store.read_batch(self.after, self.batch_size).await?;
        self.caught_up = !batch.full;
        self.after = batch.through;
        Ok(batch)
    }

    /// Everything at or below it has been returned by [`Follower::next`].
    pub fn position(&self) -> Position {
        self.after
    }

    async fn wait(&mut self) {
        let poll = tokio::time::sleep(self.poll_interval);
        tokio::pin!(poll);
        if let Some(listener) = &mut self.listener {
            tokio::select! {
                notification = listener.recv() => match notification {
                    Ok(_) => return,
                    // A lost connection reconnects on the next recv; meanwhile the poll covers what it missed.
                    Err(error) => tracing::debug!(%error, "commit listener interrupted"),
                },
                () = &mut poll => return,
            }
        }
        poll.await;
    }
}
