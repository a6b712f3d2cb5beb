//! The one pipeline of a command on an existing user, every step once and in this order: the stored answer (a
//! retry of the same request gets it; another request under the same id is refused), the user (found, loaded and
//! opened), the expected version (0: whatever it is), the domain's precondition, the use case's own preparation
//! (a GitHub profile, the rows to redact), `decide`, the events encoded, sealed and appended with the answer, and
//! the outcome mapped (a conflict once, here; a refusal the domain or the log decided is stored as the request's
//! answer, like a change). A use case is the file that says what it asks and prepares (see `deactivate_user.rs`).

use std::future::Future;

use kiroku_domain::{Auth0Subject, ClaimKind, User, UserCommand, UserEvent, UserId};
use kiroku_event_store::{
    Append, AppendError, AppendOutcome, Claim, Erasure, EventStore, ExpectedVersion, IdempotencyKey, Position,
    RecordedEvent, StoredOutcome, Version,
};
use kiroku_vault::{BlindIndex, Vault};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::commands::{Call, load_user, vault_error};
use crate::error::{CommandError, FinalRefusal};

/// What a command writes with: the log, the vault, and the keyed hash that idempotency keys and claims hold.
#[derive(Clone, Copy)]
pub(crate) struct Pipeline<'a> {
    pub(crate) store: &'a EventStore,
    pub(crate) vault: &'a Vault,
    pub(crate) index: &'a BlindIndex,
}

/// A call's idempotency key, and a keyed hash of what the request asked. A request id names one request (AIP-155):
/// its stored answer holds the hash, and a reuse of the id with other content is refused rather than answered
/// with the first request's answer.
#[derive(Clone, Debug)]
pub(crate) struct Idempotency {
    key: IdempotencyKey,
    digest: String,
}

/// The member of a stored answer that holds its request's digest (absent in answers stored before digests).
const DIGEST_MEMBER: &str = "request_digest";

/// Which user a command is for.
pub(crate) enum Target {
    User(UserId),
    /// The user who holds this Auth0 subject (a signed-in user's own command), found after the stored answer is
    /// looked for: a retry is answered even if the user is gone since.
    HolderOf(Auth0Subject),
}

/// A command on an existing user, as a use case states it.
pub(crate) struct Order {
    /// The RPC: one namespace of request ids per RPC.
    pub(crate) rpc: &'static str,
    /// Who the request id belongs to: the calling service, or a keyed hash of the signed-in person.
    pub(crate) who: String,
    /// What else the request asks (each field, in a fixed order), for the request's digest.
    pub(crate) content: Vec<String>,
    pub(crate) target: Target,
    /// As the request gives it (see [`Order::expects`]).
    pub(crate) expected_version: u64,
}

impl Order {
    /// The version the caller expects the user at, if any: in the API, 0 is "whatever version the user is at".
    /// The one place that reads the convention.
    fn expects(&self) -> Option<u64> {
        (self.expected_version != 0).then_some(self.expected_version)
    }
}

/// What a use case prepared: the domain command to decide, and an erasure's writes.
pub(crate) struct Prepared {
    pub(crate) command: UserCommand,
    pub(crate) erasure: Option<Erasure>,
}

/// The answer to a command on a user; also what is stored for a retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) user_id: UserId,
    pub(crate) version: Version,
    pub(crate) position: Position,
    /// False when the command changed nothing (a sync that found the same profile).
    pub(crate) changed: bool,
}

/// The answer as stored. Answers stored before "no change" and refusals were stored are changes.
#[derive(Serialize, Deserialize)]
struct Stored {
    user_id: UserId,
    #[serde(default = "yes")]
    changed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<FinalRefusal>,
}

fn yes() -> bool {
    true
}

