//! `kiroku projector rebuild`: fills a fresh generation of the read models from the event store in short
//! transactions (an open transaction holds back every reader of the log), then flips the active generation in one
//! short transaction. Queries read the old generation until the flip and the new one after it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiroku_event_store::Position;
use sqlx::PgPool;

use tokio::sync::mpsc;

use crate::projection::{PROJECTION, Projection, ReadAhead, Step, Target};

/// What a rebuild did.
#[derive(Debug)]
pub struct Rebuilt {
    pub generation: i32,
    pub checkpoint: Position,
    pub events: usize,
    pub seconds: f64,
}

/// Rebuilds the projection. One rebuild at a time: a second one, while the first runs, fails at once (it would
/// otherwise read the active generation the first is about to flip, and empty it).
pub async fn rebuild(pool: &PgPool, projection: &Projection) -> Result<Rebuilt> {
    let mut lock = projection.store().leader_lock(&format!("rebuild:{PROJECTION}")).await?;
    anyhow::ensure!(lock.try_acquire().await?, "another rebuild of the {PROJECTION} projection is running");
    let rebuilt = rebuild_alone(pool, projection).await;
    lock.release().await;
    rebuilt
}

async fn rebuild_alone(pool: &PgPool, projection: &Projection) -> Result<Rebuilt> {
    let started = Instant::now();
    let active: i32 = sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1")
        .bind(PROJECTION)
        .fetch_one(pool)
        .await
        .context("read the active generation")?;
    let generation = active + 1;
    // A rebuild that died half-way, or between its flip and dropping the old generation, left rows behind: every
    // generation but the active one is removed before this one starts afresh.
    delete_inactive_generations(pool, active).await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, generation, position) VALUES ($1, $2, 0) \
         ON CONFLICT (projection, generation) DO UPDATE SET position = 0, updated_at = now()",
    )
    .bind(PROJECTION)
    .bind(generation)
    .execute(pool)
    .await?;

    // Fill until a read comes back short: under steady writes every step finds something new, so waiting for an
    // empty one could tail the log for ever. The flip below catches up the rest while live steps wait.
    // The next batch is read and opened while the step before applies its own. A step that finds its checkpoint
    // elsewhere than its batch was read from (which a step stopped short by a failing event leaves) ends the
    // read-ahead, and the rest goes step by step.
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(read_ahead(projection.clone(), Position::ZERO, sender));
    let mut ahead = Some(receiver);
    let mut events = 0;
    loop {
        let read = match &mut ahead {
            Some(receiver) => receiver.recv().await,
            None => None,
        };
        let step = match read {
            Some(Ok(read)) => projection.step_read_ahead(Target::Generation(generation), read).await?,
            Some(Err(error)) => {
                tracing::warn!(%error, "rebuild: reading ahead failed; going on step by step");
                None
            }
            None => None,
        };
        let step = match step {
            Some(step) if !step.blocked => step,
            stopped => {
                events += stopped.map_or(0, |step| step.applied);
                ahead = None;
                catch_up_step(projection, generation).await?
            }
        };
        events += step.applied;
        if !step.more {
            break;
        }
    }

    // The flip: hold the projection row so that live steps wait, apply what arrived meanwhile, switch.
    let mut flip = pool.begin().await?;
    let current: i32 = sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1 FOR UPDATE")
        .bind(PROJECTION)
        .fetch_one(&mut *flip)
        .await?;
    anyhow::ensure!(current == active, "another rebuild flipped the projection meanwhile");
    let checkpoint = loop {
        let step = catch_up_step(projection, generation).await?;
        events += step.applied;
        if !step.more && step.applied == 0 {
            break step.checkpoint;
        }
    };
    sqlx::query("UPDATE projections SET active_generation = $2 WHERE name = $1")
        .bind(PROJECTION)
        .bind(generation)
        .execute(&mut *flip)
        .await?;
    flip.commit().await.context("flip the active generation")?;

    delete_inactive_generations(pool, generation).await?;
    Ok(Rebuilt { generation, checkpoint, events, seconds: started.elapsed().as_secs_f64() })
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
/// back), its failures and its checkpoint.
async fn delete_inactive_generations(pool: &PgPool, keep: i32) -> Result<()> {
    for table in [
        "DELETE FROM users_read_rows WHERE ctid IN (SELECT ctid FROM users_read_rows WHERE generation <> $1 LIMIT 5000)",
        "DELETE FROM registration_failures_rows WHERE ctid IN \
         (SELECT ctid FROM registration_failures_rows WHERE generation <> $1 LIMIT 5000)",
    ] {
        while sqlx::query(table).bind(keep).execute(pool).await?.rows_affected() > 0 {}
    }
    for table in [
        "DELETE FROM projection_failures WHERE projection = $2 AND generation <> $1",
        "DELETE FROM projection_checkpoints WHERE projection = $2 AND generation <> $1",
    ] {
        sqlx::query(table).bind(keep).bind(PROJECTION).execute(pool).await?;
    }
    Ok(())
}
