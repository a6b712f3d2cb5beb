//! The `users` projection: `users_read` and `registration_failures_read`, kept in strict global-position order.
//!
//! Every step runs in one transaction that locks the generation's checkpoint row, applies a batch, and moves the
//! checkpoint — so several projector processes can run at once (they take turns), a crash loses nothing (the
//! transaction rolls back), and a redelivered event is recognised by its position. Events come from the stream
//! when they continue the checkpoint's `prev_position` chain, and from the event store otherwise: a broken
//! chain (Redis restarted, trimmed, another consumer holding the entries in between) is a read from PostgreSQL.
//! The step counts which source it used, so that a projection that has quietly stopped consuming Redis shows.
//!
//! An event that keeps failing is dead-lettered after `max_attempts` (attempts count per generation), and its
//! aggregate is parked: the aggregate's later events wait with it (recorded, not applied, without attempts),
//! because each of them needs the one before; everything else flows on. `kiroku projector dead-letters replay`
//! applies a parked aggregate's events again, in order.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use kiroku_event_store::{Batch, EventStore, Lag, Position, RecordedEvent};
use kiroku_platform::failpoint;
use kiroku_relay::stream::Entry;
use kiroku_vault::{MasterKeys, Vault};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::sync::Arc;
use uuid::Uuid;

use crate::apply::{ApplyError, Run, apply, batchable, is_erasure};

/// The projection's name in `projections`, `projection_checkpoints` and the consumer group.
pub const PROJECTION: &str = "users";

/// Events applied per transaction.
const BATCH: u32 = 500;
/// Events a rebuild applies per transaction: more per step (fewer checkpoint writes and commits), still a short
/// transaction (tens of milliseconds), so that a rebuild never holds the log's horizon back for long.
const REBUILD_BATCH: u32 = 2000;

/// An event that failed too often and was skipped.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The generation of the read models it failed in.
    pub generation: i32,
    pub event: RecordedEvent,
    pub attempts: i32,
    pub error: String,
}

