//! `kiroku projector …`: rebuild, status and dead letters, against DATABASE_URL (and REDIS_URL for replays).

use anyhow::Context;
use anyhow::Result;
use kiroku_platform::config::{self, Environment, exit_on_config_error};
use kiroku_projector::dead_letters::{self, DeadLetterStream};
use kiroku_projector::{Projection, rebuild};
use serde_json::json;

use crate::{DeadLetterAction, ProjectorAction};

pub(crate) async fn run(action: ProjectorAction) -> Result<()> {
    let url = config::database_url(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku projector", &e));
    let pool = kiroku_platform::connect_postgres(&url, 4).await?;
    // A rebuild meets the same failing events as the live projector and dead-letters them the same way.
    let max_attempts = config::positive(&Environment, &kiroku_projector::config::MAX_ATTEMPTS)
        .unwrap_or_else(|e| exit_on_config_error("kiroku projector", &e));
    let master_keys =
        kiroku_vault::master_keys(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku projector", &e));
    let projection = Projection::new(pool.clone(), max_attempts, master_keys);
    projection.vault().check().await.context("KIROKU_MASTER_KEY does not open the data keys in the database")?;
    // Dead letters go to `{prefix}:events:dead`, like the live projector's.
    let dead_letters = || async {
        let redis_url =
            config::redis_url(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku projector", &e));
        let prefix =
            config::redis_prefix(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku projector", &e));
        let redis = kiroku_platform::connect_redis(&redis_url).await?;
        anyhow::Ok(DeadLetterStream::new(redis, &prefix))
    };
    match action {
        ProjectorAction::Rebuild => {
            let rebuilt = rebuild::rebuild(&pool, &projection, &dead_letters().await?).await?;
            println!(
                "{}",
                json!({
                    "generation": rebuilt.generation,
                    "checkpoint": rebuilt.checkpoint.get(),
                    "events": rebuilt.events,
                    "batched": rebuilt.batched,
                    "flip_events": rebuilt.flip_events,
                    "seconds": rebuilt.seconds,
                    "events_per_sec": (rebuilt.events as f64 / rebuilt.seconds.max(1e-9)).round(),
                })
            );
        }
        ProjectorAction::Status => {
            let status = projection.status().await?;
            println!(
                "{}",
                json!({
                    "generation": status.generation,
                    "checkpoint": status.checkpoint.get(),
                    "head": status.head.get(),
                    "lag_events": status.lag.events,
                    "lag_seconds": status.lag_seconds,
                    // Committed but not yet deliverable to any reader, and the age of the oldest open transaction
                    // (the one holding the horizon back): "caught up" with a growing backlog here is a stall.
                    "undeliverable_events": status.lag.undeliverable_events,
                    "oldest_transaction_seconds": status.lag.oldest_transaction_seconds,
                    "from_stream": status.from_stream,
                    "from_store": status.from_store,
                    "dead_letters": status.dead_letters,
                    "parked_events": status.parked_events,
                    "parked_aggregates": status.parked_aggregates,
                })
            );
        }
        ProjectorAction::DeadLetters { action: DeadLetterAction::List } => {
            for row in dead_letters::list(&pool).await? {
                println!(
                    "{}",
                    json!({
                        "position": row.position.get(),
                        "aggregate_id": row.aggregate_id,
                        "state": row.state,
                        "attempts": row.attempts,
                        "error": row.error,
                    })
                );
            }
        }
        ProjectorAction::DeadLetters { action: DeadLetterAction::Replay } => {
            let (replayed, failed) = dead_letters::replay(&pool, &projection, &dead_letters().await?).await?;
            println!("{}", json!({ "replayed": replayed, "still_failing": failed }));
        }
    }
    Ok(())
}
