//! Building and running `kiroku-query`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku::v1::query_service_server::QueryServiceServer;
use kiroku_event_store::EventStore;
use kiroku_platform::health::{Dependencies, health_service};
use kiroku_platform::{Shutdown, connect_redis, open_database};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Settings;
use crate::grpc::QueryGrpc;
use crate::read_models::ReadModels;
use crate::watch::Watcher;

/// The name under which the query service reports its health.
pub const SERVICE_NAME: &str = "kiroku.v1.QueryService";

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    store: EventStore,
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
        Ok(Application { listener, local_addr, store: EventStore::new(pool), redis, settings })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        let Application { listener, local_addr, store, redis, settings } = self;
        let watcher = Watcher::start(store.clone(), settings.watch, shutdown.clone()).await?;
        let queries = QueryGrpc::new(ReadModels::new(store.pool().clone()), store.clone(), watcher);
        let (health_service, health) = health_service(
            vec![SERVICE_NAME],
            Dependencies { postgres: store.pool().clone(), redis: Some(redis.clone()) },
            shutdown.clone(),
        );
        let (reflection_v1, reflection_v1alpha) = kiroku_platform::grpc::reflection()?;
        tracing::info!(address = %local_addr, "kiroku-query listening");
        let stopping = shutdown.clone();
        kiroku_platform::grpc::server()
            .add_service(health_service)
            .add_service(QueryServiceServer::new(queries))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move { stopping.wait().await })
            .await
            .context("serve gRPC")?;
        let _ = tokio::time::timeout(Duration::from_secs(2), health).await;
        store.pool().close().await;
        let _ = redis.quit().await;
        Ok(())
    }
}
