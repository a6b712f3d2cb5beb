//! `CommandError`: every way a command can fail, and its one mapping to a gRPC status (DESIGN.md, "Errors").

use std::time::Duration;

use kiroku_domain::{UserError, UserId, UserStatus};
use kiroku_event_store::{AppendError, StoreError};
use kiroku_platform::status::{self, reason};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{field}: {description}")]
    InvalidArgument { field: &'static str, description: String },
    /// The request id was used before, by the same caller, for a request that asked something else.
    #[error("request_id: this request id was used for another request; use a new one for each request")]
    RequestIdReused,
    #[error("the token has expired")]
    TokenExpired,
    #[error("the token is invalid")]
    TokenInvalid,
    #[error("the identity provider's keys cannot be fetched")]
    JwksUnavailable,
    #[error("the token's subject is not a GitHub identity")]
    NotAGitHubIdentity,
    #[error("the GitHub account does not exist")]
    GitHubAccountNotFound,
    #[error("GitHub is unavailable")]
    GitHubUnavailable { retry_after: Duration },
    #[error("a user with this identity already exists")]
    UserAlreadyExists { user_id: UserId },
    #[error("the user is at version {actual}, not {expected}")]
    VersionConflict { expected: u64, actual: u64 },
    #[error("no user is registered for this identity")]
    UserNotFound,
    /// The database is unreachable or restarting, or the call lost a race it may win on a retry (with the same
    /// request id).
    #[error("the event store is unavailable; retry")]
    StoreUnavailable,
    /// The event store refuses appends: its next positions would go backwards (an operator must act).
    #[error("the event store refuses appends until an operator repairs it")]
    StoreFenced,
    /// An erasure committed, but its line in the erasure ledger could not be written: a retry (with the same
    /// request id) writes it.
    #[error("the erasure is recorded, but not yet in the erasure ledger; retry with the same request id")]
    LedgerUnavailable,
    /// Past a limit (refused registrations of one subject): retry after a while.
    #[error("too many attempts; retry later")]
    LimitReached { retry_after: Duration },
    /// The domain refused the command.
    #[error(transparent)]
    Refused(#[from] UserError),
    /// Anything unexpected: logged once where it is turned into a status, opaque to the client.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<CommandError> for Status {
    fn from(error: CommandError) -> Status {
        let message = error.to_string();
        let refusal = |code, reason| status::refusal(code, reason, message.clone());
        match error {
            CommandError::InvalidArgument { field, description } => {
                refusal(Code::InvalidArgument, reason::INVALID_ARGUMENT).violation(field, description)
            }
            CommandError::RequestIdReused => refusal(Code::InvalidArgument, reason::REQUEST_ID_REUSED)
                .violation("request_id", "was used for another request (of the same RPC and caller)"),
            CommandError::TokenExpired => refusal(Code::Unauthenticated, reason::TOKEN_EXPIRED),
            CommandError::TokenInvalid => refusal(Code::Unauthenticated, reason::TOKEN_INVALID),
            CommandError::JwksUnavailable => {
                refusal(Code::Unavailable, reason::JWKS_UNAVAILABLE).retry_after(Duration::from_secs(10))
            }
            CommandError::NotAGitHubIdentity => refusal(Code::FailedPrecondition, reason::NOT_A_GITHUB_IDENTITY),
            CommandError::GitHubAccountNotFound => refusal(Code::FailedPrecondition, reason::GITHUB_ACCOUNT_NOT_FOUND),
            CommandError::GitHubUnavailable { retry_after } => {
                refusal(Code::Unavailable, reason::GITHUB_UNAVAILABLE).retry_after(retry_after)
            }
            CommandError::UserAlreadyExists { user_id } => {
                refusal(Code::AlreadyExists, reason::USER_ALREADY_EXISTS).with("user_id", user_id)
            }
            CommandError::VersionConflict { expected, actual } => refusal(Code::Aborted, reason::VERSION_CONFLICT)
                .with("expected_version", expected)
                .with("actual_version", actual),
            CommandError::UserNotFound | CommandError::Refused(UserError::NotRegistered) => {
                refusal(Code::NotFound, reason::USER_NOT_FOUND)
            }
            // GitHub answered for the account, but with a profile kiroku cannot record: nothing the caller can
            // fix by retrying.
            CommandError::Refused(UserError::MissingLogin | UserError::InvalidLogin) => {
                refusal(Code::FailedPrecondition, reason::GITHUB_PROFILE_INVALID)
            }
            CommandError::Refused(UserError::ProfileMismatch { .. }) => {
                refusal(Code::FailedPrecondition, reason::GITHUB_PROFILE_MISMATCH)
            }
            CommandError::Refused(UserError::Deactivated) => {
                refusal(Code::FailedPrecondition, reason::USER_DEACTIVATED)
            }
            CommandError::Refused(UserError::Erased) => refusal(Code::FailedPrecondition, reason::USER_ERASED),
            CommandError::Refused(UserError::InvalidState { .. }) => {
                refusal(Code::FailedPrecondition, reason::INVALID_USER_STATE)
            }
            // An active user whose data does not open: the store and its keys disagree, a bug or tampering.
            CommandError::Refused(refusal @ UserError::PersonalDataUnavailable) => {
                return CommandError::Internal(refusal.into()).into();
            }
            CommandError::Refused(UserError::AlreadyRegistered) => {
                refusal(Code::AlreadyExists, reason::USER_ALREADY_EXISTS)
            }
            CommandError::StoreUnavailable => {
                refusal(Code::Unavailable, reason::STORE_UNAVAILABLE).retry_after(Duration::from_secs(1))
            }
            CommandError::LedgerUnavailable => {
                refusal(Code::Unavailable, reason::ERASURE_LEDGER_UNAVAILABLE).retry_after(Duration::from_secs(1))
            }
            CommandError::LimitReached { retry_after } => {
                refusal(Code::ResourceExhausted, reason::LIMIT_REACHED).retry_after(retry_after)
            }
            CommandError::StoreFenced => {
                refusal(Code::Unavailable, reason::STORE_FENCED).retry_after(Duration::from_secs(60))
            }
            CommandError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error");
                return Status::internal("internal error");
            }
        }
        .into()
    }
}

