//! `kiroku-projector`: consumes the Redis stream and keeps the read models.

pub mod config;

use anyhow::Context;
use kiroku_platform::{connect_postgres, connect_redis, shutdown_signal};

/// Runs the projector until SIGTERM or Ctrl-C.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let pool = connect_postgres(&settings.database_url, 8).await?;
    if settings.migrate {
        kiroku_event_store::migrate(&pool).await.context("apply migrations")?;
    }
    let redis = connect_redis(&settings.redis_url).await?;
    tracing::info!(prefix = %settings.redis_prefix, "kiroku-projector started");
    shutdown_signal().await;
    pool.close().await;
    let _ = fred::prelude::ClientLike::quit(&redis).await;
    Ok(())
}
