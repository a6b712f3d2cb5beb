//! `grpc.health.v1` driven by probes: the `""` entry and each named service go NOT_SERVING while a dependency
//! (PostgreSQL, and Redis for the query side) does not answer, and for good once shutdown begins.

use std::time::Duration;

use fred::prelude::*;
use sqlx::PgPool;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

use crate::Shutdown;

/// What a health probe checks.
#[derive(Clone, Debug)]
pub struct Dependencies {
    pub postgres: PgPool,
    pub redis: Option<Client>,
}

impl Dependencies {
    /// True when every dependency answers within a second (and `kiroku_postgres_up`, `kiroku_redis_up` say which).
    pub async fn all_reachable(&self) -> bool {
        let postgres = async {
            matches!(
                tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(&self.postgres)).await,
                Ok(Ok(_))
            )
        };
        let redis = async {
            match &self.redis {
                None => true,
                Some(client) => {
                    matches!(tokio::time::timeout(Duration::from_secs(1), client.ping::<String>(None)).await, Ok(Ok(_)))
                }
            }
        };
        let (postgres, redis) = tokio::join!(postgres, redis);
        metrics::gauge!("kiroku_postgres_up").set(f64::from(u8::from(postgres)));
        if self.redis.is_some() {
            metrics::gauge!("kiroku_redis_up").set(f64::from(u8::from(redis)));
        }
        postgres && redis
    }
}

/// The `grpc.health.v1` service for `services`, its entries set by a first probe before it returns (a caller
/// that checks a service's own entry right after start-up gets SERVING or NOT_SERVING, never "not registered"),
/// then kept up to date every second until shutdown (see [`report_health`]).
pub async fn health_service(
    services: Vec<&'static str>,
    dependencies: Dependencies,
    shutdown: Shutdown,
) -> (HealthServer<impl Health>, tokio::task::JoinHandle<()>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let first = status_of(&dependencies).await;
    set_all(&reporter, &services, first).await;
    let probe =
        tokio::spawn(report_health(reporter, services, dependencies, Some(first), Duration::from_secs(1), shutdown));
    (service, probe)
}

async fn status_of(dependencies: &Dependencies) -> ServingStatus {
    if dependencies.all_reachable().await { ServingStatus::Serving } else { ServingStatus::NotServing }
}

/// Sets `""` and `services` to SERVING or NOT_SERVING every `interval` until shutdown, then NOT_SERVING;
/// `last` is what they were set to already.
async fn report_health(
    reporter: HealthReporter,
    services: Vec<&'static str>,
    dependencies: Dependencies,
    mut last: Option<ServingStatus>,
    interval: Duration,
    shutdown: Shutdown,
) {
    if last == Some(ServingStatus::NotServing) {
        tracing::warn!("a dependency is unreachable: health is NOT_SERVING");
    }
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            () = tokio::time::sleep(interval) => {}
        }
        let status = status_of(&dependencies).await;
        if last != Some(status) {
            if status == ServingStatus::NotServing {
                tracing::warn!("a dependency is unreachable: health is NOT_SERVING");
            } else if last.is_some() {
                tracing::info!("dependencies reachable again: health is SERVING");
            }
            set_all(&reporter, &services, status).await;
            last = Some(status);
        }
    }
    set_all(&reporter, &services, ServingStatus::NotServing).await;
}

async fn set_all(reporter: &HealthReporter, services: &[&'static str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
}