/// A refusal that kiroku decided from its own log, which a retry of the same request would meet again: stored as
/// the request's answer, like a success (AIP-155). Outages, limits and GitHub's answers are not: a retry may fare
/// better.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub(crate) enum FinalRefusal {
    UserNotFound,
    Deactivated,
    Erased,
    InvalidState { status: String, action: String },
    VersionConflict { expected: u64, actual: u64 },
}

impl CommandError {
    /// A failure of kiroku's own (its database, a bug), which costs the caller nothing of its per-subject budget.
    pub(crate) fn is_kirokus_own(&self) -> bool {
        matches!(
            self,
            CommandError::StoreUnavailable
                | CommandError::StoreFenced
                | CommandError::LedgerUnavailable
                | CommandError::Internal(_)
        )
    }

    /// The refusal to store for this error, if it is final. A version conflict is final only when the caller
    /// named the version (`explicit_version`): one met while expecting "any" version lost a race, and a retry
    /// reads the version again.
    pub(crate) fn final_refusal(&self, explicit_version: bool) -> Option<FinalRefusal> {
        Some(match self {
            CommandError::UserNotFound | CommandError::Refused(UserError::NotRegistered) => FinalRefusal::UserNotFound,
            CommandError::Refused(UserError::Deactivated) => FinalRefusal::Deactivated,
            CommandError::Refused(UserError::Erased) => FinalRefusal::Erased,
            CommandError::Refused(UserError::InvalidState { status, action }) => {
                FinalRefusal::InvalidState { status: status.as_str().to_owned(), action: (*action).to_owned() }
            }
            CommandError::VersionConflict { expected, actual } if explicit_version => {
                FinalRefusal::VersionConflict { expected: *expected, actual: *actual }
            }
            _ => return None,
        })
    }
}

impl From<FinalRefusal> for CommandError {
    fn from(refusal: FinalRefusal) -> Self {
        match refusal {
            FinalRefusal::UserNotFound => CommandError::UserNotFound,
            FinalRefusal::Deactivated => CommandError::Refused(UserError::Deactivated),
            FinalRefusal::Erased => CommandError::Refused(UserError::Erased),
            FinalRefusal::InvalidState { status, action } => {
                match (UserStatus::parse(&status), UserError::transition_name(&action)) {
                    (Some(status), Some(action)) => CommandError::Refused(UserError::InvalidState { status, action }),
                    _ => CommandError::Internal(anyhow::anyhow!(
                        "a stored refusal names an unknown status {status:?} or action {action:?}"
                    )),
                }
            }
            FinalRefusal::VersionConflict { expected, actual } => CommandError::VersionConflict { expected, actual },
        }
    }
}

impl From<StoreError> for CommandError {
    fn from(error: StoreError) -> Self {
        if error.is_transient() {
            tracing::warn!(%error, "the event store is unavailable");
            return CommandError::StoreUnavailable;
        }
        CommandError::Internal(error.into())
    }
}

/// Appends that fail for a reason of their own (a conflict, a refused claim) are handled by each use case first;
/// what is left is the store's state.
impl From<AppendError> for CommandError {
    fn from(error: AppendError) -> Self {
        match error {
            AppendError::Store(error) => error.into(),
            AppendError::PositionsBehind { .. } => {
                tracing::error!(%error, "appends refused");
                CommandError::StoreFenced
            }
            other => CommandError::Internal(other.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn a_duplicate_names_the_existing_user_in_its_error_info() {
        let user_id = UserId::generate();
        let status = Status::from(CommandError::UserAlreadyExists { user_id });
        assert_eq!(status.code(), Code::AlreadyExists);
        let info = status.get_details_error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("USER_ALREADY_EXISTS", "kiroku.v1"));
        assert_eq!(info.metadata["user_id"], user_id.to_string());
    }

    #[test]
    fn domain_refusals_are_client_errors_not_internal_ones() {
        let mismatch = Status::from(CommandError::Refused(UserError::ProfileMismatch {
            subject: kiroku_domain::GitHubId::new(1),
            profile: kiroku_domain::GitHubId::new(2),
        }));
        assert_eq!(mismatch.code(), Code::FailedPrecondition);
        assert_eq!(mismatch.get_details_error_info().unwrap().reason, "GITHUB_PROFILE_MISMATCH");
        let missing = Status::from(CommandError::Refused(UserError::MissingLogin));
        assert_eq!(missing.code(), Code::FailedPrecondition);
        assert_eq!(Status::from(CommandError::Refused(UserError::NotRegistered)).code(), Code::NotFound);
        assert_eq!(Status::from(CommandError::Refused(UserError::AlreadyRegistered)).code(), Code::AlreadyExists);
        let refusals = [
            (UserError::Deactivated, "USER_DEACTIVATED"),
            (UserError::Erased, "USER_ERASED"),
            (
                UserError::InvalidState { status: kiroku_domain::UserStatus::Active, action: "reactivated" },
                "INVALID_USER_STATE",
            ),
        ];
        for (refusal, reason) in refusals {
            let status = Status::from(CommandError::Refused(refusal));
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert_eq!(status.get_details_error_info().unwrap().reason, reason);
        }
    }

    #[test]
    fn internal_errors_are_opaque() {
        let status = Status::from(CommandError::Internal(anyhow::anyhow!("password=hunter2 at db")));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
    }
}
