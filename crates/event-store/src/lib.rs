//! kiroku's event store: the only crate that knows the SQL of the log.
//!
//! - [`EventStore::append`] writes events to one aggregate at an expected version, together with the uniqueness
//!   claims and the idempotency record that guard them, in one short transaction with no network call inside.
//! - [`EventStore::read_stream`] reads one aggregate in version order; [`EventStore::read_batch`] reads the
//!   whole log by global [`Position`], never past a position below which something could still commit, and a
//!   [`Follower`] follows it as it grows (the one follow loop of kiroku).
//! - Named checkpoints, the head, the lag of a follower, and the leader lock of followers that must be alone.
//!
//! The invariant this crate owns: a reader that follows the log from any position sees every committed event
//! exactly once, in one stable order, whatever the concurrency of writers (see ARCHITECTURE.md). No other crate
//! writes SQL against `events`; the pool stays inside.

mod append;
mod checkpoint;
mod error;
mod follow;
mod keys;
mod leader;
mod migrate;
mod notify;
mod read;
mod types;

pub use append::append_in_transaction;
pub use error::{AppendError, StoreError, is_transient};
pub use follow::Follower;
pub use keys::{ClearClaims, ClearDuplicate};
pub use leader::LeaderLock;
pub use migrate::{DEFAULT_ROLE_PREFIX, migrate, migrate_with_roles};
pub use read::{AUDIT_AGGREGATE_TYPE, Batch, LAG_COUNT_LIMIT, Lag, LogFilter};
pub use types::{
    Append, AppendOutcome, Appended, CallerRef, Claim, Erasure, EventMetadata, ExpectedVersion, IdempotencyKey,
    IdempotencyRecord, NewEvent, NotAVersion, Position, RecordedEvent, StoredKey, StoredOutcome, Version,
    VersionOutOfRange, WrappedKey,
};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sqlx::PgPool;

use crate::notify::CommitAnnouncer;

/// The channel on which appends are announced after they commit (coalesced; see `notify.rs`).
pub const EVENTS_CHANNEL: &str = "kiroku_events";

/// The most events one append may write: the position reserves 16 bits for the index in the transaction.
pub const MAX_EVENTS_PER_APPEND: usize = 1 << 16;

/// A handle on the event store; cheap to clone.
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
    announcer: Arc<CommitAnnouncer>,
    /// The next position was found above the head (see `EventStore::check_positions_ahead`).
    positions_ahead: Arc<AtomicBool>,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool, announcer: Arc::default(), positions_ahead: Arc::default() }
    }

    /// Wakes followers listening on [`EVENTS_CHANNEL`] (soon, and coalesced with other commits).
    pub fn announce_commit(&self) {
        self.announcer.committed(&self.pool);
    }
}

/// The help text of the event store's metrics (recorded by [`EventStore::append`]).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!("kiroku_event_store_appends_total", "appends, by outcome (appended, replayed, conflict, …)");
    describe_counter!("kiroku_event_store_events_appended_total", "events committed by appends");
    describe_histogram!(
        "kiroku_event_store_append_seconds",
        Unit::Seconds,
        "time of an append, from the call to its commit (or refusal)"
    );
    metrics::counter!("kiroku_event_store_events_appended_total").increment(0);
}
