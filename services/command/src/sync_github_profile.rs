//! SyncGitHubProfile: re-read the caller's GitHub profile (conditionally, with the stored ETag) and append
//! `UserProfileUpdated` when the login, name or avatar changed.

use kiroku_domain::{ClaimKind, SyncProfile, User, UserCommand, UserEvent, UserId};
use kiroku_event_store::{Append, AppendError, AppendOutcome, ExpectedVersion, Position, StoredOutcome};
use serde::{Deserialize, Serialize};

use crate::commands::{
    Admitted, Call, Commands, Idempotency, github_subject, idempotency_record, replayed, rpc, vault_error,
};
use crate::error::{CommandError, FinalRefusal};
use crate::github::Fetched;

const RPC: &str = rpc::SYNC_GITHUB_PROFILE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Synced {
    pub user_id: UserId,
    pub version: u32,
    pub position: Position,
    pub changed: bool,
}

/// The answer stored for a retry. Answers stored before "no change" and refusals were stored are changes.
#[derive(Serialize, Deserialize)]
struct Outcome {
    user_id: UserId,
    #[serde(default = "changed")]
    changed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<FinalRefusal>,
}

fn changed() -> bool {
    true
}

impl Commands {
    /// `expected_version` 0 means "whatever version the user is at". Every answer decided from the log and
    /// GitHub's profile, "no change" included, and every refusal a retry would meet again, is stored under the
    /// request id: a retry after the profile changed on GitHub gets the first answer, not a new event.
    pub(crate) async fn sync_github_profile(
        &self,
        token: &str,
        expected_version: u64,
        call: &Call,
    ) -> Result<Synced, CommandError> {
        let (subject, key) = match self.admit(token, call, RPC, &[&expected_version.to_string()]).await? {
            Admitted::New { subject, key } => (subject, key),
            Admitted::Repeat(stored) => return replay(stored),
        };
        // Every sync asks GitHub: limited per subject like refused registrations, its place taken before any await.
        let attempt = self.attempts.take(&subject).map_err(|retry_after| CommandError::LimitReached { retry_after })?;
        let result = self.sync_new(&subject, expected_version, &key, call).await;
        if result.as_ref().is_err_and(CommandError::is_kirokus_own) {
            attempt.free();
        }
        let error = match result {
            Ok(Synced { user_id, version, position, changed: false }) => {
                let outcome = Outcome { user_id, changed: false, refused: None };
                return match self.record_answer(&key, &outcome, user_id.as_uuid(), version, position).await? {
                    Some(first) => replay(first),
                    None => result,
                };
            }
            Ok(_) => return result,
            Err(error) => error,
        };
        let Some(refusal) = error.final_refusal(expected_version != 0) else { return Err(error) };
        // A refusal before the user was found names no user: the nil id.
        let user_id = match &refusal {
            FinalRefusal::UserNotFound => UserId::from_uuid(uuid::Uuid::nil()),
            _ => self.owner_of(&subject).await?.unwrap_or_else(|| UserId::from_uuid(uuid::Uuid::nil())),
        };
        let outcome = Outcome { user_id, changed: false, refused: Some(refusal) };
        match self.record_answer(&key, &outcome, user_id.as_uuid(), 0, Position::ZERO).await? {
            Some(first) => replay(first),
            None => Err(error),
        }
    }

    /// The user who holds the subject, if any.
    async fn owner_of(&self, subject: &str) -> Result<Option<UserId>, CommandError> {
        let subject = github_subject(subject)?;
        let owner = self.store.claim_owner(&self.claim(ClaimKind::Auth0Subject, &subject.to_string())).await?;
        Ok(owner.map(UserId::from_uuid))
    }

    async fn sync_new(
        &self,
        subject: &str,
        expected_version: u64,
        key: &Option<Idempotency>,
        call: &Call,
    ) -> Result<Synced, CommandError> {
        let user_id = self.owner_of(subject).await?.ok_or(CommandError::UserNotFound)?;
        let subject = github_subject(subject)?;
        let owner = user_id.as_uuid();
        let (user, recorded) = self.load_user(user_id).await?;
        let latest = recorded.last().map(|e| e.position).unwrap_or(Position::ZERO);
        if expected_version != 0 && expected_version != u64::from(user.version) {
            return Err(CommandError::VersionConflict { expected: expected_version, actual: u64::from(user.version) });
        }
        // Refused before GitHub is asked: a deactivated user costs no call.
        User::decide(Some(&user), &UserCommand::SyncProfile(SyncProfile { profile: None, now: call.received_at }))?;

        let etag = user.personal.as_ref().and_then(|p| p.github_etag.as_deref());
        let fetched = self.github.fetch_user(subject.github_id(), etag).await?;
        let profile = match fetched {
            Fetched::Profile(profile) => Some(profile),
            Fetched::NotModified => None,
        };
        let command = UserCommand::SyncProfile(SyncProfile { profile, now: call.received_at });
        let events = User::decide(Some(&user), &command)?;
        if events.is_empty() {
            return Ok(Synced { user_id, version: user.version, position: latest, changed: false });
        }
        let data_key = self.vault.key_or_create(owner).await.map_err(vault_error)?;
        let mut events = call.events(&events, UserEvent::encode)?;
        self.vault.seal(owner, &data_key, &mut events).map_err(vault_error)?;
        let append = Append {
            aggregate_id: owner,
            aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
            expected: ExpectedVersion::Exact(user.version),
            events,
            claims: vec![],
            new_key: None,
            erasure: None,
            idempotency: idempotency_record(key, &Outcome { user_id, changed: true, refused: None })?,
        };
        match self.store.append(&append).await {
            Ok(AppendOutcome::Appended(appended)) => {
                Ok(Synced { user_id, version: appended.version, position: appended.last_position(), changed: true })
            }
            Ok(AppendOutcome::Replayed(stored)) => replay(replayed(key, stored)?),
            Err(AppendError::Conflict { actual, .. }) => Err(CommandError::VersionConflict {
                // What the caller expected, or (for "any") the version this call read and built on.
                expected: if expected_version != 0 { expected_version } else { u64::from(user.version) },
                actual: u64::from(actual.unwrap_or(user.version + 1)),
            }),
            Err(error) => Err(error.into()),
        }
    }
}

fn replay(stored: StoredOutcome) -> Result<Synced, CommandError> {
    let outcome: Outcome = serde_json::from_value(stored.outcome).map_err(|e| {
        CommandError::Internal(anyhow::Error::new(e).context("decode a stored SyncGitHubProfile answer"))
    })?;
    if let Some(refusal) = outcome.refused {
        return Err(refusal.into());
    }
    Ok(Synced {
        user_id: outcome.user_id,
        version: stored.version,
        position: stored.position,
        changed: outcome.changed,
    })
}
