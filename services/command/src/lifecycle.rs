//! DeactivateUser, ReactivateUser and EraseUser: an administrator's commands on a user (permission
//! `kiroku:admin`), idempotent by the calling service's request id. The domain decides which transitions are
//! allowed; an erasure also destroys the person's data key, releases their claims and redacts the events they
//! have from before encryption, all in the transaction that appends `UserErased`.

use kiroku_domain::{User, UserCommand, UserEvent, UserId, redact};
use kiroku_event_store::{
    Append, AppendError, AppendOutcome, Erasure, EventStore, ExpectedVersion, Position, RecordedEvent, StoredOutcome,
};
use kiroku_vault::{Vault, schema_version};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::commands::{Call, Commands, Idempotency, idempotency_record, load_user, replayed, rpc, vault_error};
use crate::error::{CommandError, FinalRefusal};

/// The user after an administrator's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Changed {
    pub version: u32,
    pub position: Position,
}

/// What an administrator asks of a user.
pub(crate) enum Administer {
    Deactivate { reason: String },
    Reactivate,
    Erase,
}

impl Administer {
    fn rpc(&self) -> &'static str {
        match self {
            Administer::Deactivate { .. } => "DeactivateUser",
            Administer::Reactivate => "ReactivateUser",
            Administer::Erase => "EraseUser",
        }
    }
}

/// The answer stored for a retry: the user, and the refusal when the command was refused for good (absent in
/// answers stored before refusals were).
#[derive(Serialize, Deserialize)]
struct Outcome {
    user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<FinalRefusal>,
}

impl Commands {
    /// `expected_version` 0 means "whatever version the user is at". Every answer decided from the log (the
    /// change, or a refusal a retry would meet again) is stored under the request id.
    pub(crate) async fn administer(
        &self,
        user_id: UserId,
        what: Administer,
        expected_version: u64,
        call: &Call,
    ) -> Result<Changed, CommandError> {
        let rpc = what.rpc();
        // The caller is a service (its verified token's subject), not a person: its name is kept as it is.
        let caller = call.caller.as_ref().map_or("-", |caller| caller.subject.as_str());
        let (user, version) = (user_id.to_string(), expected_version.to_string());
        let content: Vec<&str> = match &what {
            Administer::Deactivate { reason } => vec![&user, reason, &version],
            Administer::Reactivate => vec![&user, &version],
            Administer::Erase => vec![&user],
        };
        let key = self.idempotency(call, rpc, caller, &content);
        if let Some(stored) = self.stored(&key).await? {
            let answered = answer(stored);
            // A retry of an erasure whose ledger line could not be written writes it now.
            if let (Administer::Erase, Some(ledger), Ok(changed)) = (&what, &self.ledger, &answered) {
                ledger.record(user_id, changed.position).await?;
            }
            return answered;
        }
        let erasing = matches!(what, Administer::Erase);
        let result = Lifecycle { store: &self.store, vault: &self.vault }
            .apply(user_id, what, expected_version, &key, call)
            .await;
        if let (true, Some(ledger), Ok(changed)) = (erasing, &self.ledger, &result) {
            ledger.record(user_id, changed.position).await?;
        }
        let Err(error) = result else { return result };
        let Some(refusal) = error.final_refusal(expected_version != 0) else { return Err(error) };
        let outcome = Outcome { user_id, refused: Some(refusal) };
        match self.record_answer(&key, &outcome, user_id.as_uuid(), 0, Position::ZERO).await? {
            Some(first) => answer(first),
            None => Err(error),
        }
    }
}

/// An administrator's command on a user, once its stored answer is known to be absent: what the store and the
/// vault alone can do, so that `kiroku erasure reapply` erases as EraseUser does.
pub(crate) struct Lifecycle<'a> {
    pub(crate) store: &'a EventStore,
    pub(crate) vault: &'a Vault,
}

