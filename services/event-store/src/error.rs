//! The event store's errors, decided by SQLSTATE and constraint name, never by message text.

use uuid::Uuid;

use crate::append::ExpectedVersion;

/// Why an append wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The aggregate was not at the expected version: another writer got there first.
    #[error("aggregate {aggregate_id} is not at version {expected}")]
    Conflict {
        aggregate_id: Uuid,
        expected: ExpectedVersion,
        /// The version found, when the store saw it (a concurrent append may not be visible yet).
        actual: Option<u32>,
    },
    /// A unique key is already held by another aggregate.
    #[error("{kind} is already claimed by {owner}")]
    ClaimRefused { kind: String, value: String, owner: Uuid },
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
