//! The `UserRegistrationAudit` aggregate: one per refused registration, holding one `UserRegistrationFailed`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::DecodeError;
use crate::ids::{Auth0Subject, GitHubId, UserId};

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RegistrationRefusal {
    /// The Auth0 subject already belongs to a user.
    DuplicateAuth0Id,
    /// The GitHub account already belongs to a user.
    DuplicateGithubId,
}

/// A registration was refused; the attempt is kept for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistrationFailed {
    pub auth0_id: Auth0Subject,
    pub github_id: GitHubId,
    pub reason: RegistrationRefusal,
    pub attempted_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_user_id: Option<UserId>,
}

impl UserRegistrationFailed {
    pub const TYPE: &'static str = "UserRegistrationFailed";
}

/// Every event of the `UserRegistrationAudit` aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditEvent {
    RegistrationFailed(UserRegistrationFailed),
}

impl AuditEvent {
    pub const AGGREGATE_TYPE: &'static str = "UserRegistrationAudit";
    pub const TYPES: [&'static str; 1] = [UserRegistrationFailed::TYPE];

    pub fn event_type(&self) -> &'static str {
        match self {
            AuditEvent::RegistrationFailed(_) => UserRegistrationFailed::TYPE,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            AuditEvent::RegistrationFailed(e) => serde_json::to_value(e).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn decode(event_type: &str, data: &serde_json::Value) -> Option<Result<AuditEvent, DecodeError>> {
        match event_type {
            UserRegistrationFailed::TYPE => Some(
                serde_json::from_value(data.clone())
                    .map(AuditEvent::RegistrationFailed)
                    .map_err(|source| DecodeError { event_type: event_type.to_owned(), source }),
            ),
            _ => None,
        }
    }
}

/// Records a registration refused because `existing` already holds the identity.
pub fn refuse_registration(
    subject: &Auth0Subject,
    reason: RegistrationRefusal,
    existing: Option<UserId>,
    now: DateTime<Utc>,
) -> AuditEvent {
    AuditEvent::RegistrationFailed(UserRegistrationFailed {
        auth0_id: subject.clone(),
        github_id: subject.github_id(),
        reason,
        attempted_at: now,
        duplicate_user_id: existing,
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    #[test]
    fn a_refusal_names_the_existing_user_and_the_reason() {
        let existing: UserId = "0191d1b4-7e2c-7cc0-9a4b-3c1d2e3f4a5b".parse().unwrap();
        let at = Utc.with_ymd_and_hms(2026, 11, 27, 6, 0, 0).unwrap();
        let event = refuse_registration(
            &"github|7".parse().unwrap(),
            RegistrationRefusal::DuplicateGithubId,
            Some(existing),
            at,
        );
        assert_eq!(
            event.to_json(),
            json!({
                "auth0_id": "github|7",
                "github_id": "7",
                "reason": "DUPLICATE_GITHUB_ID",
                "attempted_at": "2026-11-27T06:00:00Z",
                "duplicate_user_id": "0191d1b4-7e2c-7cc0-9a4b-3c1d2e3f4a5b",
            })
        );
        assert_eq!(AuditEvent::decode(event.event_type(), &event.to_json()).unwrap().unwrap(), event);
    }
}