impl Lifecycle<'_> {
    pub(crate) async fn apply(
        &self,
        user_id: UserId,
        what: Administer,
        expected_version: u64,
        key: &Option<Idempotency>,
        call: &Call,
    ) -> Result<Changed, CommandError> {
        let (user, recorded) = load_user(self.store, self.vault, user_id).await?;
        if expected_version != 0 && expected_version != u64::from(user.version) {
            return Err(CommandError::VersionConflict { expected: expected_version, actual: u64::from(user.version) });
        }
        let now = call.received_at;
        let owner = user_id.as_uuid();
        let (command, erasure) = match what {
            Administer::Deactivate { reason } => (UserCommand::Deactivate { reason, now }, None),
            Administer::Reactivate => (UserCommand::Reactivate { now }, None),
            Administer::Erase => {
                // Refused (an erased user) before the log is searched for what to redact.
                User::decide(Some(&user), &UserCommand::Erase { redacted_positions: vec![], now })?;
                let redactions =
                    self.redactions(owner, &recorded).instrument(tracing::info_span!("erase.find")).await?;
                let positions = redactions.iter().map(|(position, _)| position.get()).collect();
                let erasure = Erasure {
                    owner,
                    redactions,
                    forget_callers: rpc::KEYED_BY_PERSON.iter().map(|rpc| format!("{rpc}:")).collect(),
                };
                (UserCommand::Erase { redacted_positions: positions, now }, Some(erasure))
            }
        };
        let decided = User::decide(Some(&user), &command)?;
        let mut events = call.events(&decided, UserEvent::encode)?;
        if matches!(command, UserCommand::Deactivate { .. }) {
            let data_key = self.vault.key_or_create(owner).await.map_err(vault_error)?;
            self.vault.seal(owner, &data_key, &mut events).map_err(vault_error)?;
        }
        let erasing = erasure.is_some();
        let append = Append {
            aggregate_id: owner,
            aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
            expected: ExpectedVersion::Exact(user.version),
            events,
            claims: vec![],
            idempotency: idempotency_record(key, &Outcome { user_id, refused: None })?,
            new_key: None,
            erasure,
        };
        match self.store.append(&append).instrument(tracing::info_span!("store.append")).await {
            Ok(AppendOutcome::Appended(appended)) => {
                if erasing {
                    tracing::info!(%user_id, position = %appended.last_position(), "user erased");
                }
                Ok(Changed { version: appended.version, position: appended.last_position() })
            }
            Ok(AppendOutcome::Replayed(stored)) => answer(replayed(key, stored)?),
            Err(AppendError::Conflict { actual, .. }) => Err(CommandError::VersionConflict {
                expected: if expected_version != 0 { expected_version } else { u64::from(user.version) },
                actual: u64::from(actual.unwrap_or(user.version + 1)),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// The events written before encryption (schema 1) that hold the person's data in clear, with what to store
    /// instead: their own, and the refused attempts that name them.
    async fn redactions(
        &self,
        owner: uuid::Uuid,
        own: &[RecordedEvent],
    ) -> Result<Vec<(Position, serde_json::Value)>, CommandError> {
        let attempts = self.store.refusals_naming(owner).await?;
        Ok(own
            .iter()
            .chain(&attempts)
            .filter_map(|event| {
                let version = schema_version(&event.metadata);
                (version <= 1)
                    .then(|| redact(&event.event_type, version, &event.data))
                    .flatten()
                    .map(|redacted| (event.position, redacted))
            })
            .collect())
    }
}

/// A stored answer, as the RPC gives it.
fn answer(stored: StoredOutcome) -> Result<Changed, CommandError> {
    let outcome: Outcome = serde_json::from_value(stored.outcome).map_err(|e| {
        CommandError::Internal(anyhow::Error::new(e).context("decode a stored answer of a user's admin"))
    })?;
    match outcome.refused {
        Some(refusal) => Err(refusal.into()),
        None => Ok(Changed { version: stored.version, position: stored.position }),
    }
}
