//! What every command shares: the dependencies, authentication, idempotency keys and event metadata.

use chrono::{DateTime, Utc};
use kiroku_domain::{Auth0Subject, ClaimKind, EncodeError, SCHEMA_VERSION, User, UserEvent, UserId};
use kiroku_event_store::{
    CallerRef, Claim, EventMetadata, EventStore, IdempotencyKey, IdempotencyRecord, NewEvent, RecordedEvent,
    StoredOutcome,
};
use kiroku_platform::auth::{TokenError, TokenVerifier};
use kiroku_platform::caller::Caller;
use kiroku_vault::{BlindIndex, Vault};
use serde::Serialize;
use ulid::Ulid;

use std::time::Duration;

use crate::error::CommandError;
use crate::github::{GitHubClient, GitHubError};
use crate::limits::{Sampler, SubjectLimit};
use tracing::Instrument;

/// The command side's dependencies. Use cases are methods on it, one file each.
pub(crate) struct Commands {
    pub(crate) store: EventStore,
    /// Seals personal fields under each person's data key, and opens them.
    pub(crate) vault: Vault,
    /// Keyed hashes of identities: what claims and idempotency keys store instead of them.
    pub(crate) index: BlindIndex,
    pub(crate) verifier: TokenVerifier,
    pub(crate) github: GitHubClient,
    /// Costly attempts per subject (a signed-in user retrying in a loop): refused registrations, GitHub calls.
    pub(crate) attempts: SubjectLimit,
    /// Lines about refused tokens.
    refused_tokens: Sampler,
    /// Where erasures are recorded outside the database (`KIROKU_ERASURE_LEDGER`), if anywhere.
    pub(crate) ledger: Option<crate::erasure::ErasureLedger>,
}

/// A verified call: new (with its subject, unparsed, and its idempotency key), or a repeat of an answered one.
pub(crate) enum Admitted {
    New { subject: String, key: Option<Idempotency> },
    Repeat(StoredOutcome),
}

/// The names of the RPCs, as idempotency keys carry them (one namespace per RPC).
pub(crate) mod rpc {
    pub(crate) const REGISTER_USER: &str = "RegisterUser";
    pub(crate) const SYNC_GITHUB_PROFILE: &str = "SyncGitHubProfile";
    /// The RPCs whose idempotency keys hold a person (a keyed hash of their subject) rather than a service: an
    /// erasure forgets their answers about that person.
    pub(crate) const KEYED_BY_PERSON: [&str; 2] = [REGISTER_USER, SYNC_GITHUB_PROFILE];
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

/// One incoming call: its own id and what the caller said about it.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    /// Unique per call; the causation id of the events it writes.
    pub command_id: Ulid,
    /// The caller's request id (AIP-155), already validated.
    pub request_id: Option<String>,
    /// Shared by everything one business request caused, across services.
    pub correlation_id: String,
    pub received_at: DateTime<Utc>,
    /// The service that called (verified by the caller check), recorded in the events it writes.
    pub caller: Option<Caller>,
    /// The call's W3C trace context, recorded in the events it writes.
    pub traceparent: Option<String>,
}

impl Call {
    pub(crate) fn new(request_id: Option<String>, correlation_id: Option<String>, caller: Option<Caller>) -> Self {
        let command_id = Ulid::new();
        let correlation_id = correlation_id.or_else(|| request_id.clone()).unwrap_or_else(|| command_id.to_string());
        Call { command_id, request_id, correlation_id, received_at: Utc::now(), caller, traceparent: None }
    }

    /// The events a decision produced, encoded and stamped with this call's metadata, ready to append.
    pub(crate) fn events<E>(
        &self,
        decided: &[E],
        encode: impl Fn(&E) -> Result<(&'static str, serde_json::Value), EncodeError>,
    ) -> Result<Vec<NewEvent>, CommandError> {
        decided
            .iter()
            .map(|event| {
                let (event_type, data) = encode(event).map_err(|e| CommandError::Internal(e.into()))?;
                Ok(self.event(event_type, data))
            })
            .collect()
    }

    fn event(&self, event_type: &str, data: serde_json::Value) -> NewEvent {
        NewEvent {
            event_type: event_type.to_owned(),
            data,
            metadata: EventMetadata {
                request_id: self.request_id.clone(),
                correlation_id: self.correlation_id.clone(),
                causation_id: self.command_id.to_string(),
                schema_version: SCHEMA_VERSION,
                caller: self
                    .caller
                    .as_ref()
                    .map(|caller| CallerRef { sub: caller.subject.clone(), azp: caller.authorized_party.clone() }),
                traceparent: self.traceparent.clone(),
            },
            occurred_at: self.received_at,
        }
    }
}

impl Commands {
    pub(crate) fn new(
        store: EventStore,
        vault: Vault,
        index: BlindIndex,
        verifier: TokenVerifier,
        github: GitHubClient,
        refusals_per_minute: u32,
        ledger: Option<crate::erasure::ErasureLedger>,
    ) -> Self {
        Commands {
            ledger,
            store,
            vault,
            index,
            verifier,
            github,
            attempts: SubjectLimit::new(refusals_per_minute, Duration::from_secs(60)),
            refused_tokens: Sampler::new(Duration::from_secs(10)),
        }
    }