/// Where a step's events came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// Nothing was new.
    #[default]
    Nothing,
    /// Entries of the Redis stream that continued the chain from the checkpoint.
    Stream,
    /// The event store: a gap in the stream, or nothing delivered.
    Store,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct Step {
    pub checkpoint: Position,
    pub applied: usize,
    /// Of those applied, the events that went in by a multi-row insert of their run (the rest one by one).
    pub batched: usize,
    /// Events of parked aggregates set aside.
    pub parked: usize,
    pub source: Source,
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

/// A step's events, opened, and where they came from.
struct Read {
    events: Vec<RecordedEvent>,
    /// Events whose personal data does not open (their data key does not unwrap), by position, with why: they are
    /// dead-lettered at once, rather than holding everyone's events back.
    unopened: HashMap<Position, String>,
    /// Their rows, when they all go in as one run (see `Run::prepare`): built before the step's transaction.
    prepared: Option<Run>,
    /// How far a read from the store covered the log (see `Batch::through`); `None` for stream entries.
    through: Option<Position>,
    more: bool,
    source: Source,
}

impl From<Batch> for Read {
    /// A read of the store.
    fn from(batch: Batch) -> Self {
        Read {
            events: batch.events,
            unopened: HashMap::new(),
            prepared: None,
            through: Some(batch.through),
            more: batch.full,
            source: Source::Store,
        }
    }
}

/// A rebuild's batch read (and opened, and its rows built) ahead of its step: the log after `after`.
pub(crate) struct ReadAhead {
    after: Position,
    read: Read,
}

impl ReadAhead {
    /// Where the read after this one starts: its end, when it was full (otherwise it reached the horizon).
    pub(crate) fn next(&self) -> Option<Position> {
        self.read.more.then_some(self.read.through).flatten()
    }
}

#[derive(Clone)]
pub struct Projection {
    pool: PgPool,
    store: EventStore,
    /// Opens personal fields (while their person's key exists) before events are applied.
    vault: Vault,
    max_attempts: i32,
}

impl Projection {
    pub fn new(pool: PgPool, max_attempts: u32, master_keys: Arc<MasterKeys>) -> Self {
        let store = EventStore::new(pool.clone());
        Projection {
            vault: Vault::new(store.clone(), master_keys),
            store,
            pool,
            max_attempts: i32::try_from(max_attempts).unwrap_or(i32::MAX),
        }
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Applies the next batch: `delivered` when it continues the chain from the checkpoint, else from the store.
    ///
    /// The batch is read and opened before the step's transaction, which then only writes: from its first lock to
    /// its commit the transaction holds an xid, and so holds back the log's horizon for every reader (the relay
    /// included: measured with `cargo bench --bench read_side` at 750 registrations/s, the relay's p99 was 77–175 ms
    /// with steps that read inside their transaction, 34–48 ms with steps that read first). Should the checkpoint
    /// have moved meanwhile (another projector's step), the step reads again inside its transaction.
    pub async fn step(&self, target: Target, delivered: &[Entry]) -> anyhow::Result<Step> {
        let checkpoint = self.checkpoint(target).await?;
        let Some(read) = self.read(target, delivered, checkpoint).await? else {
            return Ok(Step { checkpoint, ..Step::default() });
        };
        if let Some(step) = self.apply_from(target, checkpoint, read).await? {
            return Ok(step);
        }
        let mut tx = self.pool.begin().await?;
        let (generation, checkpoint) = lock(&mut tx, target).await?;
        let Some(read) = self.read(target, delivered, checkpoint).await? else {
            tx.rollback().await?;
            return Ok(Step { checkpoint, ..Step::default() });
        };
        self.apply_read(tx, target, generation, checkpoint, read).await
    }

    /// The target's checkpoint, without a lock (see `step`).
    async fn checkpoint(&self, target: Target) -> Result<Position, sqlx::Error> {
        let query = match target {
            Target::Active => sqlx::query_scalar(
                "SELECT c.position FROM projections p JOIN projection_checkpoints c \
                 ON c.projection = p.name AND c.generation = p.active_generation WHERE p.name = $1",
            )
            .bind(PROJECTION),
            Target::Generation(generation) => sqlx::query_scalar(
                "SELECT position FROM projection_checkpoints WHERE projection = $1 AND generation = $2",
            )
            .bind(PROJECTION)
            .bind(generation),
        };
        query.fetch_one(&self.pool).await
    }

    /// What a step after `checkpoint` applies, opened: `delivered` when it continues the chain, else a read of
    /// the store. `None` when everything delivered is applied already (a redelivery, or another consumer got there
    /// first).
    async fn read(&self, target: Target, delivered: &[Entry], checkpoint: Position) -> anyhow::Result<Option<Read>> {
        let fresh: Vec<&Entry> = delivered.iter().filter(|d| d.event.position > checkpoint).collect();
        if !delivered.is_empty() && fresh.is_empty() {
            return Ok(None);
        }
        let read = match self.authentic(&fresh, checkpoint).await? {
            Some(events) => Read {
                events,
                unopened: HashMap::new(),
                prepared: None,
                through: None,
                more: false,
                source: Source::Stream,
            },
            None => {
                let limit = if matches!(target, Target::Active) { BATCH } else { REBUILD_BATCH };
                Read::from(self.store.read_batch(checkpoint, limit).await?)
            }
        };
        self.open(read).await.map(Some)
    }

    /// Opens a read's events, then builds their rows where they all go in as one run (see `Run::prepare`).
    async fn open(&self, mut read: Read) -> anyhow::Result<Read> {
        let unopened = self.vault.open_what_opens(&mut read.events).await?;
        read.unopened = unopened.into_iter().map(|u| (u.position, u.reason)).collect();
        read.prepared = Run::prepare(&read.events).filter(|_| read.unopened.is_empty());
        Ok(read)
    }

    /// Reads and opens a rebuild's batch after `after`, outside any step: so that it can be read while the step
    /// before applies its own (PostgreSQL and this process each have work for a core meanwhile).
    pub(crate) async fn read_ahead(&self, after: Position) -> anyhow::Result<ReadAhead> {
        let read = self.open(Read::from(self.store.read_batch(after, REBUILD_BATCH).await?)).await?;
        Ok(ReadAhead { after, read })
    }

    /// A step with a batch read ahead; `None` (and nothing done) when the checkpoint is not where it was read from.
    pub(crate) async fn step_read_ahead(&self, target: Target, ahead: ReadAhead) -> anyhow::Result<Option<Step>> {
        self.apply_from(target, ahead.after, ahead.read).await
    }

    /// Applies `read`, the events after `from`, in a step's transaction, if the checkpoint is still at `from`
    /// (what follows a position is the same whichever generation it is in); `None`, and nothing done, otherwise.
    async fn apply_from(&self, target: Target, from: Position, read: Read) -> anyhow::Result<Option<Step>> {
        let mut tx = self.pool.begin().await?;
        let (generation, checkpoint) = lock(&mut tx, target).await?;
        if checkpoint != from {
            tx.rollback().await?;
            return Ok(None);
        }
        self.apply_read(tx, target, generation, checkpoint, read).await.map(Some)
    }

    /// The rest of a step, in its transaction (which holds the checkpoint): applies opened events and moves the
    /// checkpoint.
    async fn apply_read(
        &self,
        mut tx: Transaction<'static, Postgres>,
        target: Target,
        generation: i32,
        checkpoint: Position,
        read: Read,
    ) -> anyhow::Result<Step> {
        let Read { events, unopened, prepared, through, more, source } = read;
        if !unopened.is_empty() {
            // Some events cannot be applied as they are: the slow path dead-letters those, and applies the rest.
            tx.rollback().await?;
            return self.step_one_by_one(target, &events, &unopened, source, more).await;
        }
        let parked = parked_aggregates(&mut tx, generation).await?;
        let mut step = Step {
            checkpoint,
            more,
            source: if events.is_empty() { Source::Nothing } else { source },
            ..Step::default()
        };
        // Runs of registrations and refused attempts (most of a rebuild, and of a busy log) go in as one multi-row
        // insert each; any other event first applies the run before it, so every user's events stay in order.
        let mut failure = None;
        let mut run: Vec<&RecordedEvent> = Vec::new();
        // A batch whose rows were built before the transaction (nothing parked to set aside) is one run.
        let unprepared: &[RecordedEvent] = match prepared.filter(|_| parked.is_empty()) {
            Some(prepared) => {
                match prepared.insert(&mut tx, generation).await {
                    Ok(()) => (step.applied, step.batched) = (events.len(), events.len()),
                    Err(error) => failure = Some(error),
                }
                &[]
            }
            None => &events,
        };
        for event in unprepared {
            // An erasure is applied whatever is parked: its scrub depends on no earlier row (see `apply::erased`).
            let parked_event = parked.contains(&event.aggregate_id) && !is_erasure(event);
            if !parked_event && batchable(event) {
                run.push(event);
                continue;
            }
            if let Err(error) = apply_run(&mut tx, generation, &run).await {
                failure = Some(error);
                break;
            }
            step.applied += run.len();
            step.batched += run.len();
            run.clear();
            if parked_event {
                park(&mut tx, generation, event).await?;
                step.parked += 1;
                continue;
            }
            if let Err(error) = apply(&mut tx, generation, event).await {
                failure = Some(error);
                break;
            }
            step.applied += 1;
        }
        if failure.is_none() {
            match apply_run(&mut tx, generation, &run).await {
                Ok(()) => (step.applied, step.batched) = (step.applied + run.len(), step.batched + run.len()),
                Err(error) => failure = Some(error),
            }
        }
        if let Some(error) = failure {
            tx.rollback().await?;
            tracing::warn!(%error, "a batch failed; applying it event by event");
            return self.step_one_by_one(target, &events, &HashMap::new(), source, more).await;
        }
        step.checkpoint = events.last().map(|e| e.position).unwrap_or(checkpoint);
        if let Some(through) = through.filter(|_| !more) {
            // A short read covers the log up to the horizon: nothing can commit at or below it any more, so the
            // checkpoint can pass gaps and idle stretches (the stream's chain rule accepts that; see `chained`).
            step.checkpoint = step.checkpoint.max(through);
        }
        if step.checkpoint > checkpoint {
            save_checkpoint(&mut tx, generation, step.checkpoint, source, events.len()).await?;
        }
        if step.applied > 0 {
            failpoint("projector.before_commit");
        }
        tx.commit().await?;
        Ok(step)
    }

    /// The delivered entries' events, as the log has them, when the entries continue the chain from the
    /// checkpoint and the log agrees: exactly these positions, and nothing else, after the checkpoint up to the
    /// last of them (one indexed range read). Anyone who can write the stream could forge an entry (a user that
    /// was never registered, a chain that skips real events, a position far ahead): what is applied is what the
    /// log holds, and a stream that disagrees with it is not used (and said so).
    async fn authentic(&self, fresh: &[&Entry], checkpoint: Position) -> anyhow::Result<Option<Vec<RecordedEvent>>> {
        let Some(delivered) = chained(fresh, checkpoint) else { return Ok(None) };
        let last = delivered.last().map_or(checkpoint, |e| e.position);
        let logged =
            self.store.read_range(checkpoint, last, u32::try_from(delivered.len() + 1).unwrap_or(u32::MAX)).await?;
        let agrees = logged.len() == delivered.len()
            && logged
                .iter()
                .zip(&delivered)
                .all(|(log, entry)| log.position == entry.position && log.event_id == entry.event_id);
        if !agrees {
            tracing::warn!(
                checkpoint = %checkpoint,
                delivered = delivered.len(),
                logged = logged.len(),
                "stream entries disagree with the log (forged, or from another database?); reading the log instead"
            );
            return Ok(None);
        }
        Ok(Some(logged))
    }

    /// The slow path after a failed batch: each event in a savepoint. The first failing event gets one more
    /// attempt recorded; once it has failed `max_attempts` times it is dead-lettered and skipped, its aggregate
    /// parked, and the rest goes on. Otherwise the step stops before it, to retry later.
    ///
    /// `more` is what the batch's read said (a full read: the log may go on after it). The step reports it, or
    /// more to come when it stopped short of its batch: a rebuild that took a failed batch for the end of the log
    /// would stop filling early and catch up the rest while it holds the flip.
    async fn step_one_by_one(
        &self,
        target: Target,
        events: &[RecordedEvent],
        unopened: &HashMap<Position, String>,
        source: Source,
        more: bool,
    ) -> anyhow::Result<Step> {
        let mut tx = self.pool.begin().await?;
        let (generation, checkpoint) = lock(&mut tx, target).await?;
        let mut parked = parked_aggregates(&mut tx, generation).await?;
        let mut step = Step { checkpoint, source, more, ..Step::default() };
        let mut taken = 0;
        for event in events.iter().filter(|e| e.position > checkpoint) {
            if parked.contains(&event.aggregate_id) && !is_erasure(event) {
                park(&mut tx, generation, event).await?;
                step.parked += 1;
                step.checkpoint = event.position;
                taken += 1;
                continue;
            }
            if let Some(reason) = unopened.get(&event.position) {
                // Its sealed data would apply as empty fields: it is a dead letter at once, and its person's later
                // events wait behind it until an operator repairs the key and replays it.
                record_failure(&mut tx, generation, event, reason).await?;
                tracing::error!(position = %event.position, aggregate_id = %event.aggregate_id, %reason, "event dead-lettered");
                let letter = self.dead_letter(&mut tx, generation, event, self.max_attempts, reason).await?;
                parked.insert(event.aggregate_id);
                step.checkpoint = event.position;
                taken += 1;
                step.dead_lettered.push(letter);
                continue;
            }
            let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
            match apply(&mut savepoint, generation, event).await {
                Ok(()) => {
                    savepoint.commit().await?;
                    step.applied += 1;
                    step.checkpoint = event.position;
                    taken += 1;
                }
                Err(error) if error.is_transient() => {
                    // Transient: keep what applied so far, and try this one again on the next step.
                    savepoint.rollback().await?;
                    tracing::warn!(position = %event.position, %error, "event failed to apply; will retry");
                    (step.blocked, step.more) = (true, true);
                    break;
                }
                Err(error) => {
                    savepoint.rollback().await?;
                    let attempts = record_failure(&mut tx, generation, event, &error.to_string()).await?;
                    if attempts < self.max_attempts {
                        tracing::warn!(position = %event.position, attempts, %error, "event failed to apply");
                        (step.blocked, step.more) = (true, true);
                        break;
                    }
                    tracing::error!(
                        position = %event.position,
                        aggregate_id = %event.aggregate_id,
                        attempts,
                        %error,
                        "event dead-lettered; its aggregate's later events are parked until it is replayed"
                    );
                    let letter = self.dead_letter(&mut tx, generation, event, attempts, &error.to_string()).await?;
                    parked.insert(event.aggregate_id);
                    step.checkpoint = event.position;
                    taken += 1;
                    step.dead_lettered.push(letter);
                }
            }
        }
        if step.checkpoint > checkpoint {
            save_checkpoint(&mut tx, generation, step.checkpoint, source, taken).await?;
        }
        tx.commit().await?;
        Ok(step)
    }

    /// Marks `event` dead in the step's transaction, and the dead letter to publish: the event as stored (sealed),
    /// never opened, so that no copy of a dead letter holds personal data. Read again, which a dead letter (rare)
    /// can afford and a step (every batch) could not.
    async fn dead_letter(
        &self,
        tx: &mut PgConnection,
        generation: i32,
        event: &RecordedEvent,
        attempts: i32,
        error: &str,
    ) -> anyhow::Result<DeadLetter> {
        mark_dead(tx, generation, event.position).await?;
        let stored = self
            .store
            .read_event(event.position)
            .await?
            .ok_or_else(|| anyhow::anyhow!("dead-lettered event {} is not in the log", event.position))?;
        Ok(DeadLetter { generation, event: stored, attempts, error: error.to_owned() })
    }

    /// The active generation's checkpoint, how far it is behind the log, and where its events came from.
    pub async fn status(&self) -> anyhow::Result<Status> {
        let (generation, checkpoint, from_stream, from_store): (i32, Position, i64, i64) = sqlx::query_as(
            "SELECT p.active_generation, c.position, c.from_stream, c.from_store FROM projections p \
             JOIN projection_checkpoints c ON c.projection = p.name AND c.generation = p.active_generation \
             WHERE p.name = $1",
        )
        .bind(PROJECTION)
        .fetch_one(&self.pool)
        .await?;
        let lag = self.store.lag(checkpoint).await?;
        let head = self.store.head().await?;
        let (dead, parked, parked_aggregates): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'dead'), count(*) FILTER (WHERE state = 'parked'), \
                    count(DISTINCT aggregate_id) FILTER (WHERE state IN ('dead', 'parked')) \
             FROM projection_failures WHERE projection = $1 AND generation = $2",
        )
        .bind(PROJECTION)
        .bind(generation)
        .fetch_one(&self.pool)
        .await?;
        Ok(Status {
            generation,
            checkpoint,
            head,
            lag,
            lag_seconds: lag.oldest_committed_at.map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0),
            from_stream: u64::try_from(from_stream).unwrap_or(0),
            from_store: u64::try_from(from_store).unwrap_or(0),
            dead_letters: u64::try_from(dead).unwrap_or(0),
            parked_events: u64::try_from(parked).unwrap_or(0),
            parked_aggregates: u64::try_from(parked_aggregates).unwrap_or(0),
        })
    }
}

