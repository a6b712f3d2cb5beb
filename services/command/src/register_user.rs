//! RegisterUser: verify the token, replay a retried request, fetch the GitHub profile, decide, and append the
//! `UserRegistered` event with the identity claims — or, when a claim is taken, a `UserRegistrationFailed`.

use kiroku_domain::{
    AuditCommand, AuditEvent, AuditId, Auth0Subject, ClaimKind, RegisterUser, RegistrationAudit, RegistrationRefusal,
    User, UserCommand, UserEvent, UserId,
};
use kiroku_event_store::{Append, AppendError, AppendOutcome, ExpectedVersion, Position, StoredOutcome};
use kiroku_vault::SealingKey;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::commands::{Call, Commands, rpc, vault_error};
use crate::error::CommandError;
use crate::github::Fetched;
use crate::pipeline::{Idempotency, idempotency_record, replayed};

const RPC: &str = rpc::REGISTER_USER;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registered {
    pub user_id: UserId,
    pub position: Position,
}

/// The answer stored with the events, replayed to a retry.
#[derive(Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Outcome {
    Registered { user_id: UserId },
    AlreadyExists { user_id: UserId },
}

impl Commands {
    pub(crate) async fn register_user(&self, token: &str, call: &Call) -> Result<Registered, CommandError> {
        // Verify the token, then look up the answer stored for (RPC, subject, request id): only then may GitHub be
        // asked. The request asks for nothing besides its subject, which the key already holds.
        let (subject, who) = self.signed_in(token).await?;
        let key = self.pipeline().idempotency(call, RPC, &who, &[]);
        if let Some(stored) = self.pipeline().stored(&key).await? {
            return replay(stored);
        }
        // A subject refused again and again is told to wait, before it costs a read, an audit event or a call. Its
        // place is taken now, before any await, so that concurrent calls cannot all pass; a registration that goes
        // through gives it back.
        let attempt = self
            .attempts
            .take(&subject.to_string())
            .map_err(|retry_after| CommandError::LimitReached { retry_after })?;
        let registered = self.register_new(&subject, key, call).await;
        if registered.is_ok() || registered.as_ref().is_err_and(CommandError::is_kirokus_own) {
            attempt.free();
        }
        registered
    }

