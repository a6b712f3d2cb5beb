//! Building and running `kiroku-projector`: the consumer, a health endpoint, metrics, and a lag report.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_platform::grpc::GrpcServer;
use kiroku_platform::health::Dependencies;
use kiroku_platform::metrics::{MetricsEndpoint, sample_pool};
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
    metrics: Option<MetricsEndpoint>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application> {
        let metrics = MetricsEndpoint::bind(settings.metrics_addr).await?;
        crate::describe_metrics();
        let pool = open_database(&settings.database_url, 8, settings.migrate.as_deref()).await?;
        let redis = connect_redis(&settings.redis_url).await?;
        let reader = connect_redis(&settings.redis_url).await?;
        let listener = TcpListener::bind(settings.health_addr)
            .await
            .with_context(|| format!("listen on {}", settings.health_addr))?;
        Ok(Application { pool, redis, reader, listener, settings, metrics })
    }

    pub fn health_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Where `GET /metrics` is served; `None` when metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        let Application { pool, redis, reader, listener, settings, metrics } = self;
        if let Some(metrics) = metrics {
            metrics.spawn(shutdown.clone());
            tokio::spawn(sample_pool(pool.clone(), Duration::from_secs(5), shutdown.clone()));
        }
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
        let lag = tokio::spawn(report_status(projection, shutdown.clone()));

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

/// Samples the projection's status every second into the metrics (the figures `kiroku projector status`
/// prints), and logs how far behind it is every 10 s while it is behind.
async fn report_status(projection: Projection, shutdown: Shutdown) {
    let mut stall = StallClock::default();
    let mut next_log = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match projection.status().await {
            Ok(status) => {
                crate::record_status(&status, stall.seconds(&status));
                if tokio::time::Instant::now() >= next_log {
                    next_log = tokio::time::Instant::now() + Duration::from_secs(10);
                    if let Some(lag) = status.lag_seconds.filter(|lag| *lag > 1.0) {
                        tracing::warn!(lag_seconds = lag, checkpoint = %status.checkpoint, "projection is behind");
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot read the projection status"),
        }
    }
}

/// How long the horizon has been held back. PostgreSQL says when the oldest transaction started only to roles
/// allowed to see it (its owner, superusers, `pg_read_all_stats`); otherwise this is how long this process has
/// seen events committed above the horizon, continuously: a lower bound, from the first sample that saw it.
#[derive(Default)]
struct StallClock {
    since: Option<tokio::time::Instant>,
}

impl StallClock {
    fn seconds(&mut self, status: &crate::projection::Status) -> f64 {
        if status.lag.undeliverable_events == 0 {
            self.since = None;
            return status.lag.oldest_transaction_seconds.unwrap_or(0.0);
        }
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        status.lag.oldest_transaction_seconds.unwrap_or_else(|| since.elapsed().as_secs_f64())
    }
}
