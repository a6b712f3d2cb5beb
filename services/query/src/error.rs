//! `QueryError` and its one mapping to a gRPC status (DESIGN.md, "Errors").

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub(crate) const ERROR_DOMAIN: &str = "kiroku.v1";

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
        let info = |reason: &str| ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
        let message = error.to_string();
        match error {
            QueryError::InvalidArgument { field, description } => {
                let mut details = ErrorDetails::with_bad_request_violation(field, description);
                details.set_error_info("INVALID_ARGUMENT", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            QueryError::NotFound(_) => Status::with_error_details(Code::NotFound, message, info("NOT_FOUND")),
            QueryError::ProjectionBehind(_) => {
                let mut details = info("PROJECTION_BEHIND");
                details.set_retry_info(Some(std::time::Duration::from_millis(500)));
                Status::with_error_details(Code::Unavailable, message, details)
            }
            QueryError::PositionNotFinal(_) => {
                let mut details = info("POSITION_NOT_FINAL");
                details.set_retry_info(Some(std::time::Duration::from_millis(500)));
                Status::with_error_details(Code::Unavailable, message, details)
            }
            QueryError::PositionOutOfRange { .. } => {
                Status::with_error_details(Code::OutOfRange, message, info("POSITION_OUT_OF_RANGE"))
            }
            QueryError::ConsumerTooSlow => {
                Status::with_error_details(Code::ResourceExhausted, message, info("CONSUMER_TOO_SLOW"))
            }
            QueryError::ShuttingDown => Status::with_error_details(Code::Unavailable, message, info("SHUTTING_DOWN")),
            QueryError::LimitReached(_) => {
                kiroku_platform::shed::limit_reached(message, std::time::Duration::from_secs(5))
            }
            QueryError::Unavailable => {
                let mut details = info("STORE_UNAVAILABLE");
                details.set_retry_info(Some(std::time::Duration::from_secs(1)));
                Status::with_error_details(Code::Unavailable, message, details)
            }
            QueryError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}