/// Where the projection stands.
#[derive(Clone, Debug)]
pub struct Status {
    pub generation: i32,
    pub checkpoint: Position,
    /// The highest position committed in the log.
    pub head: Position,
    /// The final events not yet applied, and what holds the rest of the log back.
    pub lag: Lag,
    /// How long the oldest event not yet applied has been committed; `None` when caught up with what is final.
    pub lag_seconds: Option<f64>,
    /// Events this generation took from the Redis stream, and from the event store.
    pub from_stream: u64,
    pub from_store: u64,
    pub dead_letters: u64,
    pub parked_events: u64,
    /// Users whose events wait behind a dead letter (each has one dead letter and its parked events).
    pub parked_aggregates: u64,
}

/// The delivered events if they continue the chain from `checkpoint` without a hole. The relay chains each entry
/// to the event published just before it: no event lies between an entry's `prev_position` and its position. So
/// the first fresh entry may start anywhere at or below the checkpoint (which can be past the last event, at the
/// horizon); every later one must follow the one before.
fn chained(fresh: &[&Entry], checkpoint: Position) -> Option<Vec<RecordedEvent>> {
    let (first, rest) = fresh.split_first()?;
    if first.prev_position > checkpoint {
        return None;
    }
    let mut previous = first.event.position;
    for delivered in rest {
        if delivered.prev_position != previous {
            return None;
        }
        previous = delivered.event.position;
    }
    Some(fresh.iter().map(|d| d.event.clone()).collect())
}

