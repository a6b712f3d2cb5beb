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
use crate::dead_letters::DeadLetterStream;
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
        let pool = open_database(&settings.database_url, 8, settings.migrate.as_ref()).await?;
        let redis = connect_redis(&settings.redis_url).await?;
        let reader = connect_redis(&settings.redis_url).await?;
        let listener = TcpListener::bind(settings.health_addr)
            .await
            .with_context(|| format!("listen on {}", settings.health_addr))?;
        kiroku_vault::Vault::new(kiroku_event_store::EventStore::new(pool.clone()), settings.master_keys.clone())
            .check()
            .await
            .context("KIROKU_MASTER_KEY does not open the data keys in the database")?;
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
        let projection = Projection::new(pool.clone(), settings.max_attempts, settings.master_keys.clone());
        let dead_letters = DeadLetterStream::new(redis.clone(), &settings.redis_prefix);
        // What a killed rebuild left would keep rows (personal data among them) that nobody reads.
        if let Err(error) = crate::rebuild::drop_abandoned_generations(&pool, &projection, &dead_letters).await {
            tracing::warn!(error = format!("{error:#}"), "could not drop the generations that no rebuild owns");
        }
        let consumer = Consumer::new(
            projection.clone(),
            redis.clone(),
            reader.clone(),
            dead_letters,
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
        // The consumer closed its reader when it left (see `Consumer::run`), unless it never got that far.
        if reader.is_connected() {
            let _ = reader.quit().await;
        }
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
/// seen the horizon stand still with events committed above it: a lower bound, from the first sample that saw it.
/// Under load the horizon moves all the time while something is always above it, so only a horizon that does
/// not move counts as a stall.
#[derive(Default)]
struct StallClock {
    /// The horizon last seen held back, and since when.
    held: Option<(kiroku_event_store::Position, tokio::time::Instant)>,
}

impl StallClock {
    fn seconds(&mut self, status: &crate::projection::Status) -> f64 {
        self.seconds_at(&status.lag, tokio::time::Instant::now())
    }

    fn seconds_at(&mut self, lag: &kiroku_event_store::Lag, now: tokio::time::Instant) -> f64 {
        if lag.undeliverable_events == 0 {
            self.held = None;
            return lag.oldest_transaction_seconds.unwrap_or(0.0);
        }
        let since = match self.held {
            Some((horizon, since)) if horizon == lag.horizon => since,
            _ => now,
        };
        self.held = Some((lag.horizon, since));
        lag.oldest_transaction_seconds.unwrap_or_else(|| now.duration_since(since).as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kiroku_event_store::{Lag, Position};

    use super::StallClock;

    fn lag(horizon: u64, undeliverable: u64) -> Lag {
        Lag {
            horizon: Position::new(horizon),
            events: 0,
            oldest_committed_at: None,
            undeliverable_events: undeliverable,
            oldest_transaction_seconds: None,
        }
    }

    #[test]
    fn a_stall_is_a_horizon_that_stands_still_with_events_above_it() {
        let start = tokio::time::Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut clock = StallClock::default();
        // Steady load: always something above the horizon, but the horizon moves every sample.
        for second in 0..5 {
            assert_eq!(clock.seconds_at(&lag(100 + second, 3), at(second)), 0.0);
        }
        // The horizon stops at 200 while events pile up above it.
        assert_eq!(clock.seconds_at(&lag(200, 3), at(10)), 0.0);
        assert_eq!(clock.seconds_at(&lag(200, 9), at(13)), 3.0);
        // It moves on: the clock starts again; nothing above it: no stall.
        assert_eq!(clock.seconds_at(&lag(300, 1), at(14)), 0.0);
        assert_eq!(clock.seconds_at(&lag(300, 0), at(20)), 0.0);
        // When PostgreSQL tells the transaction's age, that is the answer.
        let known = Lag { oldest_transaction_seconds: Some(42.0), ..lag(300, 1) };
        assert_eq!(clock.seconds_at(&known, at(21)), 42.0);
    }
}
