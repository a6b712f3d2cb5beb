//! Building and running `kiroku-command`: connect, migrate, bind, then serve gRPC and run the relay until
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku::v1::command_service_server::CommandServiceServer;
use kiroku_event_store::EventStore;
use kiroku_platform::health::{Dependencies, health_service};
use kiroku_platform::{Shutdown, connect_redis, open_database};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::auth::TokenVerifier;
use crate::commands::Commands;
use crate::config::Settings;
use crate::github::GitHubClient;
use crate::grpc::CommandGrpc;
use crate::relay::Relay;

/// The name under which the command service reports its health.
pub const SERVICE_NAME: &str = "kiroku.v1.CommandService";

/// A command service whose connections are open and whose listener is bound, ready to run.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    store: EventStore,
    redis: Client,
    settings: Settings,
    commands: Arc<Commands>,
}

impl Application {
    /// Connects to PostgreSQL and Redis (retrying for up to 30 s each), applies migrations when
    /// `KIROKU_MIGRATE` says so, and binds the listener (port 0 picks a free one).
    pub async fn build(settings: Settings) -> Result<Application> {
        let pool = open_database(&settings.database_url, 32, settings.migrate).await?;
        let redis = connect_redis(&settings.redis_url).await?;
        let http = http_client()?;
        let commands = Commands::new(
            EventStore::new(pool.clone()),
            TokenVerifier::new(settings.auth0.clone(), http.clone()),
            GitHubClient::new(settings.github.clone(), http),
        );
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("listen on {}", settings.listen_addr))?;
        let local_addr = listener.local_addr().context("read the bound address")?;
        Ok(Application {
            listener,
            local_addr,
            store: EventStore::new(pool),
            redis,
            settings,
            commands: Arc::new(commands),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` fires: health goes NOT_SERVING, the server stops taking calls and lets in-flight
    /// ones finish, and the relay stops after its current step.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        let Application { listener, local_addr, store, redis, settings, commands } = self;
        let (health_service, health) = health_service(
            vec![SERVICE_NAME],
            Dependencies { postgres: store.pool().clone(), redis: None },
            shutdown.clone(),
        );
        let relay =
            tokio::spawn(Relay::new(store.clone(), redis.clone(), settings.relay.clone()).run(shutdown.clone()));

        let (reflection_v1, reflection_v1alpha) = kiroku_platform::grpc::reflection()?;

        tracing::info!(address = %local_addr, "kiroku-command listening");
        let stopping = shutdown.clone();
        kiroku_platform::grpc::server()
            .add_service(health_service)
            .add_service(CommandServiceServer::new(CommandGrpc::new(commands)))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move { stopping.wait().await })
            .await
            .context("serve gRPC")?;

        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = relay.await;
            let _ = health.await;
        })
        .await;
        store.pool().close().await;
        let _ = redis.quit().await;
        tracing::info!("kiroku-command stopped");
        Ok(())
    }
}

/// One HTTP client for JWKS and GitHub: connection pooling, rustls with ring, no redirects to other hosts.
fn http_client() -> Result<reqwest::Client> {
    // reqwest is built without a default crypto provider; ring is installed once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("build the HTTP client")
}
