//! Dead letters: events that failed to apply too often and were skipped, and the later events of their
//! aggregates, parked behind them. PostgreSQL (`projection_failures`) holds the record; `{prefix}:events:dead`
//! carries the dead letters to whoever watches Redis.

use std::collections::HashSet;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_event_store::Position;
use kiroku_relay::stream::{self, DeadLetterEntry};
use sqlx::PgPool;
use uuid::Uuid;

use crate::apply::apply;
use crate::projection::{DeadLetter, PROJECTION, Projection};

/// `{prefix}:events:dead`, where dead letters are published for whoever watches Redis. PostgreSQL's
/// `projection_failures` stays the record: a dead letter that cannot be published is logged, not lost.
#[derive(Clone)]
pub struct DeadLetterStream {
    redis: Client,
    key: String,
}

impl DeadLetterStream {
    pub fn new(redis: Client, prefix: &str) -> Self {
        DeadLetterStream { redis, key: stream::dead_letters_key(prefix) }
    }

    /// Publishes what a step dead-lettered, as stored (sealed).
    pub(crate) async fn publish(&self, dead: &[DeadLetter]) {
        for letter in dead {
            let entry = DeadLetterEntry {
                projection: PROJECTION.to_owned(),
                generation: letter.generation,
                event: letter.event.clone(),
                attempts: letter.attempts,
                error: letter.error.clone(),
            };
            let added: Result<String, _> = self.redis.xadd(&self.key, false, None, "*", entry.encode()).await;
            if let Err(error) = added {
                // The failure row in PostgreSQL stays the record; `kiroku projector dead-letters` lists it.
                tracing::warn!(%error, position = %letter.event.position, "could not publish a dead letter");
            }
        }
    }

    /// Removes every entry that is not a dead letter of generation `keep` in PostgreSQL: those of generations that
    /// were replaced or dropped (a rebuild's), and those of events replayed since. Run once the other generations'
    /// rows are gone.
    pub(crate) async fn keep_only(&self, pool: &PgPool, keep: i32) -> Result<()> {
        let dead: HashSet<Position> = sqlx::query_scalar(
            "SELECT position FROM projection_failures WHERE projection = $1 AND generation = $2 AND state = 'dead'",
        )
        .bind(PROJECTION)
        .bind(keep)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let entries: Vec<(String, std::collections::HashMap<String, String>)> =
            self.redis.xrange(&self.key, "-", "+", None).await.context("read the dead-letter stream")?;
        let doomed: Vec<String> = entries
            .into_iter()
            .filter(|(_, fields)| {
                let generation = fields.get("generation").and_then(|g| g.parse::<i32>().ok());
                // Entries from before generations were recorded name none: kept while their event is dead here.
                generation.is_some_and(|g| g != keep)
                    || stream::entry_position(fields).is_none_or(|p| !dead.contains(&p))
            })
            .map(|(id, _)| id)
            .collect();
        if !doomed.is_empty() {
            let _: i64 =
                self.redis.xdel(&self.key, doomed).await.context("XDEL dead letters of a replaced generation")?;
        }
        Ok(())
    }

    /// Removes the entries of a replayed dead letter.
    async fn remove(&self, position: Position) -> Result<()> {
        let entries: Vec<(String, std::collections::HashMap<String, String>)> =
            self.redis.xrange(&self.key, "-", "+", None).await.context("read the dead-letter stream")?;
        let ids: Vec<String> = entries
            .into_iter()
            .filter(|(_, fields)| stream::entry_position(fields) == Some(position))
            .map(|(id, _)| id)
            .collect();
        if !ids.is_empty() {
            let _: i64 = self.redis.xdel(&self.key, ids).await.context("XDEL a replayed dead letter")?;
        }
        Ok(())
    }
}

/// A dead letter (`state` "dead") or an event parked behind one ("parked"), in the active generation.
#[derive(Debug, Clone)]
pub struct DeadLetterRow {
    pub position: Position,
    pub aggregate_id: Uuid,
    pub state: String,
    pub attempts: i32,
    pub error: String,
}

pub async fn list(pool: &PgPool) -> Result<Vec<DeadLetterRow>> {
    let rows: Vec<(Position, Uuid, String, i32, String)> = sqlx::query_as(
        "SELECT f.position, f.aggregate_id, f.state, f.attempts, f.last_error FROM projection_failures f \
         JOIN projections p ON p.name = f.projection AND p.active_generation = f.generation \
         WHERE f.projection = $1 AND f.state <> 'failing' ORDER BY f.position",
    )
    .bind(PROJECTION)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(position, aggregate_id, state, attempts, error)| DeadLetterRow {
            position,
            aggregate_id,
            state,
            attempts,
            error,
        })
        .collect())
}

/// Applies every dead letter and parked event again, aggregate by aggregate in position order, to the active
/// generation. Those that now apply leave the list (and the dead-letter stream); an aggregate stops at its first
/// event that still fails, which keeps its new error, and its later events stay parked behind it. Passes repeat
/// while they make progress, so that events parked during a pass are replayed too.
pub async fn replay(pool: &PgPool, projection: &Projection, dead_letters: &DeadLetterStream) -> Result<(usize, usize)> {
    let (mut replayed, mut failed) = (0, 0);
    loop {
        let (mut progress, mut stuck) = (0, HashSet::new());
        for row in list(pool).await? {
            if stuck.contains(&row.aggregate_id) {
                continue;
            }
            let Some(event) = projection.store().read_event(row.position).await? else { continue };
            let mut opened = vec![event];
            if let Some(unopened) = projection.vault().open_what_opens(&mut opened).await?.pop() {
                // Its data key still does not unwrap: it stays a dead letter, with why.
                note_still_failing(pool, row.position, &unopened.reason).await?;
                stuck.insert(row.aggregate_id);
                failed += 1;
                continue;
            }
            let Some(event) = opened.pop() else { continue };
            // Locked like a live step (the generation, then its checkpoint row): a step that read the parked
            // aggregates before this replay finishes first, and one after it sees the aggregate unparked.
            let mut tx = pool.begin().await?;
            let generation: i32 =
                sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1 FOR SHARE")
                    .bind(PROJECTION)
                    .fetch_one(&mut *tx)
                    .await?;
            sqlx::query("SELECT 1 FROM projection_checkpoints WHERE projection = $1 AND generation = $2 FOR UPDATE")
                .bind(PROJECTION)
                .bind(generation)
                .execute(&mut *tx)
                .await?;
            match apply(&mut tx, generation, &event).await {
                Ok(()) => {
                    sqlx::query(
                        "DELETE FROM projection_failures WHERE projection = $1 AND generation = $2 AND position = $3",
                    )
                    .bind(PROJECTION)
                    .bind(generation)
                    .bind(row.position)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    if row.state == "dead" {
                        dead_letters.remove(row.position).await?;
                    }
                    progress += 1;
                }
                Err(error) => {
                    tx.rollback().await?;
                    note_still_failing(pool, row.position, &error.to_string()).await?;
                    stuck.insert(row.aggregate_id);
                    failed += 1;
                }
            }
        }
        replayed += progress;
        if progress == 0 {
            return Ok((replayed, failed));
        }
        failed = 0;
    }
}

/// Records why a replayed dead letter (of the active generation) still fails.
async fn note_still_failing(pool: &PgPool, position: Position, error: &str) -> Result<()> {
    sqlx::query(
        "UPDATE projection_failures f SET last_error = $3, updated_at = now() FROM projections p \
         WHERE f.projection = $1 AND p.name = f.projection AND f.generation = p.active_generation AND f.position = $2",
    )
    .bind(PROJECTION)
    .bind(position)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
