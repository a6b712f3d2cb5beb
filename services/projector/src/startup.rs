//! Building and running `kiroku-projector`: the consumer, a health endpoint, and a lag report.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_platform::grpc::GrpcServer;
use kiroku_platform::health::Dependencies;
use kiroku_platform::{Shutdown, connect_redis, open_database};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::consumer::{Consumer, ConsumerSettings};
use crate::projection::Projection;

/// The name under which the projector reports its health.
pub const SERVICE_NAME: &str = "kiroku.projector";

pub struct Application {
    pool: PgPool,
    redis: Client,
    reader: Client,
    listener: TcpListener,
    settings: Settings,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application> {
        let pool = open_database(&settings.database_url, 8, settings.migrate.as_deref()).await?;
        let redis = connect_redis(&settings.redis_url).await?;
        let reader = connect_redis(&settings.redis_url).await?;
        let listener = TcpListener::bind(settings.health_addr)
            .await
            .with_context(|| format!("listen on {}", settings.health_addr))?;
        Ok(Application { pool, redis, reader, listener, settings })
    }

    pub fn health_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        let Application { pool, redis, reader, listener, settings } = self;
        let projection = Projection::new(pool.clone(), settings.max_attempts);
        let consumer = Consumer::new(
            projection.clone(),
            redis.clone(),
            reader.clone(),
            ConsumerSettings::new(
                &settings.redis_prefix,
                settings.consumer_name.clone(),
                Duration::from_millis(settings.claim_idle_ms),
            ),
        );
        let consumer = tokio::spawn(consumer.run(shutdown.clone()));
        let lag = tokio::spawn(report_lag(projection, shutdown.clone()));

        tracing::info!(
            address = %listener.local_addr()?,
            prefix = %settings.redis_prefix,
            consumer = %settings.consumer_name,
            "kiroku-projector listening"
        );
        GrpcServer::new()
            .tls(settings.tls.clone())
            .health_entry(SERVICE_NAME)
            .serve(listener, Dependencies { postgres: pool.clone(), redis: Some(redis.clone()) }, shutdown)
            .await?;
        // The consumer finishes the step it is in (its transaction commits or rolls back as a whole).
        let _ = tokio::time::timeout(Duration::from_secs(8), async {
            let _ = consumer.await;
            let _ = lag.await;
        })
        .await;
        pool.close().await;
        let _ = redis.quit().await;
        let _ = reader.quit().await;
        Ok(())
    }
}

/// Logs how far behind the projection is, every 10 s while it is behind.
async fn report_lag(projection: Projection, shutdown: Shutdown) {
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        match projection.status().await {
            Ok(status) => {
                if let Some(lag) = status.lag_seconds.filter(|lag| *lag > 1.0) {
                    tracing::warn!(lag_seconds = lag, checkpoint = %status.checkpoint, "projection is behind");
                }
            }
            Err(error) => tracing::debug!(%error, "cannot read the projection status"),
        }
    }
}