    async fn register_new(
        &self,
        subject: &Auth0Subject,
        key: Option<Idempotency>,
        call: &Call,
    ) -> Result<Registered, CommandError> {
        let subject = subject.clone();
        let claims: Vec<_> =
            User::claims(&subject).iter().map(|(kind, value)| self.pipeline().claim(*kind, value)).collect();
        // Who owns the identity is known before GitHub is asked: a registered user who calls again costs kiroku
        // one indexed read, not a share of its GitHub rate limit. (The claims in the append still decide a race.)
        let owned = self.store.first_claimed(&claims).instrument(tracing::info_span!("claims.lookup")).await?;
        if let Some((taken, owner)) = owned {
            return self.refused_claim(&subject, &taken.kind, owner, key, call).await;
        }
        let fetched = self.github.fetch_user(subject.github_id(), None).instrument(tracing::info_span!("github.fetch"));
        let profile = match fetched.await? {
            Fetched::Profile(profile) => profile,
            Fetched::NotModified => {
                return Err(anyhow::anyhow!("GitHub answered 304 to an unconditional request").into());
            }
        };

        let user_id = UserId::generate();
        let command = UserCommand::Register(RegisterUser { subject: subject.clone(), profile, now: call.received_at });
        let events = User::decide(None, &command)?;
        // The person's data key is made here and stored with their first event.
        let (data_key, wrapped) = self.vault.new_key(user_id.as_uuid()).map_err(vault_error)?;
        let mut events = call.events(&events, UserEvent::encode)?;
        self.vault.seal(user_id.as_uuid(), &SealingKey::Live(data_key), &mut events).map_err(vault_error)?;
        let append = Append {
            aggregate_id: user_id.as_uuid(),
            aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
            expected: ExpectedVersion::NoStream,
            events,
            claims,
            idempotency: idempotency_record(&key, &Outcome::Registered { user_id })?,
            new_key: Some(wrapped),
            erasure: None,
        };
        match self.store.append(&append).instrument(tracing::info_span!("store.append")).await {
            Ok(AppendOutcome::Appended(appended)) => {
                tracing::info!(%user_id, position = %appended.last_position(), "user registered");
                Ok(Registered { user_id, position: appended.last_position() })
            }
            Ok(AppendOutcome::Replayed(stored)) => replay(replayed(&key, stored)?),
            Err(AppendError::ClaimRefused { kind, owner, .. }) => {
                let kind = ClaimKind::from_name(&kind).ok_or_else(|| {
                    CommandError::Internal(anyhow::anyhow!("the store refused an unknown claim {kind}"))
                })?;
                let reason = RegistrationRefusal::duplicate(kind);
                self.refuse(&subject, reason, UserId::from_uuid(owner), key, call).await
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A claim of `kind` is held by `owner`: the registration is refused as a duplicate.
    async fn refused_claim(
        &self,
        subject: &Auth0Subject,
        kind: &str,
        owner: uuid::Uuid,
        key: Option<Idempotency>,
        call: &Call,
    ) -> Result<Registered, CommandError> {
        let kind = ClaimKind::from_name(kind)
            .ok_or_else(|| CommandError::Internal(anyhow::anyhow!("an unknown claim {kind} is held")))?;
        self.refuse(subject, RegistrationRefusal::duplicate(kind), UserId::from_uuid(owner), key, call).await
    }

    /// Records the refusal on a fresh audit aggregate, with the ALREADY_EXISTS answer for retries.
    async fn refuse(
        &self,
        subject: &Auth0Subject,
        reason: RegistrationRefusal,
        existing: UserId,
        key: Option<Idempotency>,
        call: &Call,
    ) -> Result<Registered, CommandError> {
        let command = AuditCommand::RecordRefusal {
            subject: subject.clone(),
            reason,
            existing: Some(existing),
            now: call.received_at,
        };
        let events = RegistrationAudit::decide(None, &command);
        // The attempt names the same person as the user who holds the identity: sealed under that user's key, it
        // is erased with them (and, if they are erased already, written without it).
        let owner = existing.as_uuid();
        let data_key = self.vault.key_or_create(owner).await.map_err(vault_error)?;
        let mut events = call.events(&events, AuditEvent::encode)?;
        self.vault.seal(owner, &data_key, &mut events).map_err(vault_error)?;
        let append = Append {
            aggregate_id: AuditId::generate().as_uuid(),
            aggregate_type: AuditEvent::AGGREGATE_TYPE.to_owned(),
            expected: ExpectedVersion::NoStream,
            events,
            claims: vec![],
            new_key: None,
            erasure: None,
            idempotency: idempotency_record(&key, &Outcome::AlreadyExists { user_id: existing })?,
        };
        match self.store.append(&append).await {
            Ok(AppendOutcome::Appended(_)) => {
                tracing::info!(existing_user = %existing, ?reason, "duplicate registration refused");
                Err(CommandError::UserAlreadyExists { user_id: existing })
            }
            Ok(AppendOutcome::Replayed(stored)) => replay(replayed(&key, stored)?),
            Err(error) => Err(error.into()),
        }
    }
}

fn replay(stored: StoredOutcome) -> Result<Registered, CommandError> {
    let outcome: Outcome = serde_json::from_value(stored.outcome)
        .map_err(|e| CommandError::Internal(anyhow::Error::new(e).context("decode a stored RegisterUser answer")))?;
    match outcome {
        Outcome::Registered { user_id } => Ok(Registered { user_id, position: stored.position }),
        Outcome::AlreadyExists { user_id } => Err(CommandError::UserAlreadyExists { user_id }),
    }
}
