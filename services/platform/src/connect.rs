//! Connecting at start-up: PostgreSQL and Redis are retried for up to 30 s, then the process gives up.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fred::prelude::*;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

const STARTUP_PATIENCE: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Connection options for a database URL, with kiroku's application name. A loopback database without an
/// `sslmode` (in the URL or `PGSSLMODE`) is reached in plaintext: the driver's default, `prefer`, encrypts
/// whenever the server can (a stock Debian PostgreSQL can, with its snakeoil certificate), which on loopback
/// protects nothing and costs every query CPU (measured: a third of RegisterUser's throughput on two cores).
/// Anywhere else the URL's `sslmode` decides, as with libpq.
fn postgres_options(url: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url).context("parse DATABASE_URL")?.application_name("kiroku");
    let parsed = url::Url::parse(url).context("parse DATABASE_URL")?;
    let chosen = parsed.query_pairs().any(|(name, _)| name == "sslmode" || name == "ssl-mode")
        || std::env::var_os("PGSSLMODE").is_some();
    // Where the connection really goes (a `host` or `hostaddr` parameter, `PGHOST`), not the URL's host alone; a
    // Unix socket, which TLS never covers, counts as local.
    let loopback = crate::config::database_is_local(url);
    Ok(if loopback && !chosen { options.ssl_mode(PgSslMode::Disable) } else { options })
}

/// A pool on `url`, retried until PostgreSQL answers or 30 s have passed.
pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = postgres_options(url)?;
    let started = Instant::now();
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(error) if started.elapsed() < STARTUP_PATIENCE => {
                tracing::warn!(%error, "PostgreSQL is not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error).context("connect to PostgreSQL (gave up after 30 s)"),
        }
    }
}

/// A pool on `url` (retried like [`connect_postgres`]), after pending migrations were applied as `migrate` (the
/// schema owner's URL, when `KIROKU_MIGRATE` says so; see `config::migration`).
pub async fn open_database(
    url: &str,
    max_connections: u32,
    migrate: Option<&crate::config::Migration>,
) -> Result<PgPool> {
    if let Some(migration) = migrate {
        let owner = connect_postgres(&migration.url, 1).await?;
        kiroku_event_store::migrate_with_roles(&owner, &migration.role_prefix).await.context("apply migrations")?;
        owner.close().await;
    }
    connect_postgres(url, max_connections).await
}

/// A client on `url`, retried until Redis answers or 30 s have passed. Once connected, fred reconnects by
/// itself whenever Redis goes away; meanwhile commands fail after 3 s rather than waiting for it.
pub async fn connect_redis(url: &str) -> Result<Client> {
    let config = Config::from_url(url).context("parse REDIS_URL")?;
    let started = Instant::now();
    loop {
        let client = Builder::from_config(config.clone())
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = Duration::from_secs(5);
            })
            // Without a timeout, commands queue until Redis is back: a caller could not fall back to PostgreSQL
            // (the projector) or report the outage (health). Longer than any BLOCK kiroku uses (1 s).
            .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
            .set_policy(ReconnectPolicy::new_constant(0, 500))
            .build()
            .context("configure Redis client")?;
        // The first connection is made by hand: with a reconnect policy, `init` would retry forever.
        let connected = tokio::time::timeout(Duration::from_secs(5), client.init()).await;
        match connected {
            Ok(Ok(_)) => match client.ping::<String>(None).await {
                Ok(_) => return Ok(client),
                Err(error) => tracing::warn!(%error, "Redis does not answer yet; retrying"),
            },
            Ok(Err(error)) => tracing::warn!(%error, "Redis is not reachable yet; retrying"),
            Err(_) => tracing::warn!("Redis connection timed out; retrying"),
        }
        let _ = client.quit().await;
        if started.elapsed() >= STARTUP_PATIENCE {
            bail!("connect to Redis (gave up after 30 s)");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_without_an_sslmode_is_plaintext_and_a_chosen_sslmode_is_kept() {
        let mode = |url: &str| postgres_options(url).unwrap().get_ssl_mode();
        assert!(matches!(mode("postgres://kiroku@127.0.0.1:5432/kiroku"), PgSslMode::Disable));
        assert!(matches!(mode("postgres://kiroku@localhost/kiroku"), PgSslMode::Disable));
        assert!(matches!(mode("postgres://kiroku@[::1]/kiroku"), PgSslMode::Disable));
        assert!(matches!(mode("postgres://kiroku@127.0.0.1/kiroku?sslmode=require"), PgSslMode::Require));
        // Elsewhere the driver's default stands (libpq's `prefer`).
        assert!(matches!(mode("postgres://kiroku@db.internal/kiroku"), PgSslMode::Prefer));
        assert!(matches!(mode("postgres://kiroku@db.internal/kiroku?sslmode=verify-full"), PgSslMode::VerifyFull));
        // Where sqlx really connects decides: a Unix socket is local, a `hostaddr` elsewhere is not.
        assert!(matches!(mode("postgres://kiroku@db.internal/kiroku?host=/var/run/postgresql"), PgSslMode::Disable));
        assert!(matches!(mode("postgres://kiroku@127.0.0.1/kiroku?hostaddr=10.0.0.5"), PgSslMode::Prefer));
        assert!(matches!(mode("postgres://kiroku@localhost/kiroku?host=db.internal"), PgSslMode::Prefer));
    }
}
