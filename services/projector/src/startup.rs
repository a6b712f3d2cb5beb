//! Building and running `kiroku-projector`.

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_platform::{Shutdown, connect_postgres, connect_redis};
use sqlx::PgPool;

use crate::config::Settings;

pub struct Application {
    pool: PgPool,
    redis: Client,
    settings: Settings,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application> {
        let pool = connect_postgres(&settings.database_url, 8).await?;
        if settings.migrate {
            kiroku_event_store::migrate(&pool).await.context("apply migrations")?;
        }
        let redis = connect_redis(&settings.redis_url).await?;
        Ok(Application { pool, redis, settings })
    }

    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        tracing::info!(prefix = %self.settings.redis_prefix, "kiroku-projector started");
        shutdown.wait().await;
        self.pool.close().await;
        let _ = self.redis.quit().await;
        Ok(())
    }
}
