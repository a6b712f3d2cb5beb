//! Building and running `kiroku-query`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku::v1::query_service_server::QueryServiceServer;
use kiroku_event_store::EventStore;
use kiroku_platform::auth::{Jwks, TokenVerifier, http_client};
use kiroku_platform::caller::CallerAuth;
use kiroku_platform::grpc::GrpcServer;
use kiroku_platform::health::Dependencies;
use kiroku_platform::metrics::{MetricsEndpoint, sample_pool};
use kiroku_platform::{Shutdown, connect_redis, open_database};
use kiroku_vault::Vault;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::grpc::QueryGrpc;
use crate::read_models::ReadModels;
use crate::watch::Watcher;

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    pool: PgPool,
    redis: Client,
    settings: Settings,
    metrics: Option<MetricsEndpoint>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application> {
        let metrics = MetricsEndpoint::bind(settings.metrics_addr).await?;
        crate::watch::describe_metrics();
        let pool =
            open_database(&settings.database_url, crate::config::POOL_CONNECTIONS, settings.migrate.as_ref()).await?;
        let redis = connect_redis(&settings.redis_url).await?;
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("listen on {}", settings.listen_addr))?;
        let local_addr = listener.local_addr().context("read the bound address")?;
        Ok(Application { listener, local_addr, pool, redis, settings, metrics })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `GET /metrics` is served; `None` when metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        let Application { listener, local_addr, pool, redis, settings, metrics } = self;
        if let Some(metrics) = metrics {
            metrics.spawn(shutdown.clone());
            tokio::spawn(sample_pool(pool.clone(), Duration::from_secs(5), shutdown.clone()));
        }
        let store = EventStore::new(pool.clone());
        let vault = Vault::new(store.clone(), settings.master_keys.clone());
        vault.check().await.context("KIROKU_MASTER_KEY does not open the data keys in the database")?;
        let watcher = Watcher::start(store.clone(), vault.clone(), settings.watch, shutdown.clone()).await?;
        let read_models = ReadModels::listen(pool.clone(), shutdown.clone()).await;
        let queries = QueryGrpc::new(read_models, store, vault, watcher);
        let jwks = Jwks::new(settings.tenant.jwks_url.clone(), http_client()?);
        let verifier = TokenVerifier::new(jwks, settings.tenant.issuer.clone(), settings.api_audience.clone());
        tracing::info!(address = %local_addr, "kiroku-query listening");
        GrpcServer::new()
            .tls(settings.tls.clone())
            .limits(settings.limits)
            .callers(CallerAuth::new(verifier))
            .add_service(QueryServiceServer::new(queries))
            .serve(listener, Dependencies { postgres: pool.clone(), redis: Some(redis.clone()) }, shutdown)
            .await?;
        pool.close().await;
        let _ = redis.quit().await;
        Ok(())
    }
}
