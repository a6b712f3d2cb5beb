//! The one way kiroku builds a refusal: a gRPC code, a message, and the `google.rpc` details clients act on — an
//! ErrorInfo whose reason (below) and domain are part of the contract, and where it helps a BadRequest violation
//! or a RetryInfo (DESIGN.md, "Errors").

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The ErrorInfo domain of every kiroku error.
pub const ERROR_DOMAIN: &str = "kiroku.v1";

/// The ErrorInfo reasons: what a client matches on (DESIGN.md lists them); each is named here once.
pub mod reason {
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    pub const REQUEST_ID_REUSED: &str = "REQUEST_ID_REUSED";
    pub const CALLER_UNAUTHENTICATED: &str = "CALLER_UNAUTHENTICATED";
    pub const PERMISSION_MISSING: &str = "PERMISSION_MISSING";
    pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
    pub const TOKEN_INVALID: &str = "TOKEN_INVALID";
    pub const JWKS_UNAVAILABLE: &str = "JWKS_UNAVAILABLE";
    pub const NOT_A_GITHUB_IDENTITY: &str = "NOT_A_GITHUB_IDENTITY";
    pub const GITHUB_ACCOUNT_NOT_FOUND: &str = "GITHUB_ACCOUNT_NOT_FOUND";
    pub const GITHUB_UNAVAILABLE: &str = "GITHUB_UNAVAILABLE";
    pub const GITHUB_PROFILE_INVALID: &str = "GITHUB_PROFILE_INVALID";
    pub const GITHUB_PROFILE_MISMATCH: &str = "GITHUB_PROFILE_MISMATCH";
    pub const USER_ALREADY_EXISTS: &str = "USER_ALREADY_EXISTS";
    pub const USER_NOT_FOUND: &str = "USER_NOT_FOUND";
    pub const USER_DEACTIVATED: &str = "USER_DEACTIVATED";
    pub const USER_ERASED: &str = "USER_ERASED";
    pub const INVALID_USER_STATE: &str = "INVALID_USER_STATE";
    pub const VERSION_CONFLICT: &str = "VERSION_CONFLICT";
    pub const STORE_UNAVAILABLE: &str = "STORE_UNAVAILABLE";
    pub const STORE_FENCED: &str = "STORE_FENCED";
    pub const ERASURE_LEDGER_UNAVAILABLE: &str = "ERASURE_LEDGER_UNAVAILABLE";
    pub const LIMIT_REACHED: &str = "LIMIT_REACHED";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const PROJECTION_BEHIND: &str = "PROJECTION_BEHIND";
    pub const POSITION_NOT_FINAL: &str = "POSITION_NOT_FINAL";
    pub const POSITION_OUT_OF_RANGE: &str = "POSITION_OUT_OF_RANGE";
    pub const CONSUMER_TOO_SLOW: &str = "CONSUMER_TOO_SLOW";
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
}

/// A refusal being built: `refusal(code, reason, message)`, then what else the client needs, then `.into()`.
#[must_use]
pub struct Refusal {
    code: Code,
    message: String,
    details: ErrorDetails,
    metadata: HashMap<String, String>,
    reason: &'static str,
}

/// A refusal with `code`, the ErrorInfo `reason` (one of [`reason`]) and `message`.
pub fn refusal(code: Code, reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into(), details: ErrorDetails::new(), metadata: HashMap::new(), reason }
}

impl Refusal {
    /// The request's `field` is wrong, and why (a BadRequest violation).
    pub fn violation(mut self, field: &str, description: impl Into<String>) -> Self {
        self.details.add_bad_request_violation(field, description);
        self
    }

    /// A retry may succeed after `after` (a RetryInfo).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.details.set_retry_info(Some(after));
        self
    }

    /// ErrorInfo metadata the client can act on (`user_id`, `permission`, …).
    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.metadata.insert(key.to_owned(), value.to_string());
        self
    }
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Status {
        let Refusal { code, message, mut details, metadata, reason } = refusal;
        details.set_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }
}

/// RESOURCE_EXHAUSTED `LIMIT_REACHED`, retry after `retry_after`.
pub fn limit_reached(message: impl Into<String>, retry_after: Duration) -> Status {
    refusal(Code::ResourceExhausted, reason::LIMIT_REACHED, message).retry_after(retry_after).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_its_reason_in_the_kiroku_domain_with_what_was_added() {
        let status: Status = refusal(Code::InvalidArgument, reason::INVALID_ARGUMENT, "name: too long")
            .violation("name", "at most 39 characters")
            .retry_after(Duration::from_secs(2))
            .with("limit", 39)
            .into();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "name: too long"));
        let info = status.get_details_error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("INVALID_ARGUMENT", "kiroku.v1"));
        assert_eq!(info.metadata["limit"], "39");
        let violation = &status.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!((violation.field.as_str(), violation.description.as_str()), ("name", "at most 39 characters"));
        assert_eq!(status.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_secs(2)));
    }

    #[test]
    fn a_bare_refusal_has_only_its_error_info() {
        let status: Status = refusal(Code::NotFound, reason::USER_NOT_FOUND, "no such user").into();
        assert_eq!(status.get_details_error_info().unwrap().reason, "USER_NOT_FOUND");
        assert!(status.get_details_bad_request().is_none() && status.get_details_retry_info().is_none());
    }
}
