//! The `UserRegistrationAudit` aggregate: one per refused registration, holding one `UserRegistrationFailed`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{Auth0Subject, ClaimKind, GitHubId, UserId};

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RegistrationRefusal {
    /// The Auth0 subject already belongs to a user.
    DuplicateAuth0Id,
    /// The GitHub account already belongs to a user.
    DuplicateGithubId,
}

impl RegistrationRefusal {
    /// The refusal of a registration whose claim of `kind` another user already holds.
    pub fn duplicate(kind: ClaimKind) -> RegistrationRefusal {
        match kind {
            ClaimKind::Auth0Subject => RegistrationRefusal::DuplicateAuth0Id,
            ClaimKind::GitHubId => RegistrationRefusal::DuplicateGithubId,
        }
    }
}

/// Who attempted a refused registration: the same person as the user who holds the identity, so sealed under
/// that user's data key and erased with them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptPersonal {
    pub auth0_id: Auth0Subject,
    pub github_id: GitHubId,
}

/// A registration was refused; the attempt is kept for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistrationFailed {
    pub reason: RegistrationRefusal,
    pub attempted_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_user_id: Option<UserId>,
    /// `None` once the person's data is erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal: Option<AttemptPersonal>,
}

crate::events! {
    /// Every event of the `UserRegistrationAudit` aggregate.
    pub enum AuditEvent("UserRegistrationAudit") {
        UserRegistrationFailed,
    }
}

/// Every command of the `UserRegistrationAudit` aggregate.
#[derive(Clone, Debug)]
pub enum AuditCommand {
    /// Record a registration refused because `existing` already holds the identity.
    RecordRefusal { subject: Auth0Subject, reason: RegistrationRefusal, existing: Option<UserId>, now: DateTime<Utc> },
}

/// The `UserRegistrationAudit` aggregate: a fresh one per refused registration, holding its one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationAudit {
    pub failure: UserRegistrationFailed,
}

impl RegistrationAudit {
    /// The state after one more event.
    pub fn evolve(_state: Option<RegistrationAudit>, event: &AuditEvent) -> Option<RegistrationAudit> {
        match event {
            AuditEvent::UserRegistrationFailed(failure) => Some(RegistrationAudit { failure: failure.clone() }),
        }
    }

    /// Which events a command produces. An audit records; it refuses nothing.
    pub fn decide(_state: Option<&RegistrationAudit>, command: &AuditCommand) -> Vec<AuditEvent> {
        match command {
            AuditCommand::RecordRefusal { subject, reason, existing, now } => {
                vec![AuditEvent::UserRegistrationFailed(UserRegistrationFailed {
                    reason: *reason,
                    attempted_at: *now,
                    duplicate_user_id: *existing,
                    personal: Some(AttemptPersonal { auth0_id: subject.clone(), github_id: subject.github_id() }),
                })]
            }
        }
    }
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
        let command = AuditCommand::RecordRefusal {
            subject: "github|7".parse().unwrap(),
            reason: RegistrationRefusal::DuplicateGithubId,
            existing: Some(existing),
            now: at,
        };
        let events = RegistrationAudit::decide(None, &command);
        assert_eq!(events.len(), 1);
        let (event_type, data) = events[0].encode().unwrap();
        assert_eq!(event_type, "UserRegistrationFailed");
        assert_eq!(
            data,
            json!({
                "reason": "DUPLICATE_GITHUB_ID",
                "attempted_at": "2026-11-27T06:00:00Z",
                "duplicate_user_id": "0191d1b4-7e2c-7cc0-9a4b-3c1d2e3f4a5b",
                "personal": { "auth0_id": "github|7", "github_id": "7" },
            })
        );
        assert_eq!(AuditEvent::decode(event_type, &data).unwrap().unwrap(), events[0]);
        let audit = RegistrationAudit::evolve(None, &events[0]).unwrap();
        assert_eq!(audit.failure.reason, RegistrationRefusal::DuplicateGithubId);
    }
}
