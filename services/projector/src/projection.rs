//! The `users` projection: `users_read` and `registration_failures_read`, kept in strict global-position order.
//!
//! Every step runs in one transaction that locks the generation's checkpoint row, applies a batch, and moves the
//! checkpoint — so several projector processes can run at once (they take turns), a crash loses nothing (the
//! transaction rolls back), and a redelivered event is recognised by its position. Events come from the stream
//! when they continue the checkpoint's `prev_position` chain, and from the event store otherwise: a broken
//! chain (Redis restarted, trimmed, another consumer holding the entries in between) is a read from PostgreSQL.

use chrono::Utc;
use kiroku_event_store::{EventStore, Position, RecordedEvent};
use kiroku_platform::failpoint;
use kiroku_relay::stream::Entry;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::apply::apply;

/// The projection's name in `projections`, `projection_checkpoints` and the consumer group.
pub const PROJECTION: &str = "users";

/// Events applied per transaction.
const BATCH: u32 = 500;

/// An event that failed too often and was skipped.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub event: RecordedEvent,
    pub attempts: i32,
    pub error: String,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct Step {
    pub checkpoint: Position,
    pub applied: usize,
    /// True when the step read a full batch from the store: there may be more right away.
    pub more: bool,
    /// True when an event failed and stopped the step short of what it read: wait before the next step.
    pub blocked: bool,
    pub dead_lettered: Vec<DeadLetter>,
}

/// Which generation a step writes: the active one (live), or a given one (a rebuild).
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Active,
    Generation(i32),
}

#[derive(Clone)]
pub struct Projection {
    pool: PgPool,
    store: EventStore,
    max_attempts: i32,
}

impl Projection {
    pub fn new(pool: PgPool, max_attempts: u32) -> Self {
        Projection {
            store: EventStore::new(pool.clone()),
            pool,
            max_attempts: i32::try_from(max_attempts).unwrap_or(i32::MAX),
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Applies the next batch: `delivered` when it continues the chain from the checkpoint, else from the store.
    pub async fn step(&self, target: Target, delivered: &[Entry]) -> anyhow::Result<Step> {
        let mut tx = self.pool.begin().await?;
        let (generation, checkpoint) = lock(&mut tx, target).await?;
        let fresh: Vec<&Entry> = delivered.iter().filter(|d| d.event.position > checkpoint).collect();
        if !delivered.is_empty() && fresh.is_empty() {
            // Everything delivered is applied already (a redelivery, or another consumer got there first).
            tx.rollback().await?;
            return Ok(Step { checkpoint, ..Step::default() });
        }
        let (events, horizon, more) = match chained(&fresh, checkpoint) {
            Some(events) => (events, None, false),
            None => {
                let batch = self.store.read_batch(checkpoint, BATCH).await?;
                (batch.events, Some(batch.through), batch.full)
            }
        };

        let mut applied = 0;
        let mut failure = None;
        for event in &events {
            if let Err(error) = apply(&mut tx, generation, event).await {
                failure = Some(error);
                break;
            }
            applied += 1;
        }
        if let Some(error) = failure {
            tx.rollback().await?;
            tracing::warn!(%error, "a batch failed; applying it event by event");
            return self.step_one_by_one(target, &events).await;
        }
        let mut new_checkpoint = events.last().map(|e| e.position).unwrap_or(checkpoint);
        if events.is_empty()
            && let Some(horizon) = horizon
        {
            new_checkpoint = new_checkpoint.max(horizon);
        }
        if new_checkpoint > checkpoint {
            save_checkpoint(&mut tx, generation, new_checkpoint).await?;
        }
        if applied > 0 {
            failpoint("projector.before_commit");
        }
        tx.commit().await?;
        Ok(Step { checkpoint: new_checkpoint, applied, more, blocked: false, dead_lettered: vec![] })
    }

    /// The slow path after a failed batch: each event in a savepoint. The first failing event gets one more
    /// attempt recorded; once it has failed `max_attempts` times it is dead-lettered and skipped, and the rest
    /// goes on. Otherwise the step stops before it, to retry later.
    async fn step_one_by_one(&self, target: Target, events: &[RecordedEvent]) -> anyhow::Result<Step> {
        let mut tx = self.pool.begin().await?;
        let (generation, checkpoint) = lock(&mut tx, target).await?;
        let mut step = Step { checkpoint, ..Step::default() };
        for event in events.iter().filter(|e| e.position > checkpoint) {
            let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
            match apply(&mut savepoint, generation, event).await {
                Ok(()) => {
                    savepoint.commit().await?;
                    step.applied += 1;
                    step.checkpoint = event.position;
                }
                Err(error) if error.is_transient() => {
                    // Transient: keep what applied so far, and try this one again on the next step.
                    savepoint.rollback().await?;
                    tracing::warn!(position = %event.position, %error, "event failed to apply; will retry");
                    step.blocked = true;
                    break;
                }
                Err(error) => {
                    savepoint.rollback().await?;
                    let attempts = record_failure(&mut tx, event.position, &error.to_string()).await?;
                    if attempts < self.max_attempts {
                        tracing::warn!(position = %event.position, attempts, %error, "event failed to apply");
                        step.blocked = true;
                        break;
                    }
                    tracing::error!(position = %event.position, attempts, %error, "event dead-lettered");
                    mark_dead(&mut tx, event.position).await?;
                    step.checkpoint = event.position;
                    step.dead_lettered.push(DeadLetter { event: event.clone(), attempts, error: error.to_string() });
                }
            }
        }
        if step.checkpoint > checkpoint {
            save_checkpoint(&mut tx, generation, step.checkpoint).await?;
        }
        tx.commit().await?;
        Ok(step)
    }

    /// The active generation's checkpoint and how far it is behind the log (for lag reports).
    pub async fn status(&self) -> anyhow::Result<Status> {
        let (generation, checkpoint): (i32, Position) = sqlx::query_as(
            "SELECT p.active_generation, c.position FROM projections p \
             JOIN projection_checkpoints c ON c.projection = p.name AND c.generation = p.active_generation \
             WHERE p.name = $1",
        )
        .bind(PROJECTION)
        .fetch_one(&self.pool)
        .await?;
        let lag = self.store.lag(checkpoint).await?;
        Ok(Status {
            generation,
            checkpoint,
            lag_seconds: lag.oldest_committed_at.map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0),
        })
    }
}

/// Where the projection stands.
#[derive(Clone, Debug)]
pub struct Status {
    pub generation: i32,
    pub checkpoint: Position,
    /// How long the oldest event not yet applied has been committed; `None` when caught up.
    pub lag_seconds: Option<f64>,
}

/// The delivered events if they continue the chain from `checkpoint` without a hole.
fn chained(fresh: &[&Entry], checkpoint: Position) -> Option<Vec<RecordedEvent>> {
    let mut previous = checkpoint;
    for delivered in fresh {
        if delivered.prev_position != previous {
            return None;
        }
        previous = delivered.event.position;
    }
    (!fresh.is_empty()).then(|| fresh.iter().map(|d| d.event.clone()).collect())
}

/// Locks the target generation's checkpoint row; a live step also holds the active generation steady (a flip
/// waits for it, and it waits for a flip).
async fn lock(tx: &mut Transaction<'static, Postgres>, target: Target) -> Result<(i32, Position), sqlx::Error> {
    let generation = match target {
        Target::Generation(generation) => generation,
        Target::Active => {
            sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1 FOR SHARE")
                .bind(PROJECTION)
                .fetch_one(&mut **tx)
                .await?
        }
    };
    let position: Position = sqlx::query_scalar(
        "SELECT position FROM projection_checkpoints WHERE projection = $1 AND generation = $2 FOR UPDATE",
    )
    .bind(PROJECTION)
    .bind(generation)
    .fetch_one(&mut **tx)
    .await?;
    Ok((generation, position))
}

async fn save_checkpoint(conn: &mut PgConnection, generation: i32, position: Position) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints SET position = $3, updated_at = now() WHERE projection = $1 AND generation = $2",
    )
    .bind(PROJECTION)
    .bind(generation)
    .bind(position)
    .execute(conn)
    .await?;
    Ok(())
}

