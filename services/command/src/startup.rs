//! Building and running `kiroku-command`: connect, migrate, bind, then serve gRPC and run the relay until
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku::v1::command_service_server::CommandServiceServer;
use kiroku_event_store::{AppendError, EventStore};
use kiroku_platform::auth::{Jwks, TokenVerifier, http_client};
use kiroku_platform::caller::CallerAuth;
use kiroku_platform::grpc::GrpcServer;
use kiroku_platform::health::Dependencies;
use kiroku_platform::metrics::{MetricsEndpoint, sample_pool};
use kiroku_platform::{Shutdown, connect_redis, open_database};
use kiroku_relay::Relay;
use kiroku_vault::{BlindIndex, Vault};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::commands::Commands;
use crate::config::Settings;
use crate::github::GitHubClient;
use crate::grpc::CommandGrpc;

/// A command service whose connections are open and whose listener is bound, ready to run.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    callers: CallerAuth,
    pool: PgPool,
    redis: Client,
    settings: Settings,
    commands: Arc<Commands>,
    metrics: Option<MetricsEndpoint>,
}

impl Application {
    /// Connects to PostgreSQL and Redis (retrying for up to 30 s each), applies migrations when
    /// `KIROKU_MIGRATE` says so, and binds the listener (port 0 picks a free one).
    pub async fn build(settings: Settings) -> Result<Application> {
        let metrics = MetricsEndpoint::bind(settings.metrics_addr).await?;
        kiroku_event_store::describe_metrics();
        kiroku_relay::describe_metrics();
        let pool = open_database(&settings.database_url, 32, settings.migrate.as_ref()).await?;
        let redis = connect_redis(&settings.redis_url).await?;
        let http = http_client()?;
        // One key cache for both kinds of token kiroku accepts from this tenant.
        let jwks = Jwks::new(settings.tenant.jwks_url.clone(), http.clone());
        let issuer = settings.tenant.issuer.clone();
        let store = EventStore::new(pool.clone());
        if let Err(error @ AppendError::PositionsBehind { .. }) = store.check_positions_ahead().await {
            // The service still starts (its health and the relay stay useful); appends are refused, each with
            // this error, until an operator moves the cluster's transaction ids past the head.
            tracing::error!(%error, "appends will be refused");
        }
        let vault = Vault::new(store.clone(), settings.master_keys.clone());
        vault.check().await.context("KIROKU_MASTER_KEY does not open the data keys in the database")?;
        let index = vault.blind_index().await.context("load the key of the blind index")?;
        // Claims written before keyed hashes are hashed now, before the first registration could miss them.
        let clear = store.hash_clear_claims(BlindIndex::PREFIX, |kind, value| index.hash(kind, value)).await?;
        for duplicate in &clear.duplicates {
            // An identity registered twice, by versions on either side of keyed hashes: left for an operator (erase
            // one of the users), rather than a start-up that fails on it at every restart.
            tracing::error!(
                kind = %duplicate.kind,
                clear_owner = %duplicate.clear_owner,
                hashed_owner = %duplicate.hashed_owner,
                "a claim in clear names an identity that another claim holds hashed; left in clear"
            );
        }
        let hashed = clear.hashed;
        // And the idempotency keys of signed-in users (`<rpc>:<subject>`), so that a retry still finds its answer.
        let rekeyed = store
            .hash_clear_idempotency_callers(|caller| match caller.split_once(':') {
                Some((rpc, subject)) => format!("{rpc}:{}", index.hash("subject", subject)),
                None => caller.to_owned(),
            })
            .await?;
        if hashed + rekeyed > 0 {
            tracing::info!(hashed, rekeyed, "claims and idempotency keys written in clear replaced by keyed hashes");
        }
        let commands = Commands::new(
            store,
            vault,
            index,
            TokenVerifier::new(jwks.clone(), issuer.clone(), settings.user_audience.clone()),
            GitHubClient::new(settings.github.clone(), http),
            settings.refusals_per_minute,
            settings.erasure_ledger.clone().map(crate::erasure::ErasureLedger::new),
        );
        // Development (the key kept in the database) has no backups to speak of.
        if settings.erasure_ledger.is_none() && !settings.master_keys.kept_in_database() {
            tracing::warn!(
                "KIROKU_ERASURE_LEDGER is not set: erasures are not recorded outside the database, and a restored \
                 backup would hold the erased people's data again (see `kiroku erasure reapply`)"
            );
        }
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("listen on {}", settings.listen_addr))?;
        let local_addr = listener.local_addr().context("read the bound address")?;
        let callers = CallerAuth::new(TokenVerifier::new(jwks, issuer, settings.api_audience.clone()));
        Ok(Application { listener, local_addr, callers, pool, redis, settings, commands: Arc::new(commands), metrics })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `GET /metrics` is served; `None` when metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// Serves until `shutdown` fires: health goes NOT_SERVING, the server stops taking calls and lets in-flight
    /// ones finish, and the relay stops after its current step.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<()> {
        let Application { listener, local_addr, callers, pool, redis, settings, commands, metrics } = self;
        if let Some(metrics) = metrics {
            metrics.spawn(shutdown.clone());
            tokio::spawn(sample_pool(pool.clone(), Duration::from_secs(5), shutdown.clone()));
        }
        tokio::spawn(crate::housekeeping::prune_idempotency_records(commands.store.clone(), shutdown.clone()));
        let relay = tokio::spawn(
            Relay::new(commands.store.clone(), redis.clone(), settings.relay.clone()).run(shutdown.clone()),
        );
        tracing::info!(address = %local_addr, "kiroku-command listening");
        GrpcServer::new()
            .tls(settings.tls.clone())
            .limits(settings.limits)
            .callers(callers)
            .add_service(CommandServiceServer::new(CommandGrpc::new(commands)))
            .serve(listener, Dependencies { postgres: pool.clone(), redis: None }, shutdown)
            .await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), relay).await;
        pool.close().await;
        let _ = redis.quit().await;
        tracing::info!("kiroku-command stopped");
        Ok(())
    }
}
