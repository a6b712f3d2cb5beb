//! What every command shares: the dependencies, the call and its event metadata, the signed-in user's token. How a
//! command writes is `pipeline.rs`; what each one asks is its own file.

use chrono::{DateTime, Utc};
use kiroku_domain::{Auth0Subject, EncodeError, SCHEMA_VERSION, User, UserEvent, UserId};
use kiroku_event_store::{CallerRef, EventMetadata, EventStore, NewEvent, RecordedEvent, Version};
use kiroku_platform::auth::{TokenError, TokenVerifier};
use kiroku_platform::caller::Caller;
use kiroku_vault::{BlindIndex, Vault};
use ulid::Ulid;

use std::time::Duration;

use crate::error::CommandError;
use crate::github::{GitHubClient, GitHubError};
use crate::limits::{Sampler, SubjectLimit};
use crate::pipeline::Pipeline;
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

/// The names of the RPCs, as idempotency keys carry them (one namespace per RPC).
pub(crate) mod rpc {
    pub(crate) const REGISTER_USER: &str = "RegisterUser";
    pub(crate) const SYNC_GITHUB_PROFILE: &str = "SyncGitHubProfile";
    pub(crate) const DEACTIVATE_USER: &str = "DeactivateUser";
    pub(crate) const REACTIVATE_USER: &str = "ReactivateUser";
    pub(crate) const ERASE_USER: &str = "EraseUser";
    /// The RPCs whose idempotency keys hold a person (a keyed hash of their subject) rather than a service: an
    /// erasure forgets their answers about that person.
    pub(crate) const KEYED_BY_PERSON: [&str; 2] = [REGISTER_USER, SYNC_GITHUB_PROFILE];
}

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

    /// Who owns an administrator's request ids: the calling service (its verified token's subject), kept as it is.
    pub(crate) fn service(call: &Call) -> String {
        call.caller.as_ref().map_or("-", |caller| caller.subject.as_str()).to_owned()
    }

    /// The pipeline every command writes through (see `pipeline.rs`).
    pub(crate) fn pipeline(&self) -> Pipeline<'_> {
        Pipeline { store: &self.store, vault: &self.vault, index: &self.index }
    }

    /// The first step of a signed-in user's command: verify their token. Its subject is returned parsed as a GitHub
    /// identity, and with who owns its request ids: the subject's keyed hash (the subject is personal data).
    pub(crate) async fn signed_in(&self, token: &str) -> Result<(Auth0Subject, String), CommandError> {
        let subject = self.authenticate(token).instrument(tracing::info_span!("token.verify")).await?;
        let who = self.index.hash("subject", &subject);
        Ok((github_subject(&subject)?, who))
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
    let stored = store.read_stream(user_id.as_uuid(), Version::NONE, u32::MAX).await?;
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
