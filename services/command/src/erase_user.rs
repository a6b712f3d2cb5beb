//! EraseUser: an administrator erases a person (permission `kiroku:admin`). In the transaction that appends
//! `UserErased`, the person's data key is destroyed, their claims released, the answers keyed by them forgotten,
//! and the events they have from before encryption redacted; then the erasure is recorded in the ledger
//! (`erasure.rs`). Idempotent by the calling service's request id.

use kiroku_domain::{UserCommand, UserId, redact};
use kiroku_event_store::{Erasure, Position, RecordedEvent};
use kiroku_vault::schema_version;
use tracing::Instrument;

use crate::commands::{Call, Commands, rpc};
use crate::error::CommandError;
use crate::pipeline::{Answer, Order, Pipeline, Prepared, Target};

impl Commands {
    pub(crate) async fn erase_user(&self, user_id: UserId, call: &Call) -> Result<Answer, CommandError> {
        let erased = erase(self.pipeline(), user_id, Commands::service(call), call).await?;
        // After the commit, and again when a retry is answered: a line a failed write lost comes with the retry.
        if let Some(ledger) = &self.ledger {
            ledger.record(user_id, erased.position).await?;
        }
        Ok(erased)
    }
}

/// The erasure itself, as EraseUser and `kiroku erasure reapply` run it.
pub(crate) async fn erase(
    pipeline: Pipeline<'_>,
    user_id: UserId,
    who: String,
    call: &Call,
) -> Result<Answer, CommandError> {
    let order = Order {
        rpc: rpc::ERASE_USER,
        who,
        content: vec![user_id.to_string()],
        target: Target::User(user_id),
        expected_version: 0,
    };
    let intent = UserCommand::Erase { redacted_positions: vec![], now: call.received_at };
    let erased = pipeline
        .change_user(call, order, intent, |_, recorded, _| async move {
            let owner = user_id.as_uuid();
            let redactions =
                redactions(pipeline, owner, &recorded).instrument(tracing::info_span!("erase.find")).await?;
            let redacted_positions = redactions.iter().map(|(position, _)| position.get()).collect();
            let erasure = Erasure {
                owner,
                redactions,
                forget_callers: rpc::KEYED_BY_PERSON.iter().map(|rpc| format!("{rpc}:")).collect(),
            };
            let command = UserCommand::Erase { redacted_positions, now: call.received_at };
            Ok(Prepared { command, erasure: Some(erasure) })
        })
        .await?;
    tracing::info!(%user_id, position = %erased.position, "user erased");
    Ok(erased)
}

/// The events written before encryption (schema 1) that hold the person's data in clear, with what to store
/// instead: their own, and the refused attempts that name them.
async fn redactions(
    pipeline: Pipeline<'_>,
    owner: uuid::Uuid,
    own: &[RecordedEvent],
) -> Result<Vec<(Position, serde_json::Value)>, CommandError> {
    let attempts = pipeline.store.refusals_naming(owner).await?;
    Ok(own
        .iter()
        .chain(&attempts)
        .filter_map(|event| {
            let version = schema_version(&event.metadata);
            (version <= 1)
                .then(|| redact(&event.event_type, version, &event.data))
                .flatten()
                .map(|r| (event.position, r))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    /// The store finds refusals by a literal aggregate type (its partial index needs one): the domain's.
    #[test]
    fn the_store_reads_refusals_under_the_domains_aggregate_type() {
        assert_eq!(kiroku_event_store::AUDIT_AGGREGATE_TYPE, kiroku_domain::AuditEvent::AGGREGATE_TYPE);
    }
}