async fn record_failure(conn: &mut PgConnection, position: Position, error: &str) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO projection_failures (projection, position, attempts, last_error) VALUES ($1, $2, 1, $3) \
         ON CONFLICT (projection, position) DO UPDATE SET attempts = projection_failures.attempts + 1, \
         last_error = excluded.last_error, updated_at = now() RETURNING attempts",
    )
    .bind(PROJECTION)
    .bind(position)
    .bind(error)
    .fetch_one(conn)
    .await
}

async fn mark_dead(conn: &mut PgConnection, position: Position) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE projection_failures SET dead_lettered = true WHERE projection = $1 AND position = $2")
        .bind(PROJECTION)
        .bind(position)
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(prev: u64, position: u64) -> Entry {
        Entry {
            prev_position: Position::new(prev),
            event: RecordedEvent {
                position: Position::new(position),
                event_id: ulid::Ulid::new(),
                aggregate_id: uuid::Uuid::nil(),
                aggregate_type: "User".into(),
                event_type: "UserRegistered".into(),
                version: 1,
                data: serde_json::Value::Null,
                metadata: serde_json::Value::Null,
                occurred_at: Utc::now(),
                created_at: Utc::now(),
            },
        }
    }

    #[test]
    fn a_batch_is_used_only_when_it_continues_the_chain_from_the_checkpoint() {
        let batch = [delivered(10, 20), delivered(20, 30)];
        let refs: Vec<&Entry> = batch.iter().collect();
        assert_eq!(chained(&refs, Position::new(10)).map(|e| e.len()), Some(2));
        assert!(chained(&refs, Position::new(5)).is_none(), "a hole before the batch");
        let holey = [delivered(10, 20), delivered(25, 30)];
        let refs: Vec<&Entry> = holey.iter().collect();
        assert!(chained(&refs, Position::new(10)).is_none(), "a hole inside the batch");
        assert!(chained(&[], Position::new(10)).is_none());
    }
}
