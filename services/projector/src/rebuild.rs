//! `kiroku projector rebuild`: fills a fresh generation of the read models from the event store in short
//! transactions (an open transaction holds back every reader of the log), then flips the active generation in one
//! short transaction. Queries read the old generation until the flip and the new one after it.
//!
//! One rebuild at a time, by the event store's leader lock `rebuild:users`, checked before every batch and before
//! the flip: a rebuild whose lock's connection died may have a successor already, and must not flip over it. A
//! generation that no rebuild owns (what a killed rebuild left) is dropped by the next rebuild, and by every
//! projector at start-up; until then, erasures scrub it like every other generation (see `apply::erased`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiroku_event_store::{LeaderLock, Position};
use kiroku_platform::failpoint;
use sqlx::PgPool;

use tokio::sync::mpsc;

use crate::dead_letters::DeadLetterStream;
use crate::projection::{DeadLetter, PROJECTION, Projection, ReadAhead, Step, Target};

/// The most steps the flip applies while it holds the projections row (and an xid, which holds back the horizon
/// of every reader of the log): more than that still to apply, and the rebuild goes back to filling.
const FLIP_STEPS: usize = 3;

/// What a rebuild did.
#[derive(Debug)]
pub struct Rebuilt {
    pub generation: i32,
    pub checkpoint: Position,
    pub events: usize,
    /// Of those, the events that went in by a multi-row insert of their run.
    pub batched: usize,
    /// Of those, the events applied while the flip held the projections row (live steps wait meanwhile).
    pub flip_events: usize,
    pub seconds: f64,
}

/// The leader lock of rebuilds of the projection.
fn lock_name() -> String {
    format!("rebuild:{PROJECTION}")
}

/// Rebuilds the projection. One rebuild at a time: a second one, while the first runs, fails at once (it would
/// otherwise read the active generation the first is about to flip, and empty it). Dead letters of the new
/// generation are published like the live projector's.
pub async fn rebuild(pool: &PgPool, projection: &Projection, dead_letters: &DeadLetterStream) -> Result<Rebuilt> {
    let mut lock = projection.store().leader_lock(&lock_name()).await?;
    anyhow::ensure!(lock.try_acquire().await?, "another rebuild of the {PROJECTION} projection is running");
    let rebuilt = Rebuild { pool, projection, dead_letters, lock: &mut lock }.run().await;
    lock.release().await;
    rebuilt
}

/// Drops every generation but the active one, with their dead letters, unless a rebuild is running (it owns the
/// one it fills). What a killed rebuild left would otherwise keep rows nobody reads. Run by every projector at
/// start-up.
pub async fn drop_abandoned_generations(
    pool: &PgPool,
    projection: &Projection,
    dead_letters: &DeadLetterStream,
) -> Result<()> {
    let mut lock = projection.store().leader_lock(&lock_name()).await?;
    if !lock.try_acquire().await? {
        return Ok(());
    }
    let active: i32 = sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1")
        .bind(PROJECTION)
        .fetch_one(pool)
        .await
        .context("read the active generation")?;
    let dropped = delete_inactive_generations(pool, active).await;
    let pruned = match &dropped {
        Ok(_) => dead_letters.keep_only(pool, active).await,
        Err(_) => Ok(()),
    };
    lock.release().await;
    if dropped? {
        tracing::info!(active, "dropped the generations of read models that no rebuild owns");
    }
    pruned
}

struct Rebuild<'a> {
    pool: &'a PgPool,
    projection: &'a Projection,
    dead_letters: &'a DeadLetterStream,
    lock: &'a mut LeaderLock,
}

/// A rebuild's counts so far, and the dead letters it has yet to publish.
#[derive(Default)]
struct Counts {
    events: usize,
    batched: usize,
    dead_lettered: Vec<DeadLetter>,
}