/// Applies a run of [`batchable`] events (none: nothing to do).
async fn apply_run(conn: &mut PgConnection, generation: i32, run: &[&RecordedEvent]) -> Result<(), ApplyError> {
    Run::of(run.iter().copied())?.insert(conn, generation).await
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

async fn save_checkpoint(
    conn: &mut PgConnection,
    generation: i32,
    position: Position,
    source: Source,
    events: usize,
) -> Result<(), sqlx::Error> {
    let events = i64::try_from(events).unwrap_or(i64::MAX);
    let (from_stream, from_store) = match source {
        Source::Stream => (events, 0),
        Source::Store => (0, events),
        Source::Nothing => (0, 0),
    };
    // The announcement is sent at commit (NOTIFY is transactional), and lets GetUser's read-your-writes waiters
    // wake at once instead of polling. Steps of a projection take turns anyway, so the commit-time lock that
    // NOTIFY takes costs them nothing.
    sqlx::query(
        "WITH moved AS (UPDATE projection_checkpoints SET position = $3, from_stream = from_stream + $4, \
         from_store = from_store + $5, updated_at = now() WHERE projection = $1 AND generation = $2 RETURNING 1) \
         SELECT pg_notify('kiroku_projections', $1) FROM moved",
    )
    .bind(PROJECTION)
    .bind(generation)
    .bind(position)
    .bind(from_stream)
    .bind(from_store)
    .execute(conn)
    .await?;
    Ok(())
}

/// The aggregates of `generation` with a dead-lettered event, whose later events must wait.
async fn parked_aggregates(conn: &mut PgConnection, generation: i32) -> Result<HashSet<Uuid>, sqlx::Error> {
    let parked: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM projection_failures \
         WHERE projection = $1 AND generation = $2 AND state <> 'failing'",
    )
    .bind(PROJECTION)
    .bind(generation)
    .fetch_all(conn)
    .await?;
    Ok(parked.into_iter().collect())
}

