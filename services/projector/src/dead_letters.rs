//! Dead letters: events that failed to apply too often and were skipped. PostgreSQL (`projection_failures`)
//! holds the record; `{prefix}:events:dead` carries them to whoever watches Redis.

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_event_store::Position;
use kiroku_relay::stream;
use sqlx::PgPool;

use crate::apply::apply;
use crate::projection::{PROJECTION, Projection};

#[derive(Debug, Clone)]
pub struct DeadLetterRow {
    pub position: Position,
    pub attempts: i32,
    pub error: String,
}

pub async fn list(pool: &PgPool) -> Result<Vec<DeadLetterRow>> {
    let rows: Vec<(Position, i32, String)> = sqlx::query_as(
        "SELECT position, attempts, last_error FROM projection_failures \
         WHERE projection = $1 AND dead_lettered ORDER BY position",
    )
    .bind(PROJECTION)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(position, attempts, error)| DeadLetterRow { position, attempts, error }).collect())
}

/// Applies every dead letter again, in position order, to the active generation. Those that now apply leave the
/// list (and the dead-letter stream); the others stay, with their new error.
pub async fn replay(pool: &PgPool, projection: &Projection, redis: &Client, dead_key: &str) -> Result<(usize, usize)> {
    let (mut replayed, mut failed) = (0, 0);
    for row in list(pool).await? {
        let Some(event) = projection.store().read_event(row.position).await? else { continue };
        let mut tx = pool.begin().await?;
        let generation: i32 = sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = $1 FOR SHARE")
            .bind(PROJECTION)
            .fetch_one(&mut *tx)
            .await?;
        match apply(&mut tx, generation, &event).await {
            Ok(()) => {
                sqlx::query("DELETE FROM projection_failures WHERE projection = $1 AND position = $2")
                    .bind(PROJECTION)
                    .bind(row.position)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                remove_from_stream(redis, dead_key, row.position).await?;
                replayed += 1;
            }
            Err(error) => {
                tx.rollback().await?;
                sqlx::query("UPDATE projection_failures SET last_error = $3, updated_at = now() WHERE projection = $1 AND position = $2")
                    .bind(PROJECTION)
                    .bind(row.position)
                    .bind(error.to_string())
                    .execute(pool)
                    .await?;
                failed += 1;
            }
        }
    }
    Ok((replayed, failed))
}

async fn remove_from_stream(redis: &Client, key: &str, position: Position) -> Result<()> {
    let entries: Vec<(String, std::collections::HashMap<String, String>)> =
        redis.xrange(key, "-", "+", None).await.context("read the dead-letter stream")?;
    let ids: Vec<String> = entries
        .into_iter()
        .filter(|(_, fields)| stream::entry_position(fields) == Some(position))
        .map(|(id, _)| id)
        .collect();
    if !ids.is_empty() {
        let _: i64 = redis.xdel(key, ids).await.context("XDEL a replayed dead letter")?;
    }
    Ok(())
}
