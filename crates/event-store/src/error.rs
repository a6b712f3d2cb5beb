//! The event store's errors, decided by SQLSTATE and constraint name, never by message text.

use uuid::Uuid;

use crate::types::{ExpectedVersion, Position, Version};

/// Why an append wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The aggregate was not at the expected version: another writer got there first.
    #[error("aggregate {aggregate_id} is not at version {expected}")]
    Conflict {
        aggregate_id: Uuid,
        expected: ExpectedVersion,
        /// The version found, when the store saw it (a concurrent append may not be visible yet).
        actual: Option<Version>,
    },
    /// A unique key is already held by another aggregate.
    #[error("{kind} is already claimed by {owner}")]
    ClaimRefused { kind: String, value: String, owner: Uuid },
    /// The next position would not be above the highest one in the log (a log restored into another cluster, an
    /// asynchronous replica promoted, `synchronous_commit = off` and a crash): new events would get positions that
    /// readers have already passed, and would never be delivered. Nothing is appended until an operator moves
    /// the cluster's transaction ids past the head (ARCHITECTURE.md, "When positions would go backwards").
    #[error(
        "refusing to append: the next position ({next}) is not above the head of the log ({head}); the cluster's \
         transaction ids are behind the log (see ARCHITECTURE.md, \"When positions would go backwards\")"
    )]
    PositionsBehind { head: Position, next: Position },
    /// The append itself is malformed (no events, too many events): a bug in the caller.
    #[error("invalid append: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A failure of the store itself (connection lost, timeout, an unexpected constraint).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

impl StoreError {
    /// True when the same call may well succeed if retried later: the database was unreachable, restarting,
    /// out of connections or resources, or the transaction lost a race (see [`is_transient`]). Callers answer
    /// these as "unavailable, retry", never as a bug.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(error) => is_transient(error),
            StoreError::Corrupt { .. } => false,
        }
    }
}

impl AppendError {
    /// See [`StoreError::is_transient`].
    pub fn is_transient(&self) -> bool {
        matches!(self, AppendError::Store(error) if error.is_transient())
    }
}

/// A database error that is about the database's state, not about the statement: a lost or refused connection,
/// a server short of resources or shutting down, a cancelled statement, a serialization failure or deadlock, a
/// lock not available; or the pool's own timeout.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || code.starts_with("53") // insufficient resources (too many connections, disk full, …)
                || code.starts_with("57") // operator intervention: query cancelled, admin shutdown, starting up
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock
                || code == "55P03" // lock not available
        }),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

impl From<sqlx::Error> for AppendError {
    fn from(error: sqlx::Error) -> Self {
        AppendError::Store(StoreError::Database(error))
    }
}

/// SQLSTATE 23505 on the named constraint.
pub(crate) fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().as_deref() == Some("23505") && db.constraint() == Some(constraint),
        _ => false,
    }
}