/// Sets an event of a parked aggregate aside, without an attempt.
async fn park(conn: &mut PgConnection, generation: i32, event: &RecordedEvent) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_failures (projection, generation, position, aggregate_id, attempts, last_error, state) \
         VALUES ($1, $2, $3, $4, 0, 'waits for an earlier dead letter of its aggregate', 'parked') \
         ON CONFLICT (projection, generation, position) DO NOTHING",
    )
    .bind(PROJECTION)
    .bind(generation)
    .bind(event.position)
    .bind(event.aggregate_id)
    .execute(conn)
    .await?;
    Ok(())
}

async fn record_failure(
    conn: &mut PgConnection,
    generation: i32,
    event: &RecordedEvent,
    error: &str,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO projection_failures (projection, generation, position, aggregate_id, attempts, last_error) \
         VALUES ($1, $2, $3, $4, 1, $5) \
         ON CONFLICT (projection, generation, position) DO UPDATE SET attempts = projection_failures.attempts + 1, \
         last_error = excluded.last_error, updated_at = now() RETURNING attempts",
    )
    .bind(PROJECTION)
    .bind(generation)
    .bind(event.position)
    .bind(event.aggregate_id)
    .bind(error)
    .fetch_one(conn)
    .await
}

async fn mark_dead(conn: &mut PgConnection, generation: i32, position: Position) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_failures SET state = 'dead' WHERE projection = $1 AND generation = $2 AND position = $3",
    )
    .bind(PROJECTION)
    .bind(generation)
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
                version: kiroku_event_store::Version::from(1u16),
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

    #[test]
    fn a_checkpoint_past_the_last_event_still_continues_the_chain() {
        // The checkpoint moved to the horizon (15) while the log was idle; nothing lies between 10 and 20.
        let batch = [delivered(10, 20), delivered(20, 30)];
        let refs: Vec<&Entry> = batch.iter().collect();
        assert_eq!(chained(&refs, Position::new(15)).map(|e| e.len()), Some(2));
    }
}