impl Rebuild<'_> {
    async fn run(mut self) -> Result<Rebuilt> {
        let started = Instant::now();
        let active: i32 = sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1")
            .bind(PROJECTION)
            .fetch_one(self.pool)
            .await
            .context("read the active generation")?;
        let generation = active + 1;
        // A rebuild that died half-way, or between its flip and dropping the old generation, left rows behind:
        // every generation but the active one is removed before this one starts afresh.
        delete_inactive_generations(self.pool, active).await?;
        self.dead_letters.keep_only(self.pool, active).await.context("remove the dead letters of old generations")?;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, generation, position) VALUES ($1, $2, 0) \
             ON CONFLICT (projection, generation) DO UPDATE SET position = 0, updated_at = now()",
        )
        .bind(PROJECTION)
        .bind(generation)
        .execute(self.pool)
        .await?;

        let mut counts = Counts::default();
        self.fill(generation, &mut counts).await?;
        let (checkpoint, flip_events) = loop {
            match self.flip(active, generation, &mut counts).await? {
                Some(flipped) => break flipped,
                // Writers outran the flip's few steps: fill again, outside it, and try once more.
                None => self.fill_after(generation, &mut counts).await?,
            }
        };

        delete_inactive_generations(self.pool, generation).await?;
        self.dead_letters.keep_only(self.pool, generation).await.context("remove the old generation's dead letters")?;
        Ok(Rebuilt {
            generation,
            checkpoint,
            events: counts.events,
            batched: counts.batched,
            flip_events,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Fills the generation until a read comes back short: under steady writes every step finds something new,
    /// so waiting for an empty one could tail the log for ever; the flip catches up the rest. The next batch is
    /// read and opened while the step before applies its own. A step that finds its checkpoint elsewhere than
    /// its batch was read from (which a step stopped short by a failing event leaves) ends the read-ahead, and
    /// the rest goes step by step.
    async fn fill(&mut self, generation: i32, counts: &mut Counts) -> Result<()> {
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(read_ahead(self.projection.clone(), Position::ZERO, sender));
        let mut ahead = Some(receiver);
        loop {
            self.check_lock().await?;
            let read = match &mut ahead {
                Some(receiver) => receiver.recv().await,
                None => None,
            };
            let step = match read {
                Some(Ok(read)) => self.projection.step_read_ahead(Target::Generation(generation), read).await?,
                Some(Err(error)) => {
                    tracing::warn!(%error, "rebuild: reading ahead failed; going on step by step");
                    None
                }
                None => None,
            };
            let step = match step {
                Some(step) if !step.blocked => step,
                stopped => {
                    if let Some(stopped) = stopped {
                        self.took(stopped, counts, false).await;
                    }
                    ahead = None;
                    catch_up_step(self.projection, generation).await?
                }
            };
            let more = step.more;
            self.took(step, counts, false).await;
            failpoint("rebuild.after_step");
            if !more {
                return Ok(());
            }
        }
    }

    /// Fills step by step from where the generation is, until a read comes back short.
    async fn fill_after(&mut self, generation: i32, counts: &mut Counts) -> Result<()> {
        loop {
            self.check_lock().await?;
            let step = catch_up_step(self.projection, generation).await?;
            let more = step.more;
            self.took(step, counts, false).await;
            if !more {
                return Ok(());
            }
        }
    }

    /// The flip: holds the projection row so that live steps wait, applies what arrived meanwhile (a few steps at
    /// most), and switches. `None`, and nothing switched, when more arrived than those steps cover.
    async fn flip(&mut self, active: i32, generation: i32, counts: &mut Counts) -> Result<Option<(Position, usize)>> {
        self.check_lock().await?;
        let mut flip = self.pool.begin().await?;
        let current: i32 = sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1 FOR UPDATE")
            .bind(PROJECTION)
            .fetch_one(&mut *flip)
            .await?;
        anyhow::ensure!(current == active, "another rebuild flipped the projection meanwhile");
        let mut flip_events = 0;
        let mut caught_up = None;
        for _ in 0..FLIP_STEPS {
            let step = catch_up_step(self.projection, generation).await?;
            flip_events += step.applied;
            let done = (!step.more && step.applied == 0).then_some(step.checkpoint);
            self.took(step, counts, true).await;
            if done.is_some() {
                caught_up = done;
                break;
            }
        }
        let Some(checkpoint) = caught_up else {
            flip.rollback().await?;
            self.publish(counts).await;
            tracing::info!(flip_events, "rebuild: the log grew faster than the flip's steps; filling again");
            return Ok(None);
        };
        // Checked again at the last moment: a rebuild that lost its lock may have a successor filling the next
        // generation, which this flip would swap in half-filled or swap out.
        self.check_lock().await?;
        sqlx::query("UPDATE projections SET active_generation = $2 WHERE name = $1")
            .bind(PROJECTION)
            .bind(generation)
            .execute(&mut *flip)
            .await?;
        flip.commit().await.context("flip the active generation")?;
        self.publish(counts).await;
        Ok(Some((checkpoint, flip_events)))
    }

    /// Counts a step, and publishes what it dead-lettered unless the flip's transaction is open (no network call
    /// inside a transaction: the flip's are published after it).
    async fn took(&self, step: Step, counts: &mut Counts, in_flip: bool) {
        counts.events += step.applied;
        counts.batched += step.batched;
        counts.dead_lettered.extend(step.dead_lettered);
        if !in_flip {
            self.publish(counts).await;
        }
    }

    async fn publish(&self, counts: &mut Counts) {
        self.dead_letters.publish(&std::mem::take(&mut counts.dead_lettered)).await;
    }

    async fn check_lock(&mut self) -> Result<()> {
        self.lock.check().await.context("the rebuild lost its lock (its connection); stopping before it writes more")
    }
}

/// Reads the log after `after` batch by batch, one ahead of the steps that apply them, until a read comes back
/// short or the rebuild stops listening.
async fn read_ahead(projection: Projection, mut after: Position, out: mpsc::Sender<Result<ReadAhead>>) {
    loop {
        let read = projection.read_ahead(after).await;
        let next = read.as_ref().ok().and_then(ReadAhead::next);
        if out.send(read).await.is_err() {
            return;
        }
        match next {
            Some(next) => after = next,
            None => return,
        }
    }
}

/// One step of the new generation. A step held back by a failing event is retried for a while, and then the
/// rebuild gives up: flipping to a generation that stopped short would hide users.
async fn catch_up_step(projection: &Projection, generation: i32) -> Result<Step> {
    for _ in 0..20 {
        let step = projection.step(Target::Generation(generation), &[]).await?;
        if !step.blocked {
            return Ok(step);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("an event keeps failing to apply (see projection_failures); the rebuild stops before the flip")
}

/// Deletes every generation but `keep`: its rows a few thousand at a time (a long delete would hold the horizon
/// back), its failures and its checkpoint. True when there was something to delete.
async fn delete_inactive_generations(pool: &PgPool, keep: i32) -> Result<bool> {
    let mut deleted = 0;
    for table in [
        "DELETE FROM users_read_rows WHERE ctid IN (SELECT ctid FROM users_read_rows WHERE generation <> $1 LIMIT 5000)",
        "DELETE FROM registration_failures_rows WHERE ctid IN \
         (SELECT ctid FROM registration_failures_rows WHERE generation <> $1 LIMIT 5000)",
    ] {
        loop {
            let rows = sqlx::query(table).bind(keep).execute(pool).await?.rows_affected();
            deleted += rows;
            if rows == 0 {
                break;
            }
        }
    }
    for table in [
        "DELETE FROM projection_failures WHERE projection = $2 AND generation <> $1",
        "DELETE FROM projection_checkpoints WHERE projection = $2 AND generation <> $1",
    ] {
        deleted += sqlx::query(table).bind(keep).bind(PROJECTION).execute(pool).await?.rows_affected();
    }
    Ok(deleted > 0)
}