    /// The first steps of every command of a signed-in user, in this order: verify the token, then look up the
    /// answer stored for (RPC, verified subject, request id). Only then may a command call GitHub. The subject is
    /// personal data: the key holds its keyed hash. `content` is what else the request asks (see
    /// [`Commands::idempotency`]).
    pub(crate) async fn admit(
        &self,
        token: &str,
        call: &Call,
        rpc: &str,
        content: &[&str],
    ) -> Result<Admitted, CommandError> {
        let subject = self.authenticate(token).instrument(tracing::info_span!("token.verify")).await?;
        let key = self.idempotency(call, rpc, &self.index.hash("subject", &subject), content);
        if let Some(stored) = self.stored(&key).await? {
            return Ok(Admitted::Repeat(stored));
        }
        Ok(Admitted::New { subject, key })
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
        version: u32,
        position: kiroku_event_store::Position,
    ) -> Result<Option<StoredOutcome>, CommandError> {
        let Some(record) = idempotency_record(key, outcome)? else { return Ok(None) };
        let Some(idempotency) = key else { return Ok(None) };
        match self.store.record_answer(&record, aggregate_id, version, position).await? {
            Some(first) => same_request(idempotency, first).map(Some),
            None => Ok(None),
        }
    }

    /// The event store's claim of an identity: its keyed hash, never the identity.
    pub(crate) fn claim(&self, kind: ClaimKind, value: &str) -> Claim {
        Claim { kind: kind.as_str().to_owned(), value: self.index.hash(kind.as_str(), value) }
    }

    /// A user's events as stored, and the user they build (see [`load_user`]).
    pub(crate) async fn load_user(&self, user_id: UserId) -> Result<(User, Vec<RecordedEvent>), CommandError> {
        load_user(&self.store, &self.vault, user_id).await
    }

    /// Verifies the token and returns its subject, still unparsed (any verified subject can own a request id).
    async fn authenticate(&self, token: &str) -> Result<String, CommandError> {
        match self.verifier.verify(token).await {
            Ok(verified) => Ok(verified.subject),
            Err(TokenError::Expired) => Err(CommandError::TokenExpired),
            Err(TokenError::Invalid(why)) => {
                if let Some(suppressed) = self.refused_tokens.sample() {
                    tracing::info!(why, suppressed, "token refused (one line per 10 s; `suppressed` since the last)");
                }
                Err(CommandError::TokenInvalid)
            }
            Err(TokenError::JwksUnavailable) => Err(CommandError::JwksUnavailable),
        }
    }
}

/// A user's events as stored, and the user they build (opened and upcast); `UserNotFound` when there is none.
pub(crate) async fn load_user(
    store: &EventStore,
    vault: &Vault,
    user_id: UserId,
) -> Result<(User, Vec<RecordedEvent>), CommandError> {
    let stored = store.read_stream(user_id.as_uuid(), 0, u32::MAX).await?;
    let opened = vault.open(stored.clone()).await.map_err(vault_error)?;
    let events = opened
        .iter()
        .filter_map(|e| UserEvent::decode(&e.event_type, &e.data))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CommandError::Internal(e.into()))?;
    let user = User::from_events(user_id, &events).ok_or(CommandError::UserNotFound)?;
    Ok((user, stored))
}

pub(crate) fn github_subject(subject: &str) -> Result<Auth0Subject, CommandError> {
    subject.parse().map_err(|_| CommandError::NotAGitHubIdentity)
}

/// A vault failure: the database's, or one an operator must fix (a master key missing, a corrupt key).
pub(crate) fn vault_error(error: kiroku_vault::VaultError) -> CommandError {
    match error {
        kiroku_vault::VaultError::Store(error) => error.into(),
        other => CommandError::Internal(other.into()),
    }
}

/// The answer to store under the call's idempotency key, if it has one, with the digest of its request.
pub(crate) fn idempotency_record(
    key: &Option<Idempotency>,
    outcome: &impl Serialize,
) -> Result<Option<IdempotencyRecord>, CommandError> {
    let Some(idempotency) = key else { return Ok(None) };
    let mut outcome = serde_json::to_value(outcome)
        .map_err(|e| CommandError::Internal(anyhow::Error::new(e).context("encode a command's answer")))?;
    let Some(members) = outcome.as_object_mut() else {
        return Err(CommandError::Internal(anyhow::anyhow!("a command's answer is not a JSON object")));
    };
    members.insert(DIGEST_MEMBER.to_owned(), serde_json::Value::String(idempotency.digest.clone()));
    Ok(Some(IdempotencyRecord { key: idempotency.key.clone(), outcome }))
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
pub(crate) fn same_request(key: &Idempotency, stored: StoredOutcome) -> Result<StoredOutcome, CommandError> {
    match stored.outcome.get(DIGEST_MEMBER).and_then(serde_json::Value::as_str) {
        Some(digest) if digest != key.digest => Err(CommandError::RequestIdReused),
        _ => Ok(stored),
    }
}

impl From<GitHubError> for CommandError {
    fn from(error: GitHubError) -> Self {
        match error {
            GitHubError::NotFound => CommandError::GitHubAccountNotFound,
            GitHubError::Unavailable { cause, retry_after } => {
                tracing::warn!(%cause, "GitHub unavailable");
                CommandError::GitHubUnavailable { retry_after }
            }
            refused @ GitHubError::Refused(_) => CommandError::Internal(refused.into()),
        }
    }
}
