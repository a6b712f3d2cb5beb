//! Building and running `kiroku-query`.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku::v1::query_service_server::QueryServiceServer;
use kiroku_event_store::EventStore;
use kiroku_platform::grpc::GrpcServer;
use kiroku_platform::health::Dependencies;
use kiroku_platform::{Shutdown, connect_redis, open_database};
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
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application> {
        let pool = open_database(&settings.database_url, 32, settings.migrate).await?;
        let redis = connect_redis(&settings.redis_url).await?;
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("listen on {}", settings.listen_addr))?;
        let local_addr = listener.local_addr().context("read the bound address")?;
        Ok(Application { listener, local_addr, pool, redis, settings })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        let Application { listener, local_addr, pool, redis, settings } = self;
        let store = EventStore::new(pool.clone());
        let watcher = Watcher::start(store.clone(), settings.watch, shutdown.clone()).await?;
        let read_models = ReadModels::listen(pool.clone(), shutdown.clone()).await;
        let queries = QueryGrpc::new(read_models, store, watcher);
        tracing::info!(address = %local_addr, "kiroku-query listening");
        GrpcServer::new()
            .add_service(QueryServiceServer::new(queries))
            .serve(listener, Dependencies { postgres: pool.clone(), redis: Some(redis.clone()) }, shutdown)
            .await?;
        pool.close().await;
        let _ = redis.quit().await;
        Ok(())
    }
}
