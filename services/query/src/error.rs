//! `QueryError` and its one mapping to a gRPC status (DESIGN.md, "Errors").

use std::time::Duration;

use kiroku_platform::status::{self, reason};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{field}: {description}")]
    InvalidArgument { field: &'static str, description: String },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("the read model has not reached position {0} yet")]
    ProjectionBehind(u64),
    #[error("position {requested} is above the head of the log ({head})")]
    PositionOutOfRange { requested: u64, head: u64 },
    /// Below the head, but not final yet: a transaction still open (anywhere in the cluster) may commit an event
    /// below it, so an answer now could differ from the same question asked later.
    #[error("position {0} is not final yet (an open transaction may still commit below it); retry")]
    PositionNotFinal(u64),
    #[error("the subscriber fell too far behind; resume with after_position")]
    ConsumerTooSlow,
    #[error("the server is shutting down; resume with after_position")]
    ShuttingDown,
    /// Past a cap (open streams): retry later.
    #[error("{0}: limit reached; retry later")]
    LimitReached(&'static str),
    /// The database is unreachable or restarting: retry.
    #[error("the database is unavailable; retry")]
    Unavailable,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl QueryError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        QueryError::InvalidArgument { field, description: description.into() }
    }
}

impl From<sqlx::Error> for QueryError {
    fn from(error: sqlx::Error) -> Self {
        if kiroku_event_store::is_transient(&error) {
            tracing::warn!(%error, "the database is unavailable");
            return QueryError::Unavailable;
        }
        QueryError::Internal(error.into())
    }
}

impl From<kiroku_event_store::StoreError> for QueryError {
    fn from(error: kiroku_event_store::StoreError) -> Self {
        match error {
            kiroku_event_store::StoreError::Database(error) => error.into(),
            corrupt => QueryError::Internal(corrupt.into()),
        }
    }
}

impl From<kiroku_vault::VaultError> for QueryError {
    fn from(error: kiroku_vault::VaultError) -> Self {
        match error {
            kiroku_vault::VaultError::Store(error) => error.into(),
            other => QueryError::Internal(other.into()),
        }
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Status {
        let message = error.to_string();
        let refusal = |code, reason| status::refusal(code, reason, message.clone());
        match error {
            QueryError::InvalidArgument { field, description } => {
                refusal(Code::InvalidArgument, reason::INVALID_ARGUMENT).violation(field, description)
            }
            QueryError::NotFound(_) => refusal(Code::NotFound, reason::NOT_FOUND),
            QueryError::ProjectionBehind(_) => {
                refusal(Code::Unavailable, reason::PROJECTION_BEHIND).retry_after(Duration::from_millis(500))
            }
            QueryError::PositionNotFinal(_) => {
                refusal(Code::Unavailable, reason::POSITION_NOT_FINAL).retry_after(Duration::from_millis(500))
            }
            QueryError::PositionOutOfRange { .. } => refusal(Code::OutOfRange, reason::POSITION_OUT_OF_RANGE),
            QueryError::ConsumerTooSlow => refusal(Code::ResourceExhausted, reason::CONSUMER_TOO_SLOW),
            QueryError::ShuttingDown => refusal(Code::Unavailable, reason::SHUTTING_DOWN),
            QueryError::LimitReached(_) => {
                refusal(Code::ResourceExhausted, reason::LIMIT_REACHED).retry_after(Duration::from_secs(5))
            }
            QueryError::Unavailable => {
                refusal(Code::Unavailable, reason::STORE_UNAVAILABLE).retry_after(Duration::from_secs(1))
            }
            QueryError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error");
                return Status::internal("internal error");
            }
        }
        .into()
    }
}