impl Pipeline<'_> {
    /// Runs `order`: `intent` is the command as far as it is known before `prepare` (the domain refuses it there
    /// if the user's state does not admit it), and `prepare` completes it.
    pub(crate) async fn change_user<P, F>(
        &self,
        call: &Call,
        order: Order,
        intent: UserCommand,
        prepare: P,
    ) -> Result<Answer, CommandError>
    where
        P: FnOnce(User, Vec<RecordedEvent>, UserCommand) -> F,
        F: Future<Output = Result<Prepared, CommandError>>,
    {
        let content: Vec<&str> = order.content.iter().map(String::as_str).collect();
        let key = self.idempotency(call, order.rpc, &order.who, &content);
        if let Some(stored) = self.stored(&key).await? {
            return answer(stored);
        }
        let explicit = order.expects().is_some();
        let changed = self.change(call, &key, order, intent, prepare).await;
        let Err(error) = changed else { return changed };
        let Some(refusal) = error.final_refusal(explicit) else { return Err(error) };
        let stored = Stored { user_id: UserId::from_uuid(uuid::Uuid::nil()), changed: false, refused: Some(refusal) };
        match self.record_answer(&key, &stored, uuid::Uuid::nil(), Version::NONE, Position::ZERO).await? {
            Some(first) => answer(first),
            None => Err(error),
        }
    }

    async fn change<P, F>(
        &self,
        call: &Call,
        key: &Option<Idempotency>,
        order: Order,
        intent: UserCommand,
        prepare: P,
    ) -> Result<Answer, CommandError>
    where
        P: FnOnce(User, Vec<RecordedEvent>, UserCommand) -> F,
        F: Future<Output = Result<Prepared, CommandError>>,
    {
        let user_id = match &order.target {
            Target::User(user_id) => *user_id,
            Target::HolderOf(subject) => {
                let claim = self.claim(ClaimKind::Auth0Subject, &subject.to_string());
                UserId::from_uuid(self.store.claim_owner(&claim).await?.ok_or(CommandError::UserNotFound)?)
            }
        };
        let (user, recorded) = load_user(self.store, self.vault, user_id).await?;
        let at = recorded.last().map_or(Version::NONE, |e| e.version);
        if let Some(expected) = order.expects()
            && expected != u64::from(at)
        {
            return Err(CommandError::VersionConflict { expected, actual: u64::from(at) });
        }
        User::admits(Some(&user), &intent)?;
        let latest = recorded.last().map_or(Position::ZERO, |e| e.position);
        let Prepared { command, erasure } = prepare(user.clone(), recorded, intent).await?;
        let decided = User::decide(Some(&user), &command)?;
        if decided.is_empty() {
            let unchanged = Answer { user_id, version: at, position: latest, changed: false };
            let stored = Stored { user_id, changed: false, refused: None };
            return match self.record_answer(key, &stored, user_id.as_uuid(), at, latest).await? {
                Some(first) => answer(first),
                None => Ok(unchanged),
            };
        }
        let owner = user_id.as_uuid();
        let mut events = call.events(&decided, UserEvent::encode)?;
        if events.iter().any(|e| e.data.get(kiroku_domain::PERSONAL).is_some()) {
            let data_key = self.vault.key_or_create(owner).await.map_err(vault_error)?;
            self.vault.seal(owner, &data_key, &mut events).map_err(vault_error)?;
        }
        let append = Append {
            aggregate_id: owner,
            aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
            expected: ExpectedVersion::Exact(at),
            events,
            claims: vec![],
            idempotency: idempotency_record(key, &Stored { user_id, changed: true, refused: None })?,
            new_key: None,
            erasure,
        };
        match self.store.append(&append).instrument(tracing::info_span!("store.append")).await {
            Ok(AppendOutcome::Appended(appended)) => {
                Ok(Answer { user_id, version: appended.version, position: appended.last_position(), changed: true })
            }
            Ok(AppendOutcome::Replayed(stored)) => answer(replayed(key, stored)?),
            // What the caller expected, or (for "any") the version this call read and built on.
            Err(AppendError::Conflict { actual, .. }) => Err(CommandError::VersionConflict {
                expected: order.expects().unwrap_or(u64::from(at)),
                actual: actual.map_or(u64::from(at) + 1, u64::from),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// The idempotency of this call for `rpc`: the key (`who` called, request_id), one namespace per RPC so that a
    /// request id reused for another RPC cannot replay the wrong kind of answer; and the digest of `content`, the
    /// request's fields besides its request id (and besides what `who` already says), each in a fixed order.
    pub(crate) fn idempotency(&self, call: &Call, rpc: &str, who: &str, content: &[&str]) -> Option<Idempotency> {
        let request_id = call.request_id.as_ref()?;
        // A keyed hash, not a plain digest: a request's fields may be personal data (a deactivation's reason), and
        // a short one would be found from a plain digest by trying candidates.
        let digest = self.index.hash("request", &[rpc].iter().chain(content).copied().collect::<Vec<_>>().join("\0"));
        Some(Idempotency {
            key: IdempotencyKey { caller: format!("{rpc}:{who}"), request_id: request_id.clone() },
            digest,
        })
    }

    /// The answer stored for the call's key, if the call has a key and it was answered; `RequestIdReused` when that
    /// answer was for another request.
    pub(crate) async fn stored(&self, key: &Option<Idempotency>) -> Result<Option<StoredOutcome>, CommandError> {
        let Some(idempotency) = key else { return Ok(None) };
        let stored = self.store.stored_outcome(&idempotency.key).instrument(tracing::info_span!("idempotency.lookup"));
        stored.await?.map(|stored| same_request(idempotency, stored)).transpose()
    }

    /// Stores `outcome` as the call's answer without appending anything (an answer of "no change", a refusal that
    /// a retry would meet again), unless the key was used meanwhile: then that first answer is returned.
    pub(crate) async fn record_answer(
        &self,
        key: &Option<Idempotency>,
        outcome: &impl Serialize,
        aggregate_id: uuid::Uuid,
        version: Version,
        position: Position,
    ) -> Result<Option<StoredOutcome>, CommandError> {
        let (Some(record), Some(idempotency)) = (idempotency_record(key, outcome)?, key) else { return Ok(None) };
        match self.store.record_answer(&record, aggregate_id, version, position).await? {
            Some(first) => same_request(idempotency, first).map(Some),
            None => Ok(None),
        }
    }

    /// The event store's claim of an identity: its keyed hash, never the identity.
    pub(crate) fn claim(&self, kind: ClaimKind, value: &str) -> Claim {
        Claim { kind: kind.as_str().to_owned(), value: self.index.hash(kind.as_str(), value) }
    }
}

/// A stored answer of a command on a user, as the RPC gives it.
pub(crate) fn answer(stored: StoredOutcome) -> Result<Answer, CommandError> {
    let outcome: Stored = serde_json::from_value(stored.outcome)
        .map_err(|e| CommandError::Internal(anyhow::Error::new(e).context("decode a stored answer")))?;
    match outcome.refused {
        Some(refusal) => Err(refusal.into()),
        None => Ok(Answer {
            user_id: outcome.user_id,
            version: stored.version,
            position: stored.position,
            changed: outcome.changed,
        }),
    }
}

/// The answer to store under the call's idempotency key, if it has one, with the digest of its request.
pub(crate) fn idempotency_record(
    key: &Option<Idempotency>,
    outcome: &impl Serialize,
) -> Result<Option<kiroku_event_store::IdempotencyRecord>, CommandError> {
    let Some(idempotency) = key else { return Ok(None) };
    let mut outcome = serde_json::to_value(outcome)
        .map_err(|e| CommandError::Internal(anyhow::Error::new(e).context("encode a command's answer")))?;
    let Some(members) = outcome.as_object_mut() else {
        return Err(CommandError::Internal(anyhow::anyhow!("a command's answer is not a JSON object")));
    };
    members.insert(DIGEST_MEMBER.to_owned(), serde_json::Value::String(idempotency.digest.clone()));
    Ok(Some(kiroku_event_store::IdempotencyRecord { key: idempotency.key.clone(), outcome }))
}

/// The answer an append replayed (its key was used meanwhile), if it answered the same request as this call's.
pub(crate) fn replayed(key: &Option<Idempotency>, stored: StoredOutcome) -> Result<StoredOutcome, CommandError> {
    match key {
        Some(key) => same_request(key, stored),
        None => Ok(stored),
    }
}

/// A stored answer, if it answered the same request as this call's: an answer stored with another digest was for
/// another request that used the same request id. Answers stored before digests carry none, and are taken.
fn same_request(key: &Idempotency, stored: StoredOutcome) -> Result<StoredOutcome, CommandError> {
    match stored.outcome.get(DIGEST_MEMBER).and_then(serde_json::Value::as_str) {
        Some(digest) if digest != key.digest => Err(CommandError::RequestIdReused),
        _ => Ok(stored),
    }
}
