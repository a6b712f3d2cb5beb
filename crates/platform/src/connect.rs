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

/// A pool on `url`, retried until PostgreSQL answers or 30 s have passed. A refusal that waiting will not change
/// (authentication, TLS) ends it at once. The error names `DATABASE_URL`, where it is, and why in plain words.
pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = postgres_options(url)?;
    let place = options
        .get_socket()
        .map(|socket| socket.display().to_string())
        .unwrap_or_else(|| format!("{}:{}", options.get_host(), options.get_port()));
    let started = Instant::now();
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await;
        let error = match attempt {
            Ok(pool) => return Ok(pool),
            Err(error) => error,
        };
        let (why, lasting) = postgres_refusal(&error);
        if lasting || started.elapsed() >= STARTUP_PATIENCE {
            let after = if lasting { String::new() } else { " (gave up after 30 s)".to_owned() };
            bail!("DATABASE_URL: cannot connect to PostgreSQL at {place}{after}: {why}");
        }
        tracing::warn!(%error, "PostgreSQL is not reachable yet; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Why a connection to PostgreSQL failed, in plain words (never a password), and whether retrying cannot help.
fn postgres_refusal(error: &sqlx::Error) -> (String, bool) {
    match error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01" | "28000") => (format!("authentication refused ({})", db.message()), true),
            Some("3D000") => (format!("no such database ({})", db.message()), true),
            Some("53300") => ("too many connections".to_owned(), false),
            Some("57P03") => ("the server is starting up".to_owned(), false),
            _ => (db.message().to_owned(), false),
        },
        sqlx::Error::Tls(tls) => (format!("the TLS handshake failed ({tls})"), true),
        sqlx::Error::Io(io) => io_refusal(io),
        sqlx::Error::PoolTimedOut => ("no answer within 5 s".to_owned(), false),
        other => (other.to_string(), false),
    }
}

/// An I/O failure in plain words (a name that does not resolve, a port nobody listens on, a TLS handshake that a
/// certificate or a protocol refused), and whether retrying cannot help (TLS).
fn io_refusal(io: &std::io::Error) -> (String, bool) {
    let text = io.to_string();
    if text.contains("lookup address") || text.contains("not known") || text.contains("No address associated") {
        return (format!("the host name was not found ({text})"), false);
    }
    let tls = ["certificate", "Certificate", "TLS", "tls", "handshake", "CertificateRequired"];
    if tls.iter().any(|word| text.contains(word)) {
        return (format!("the TLS handshake failed ({text})"), true);
    }
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            (format!("the connection was refused: nothing listens there ({text})"), false)
        }
        std::io::ErrorKind::TimedOut => (format!("no answer ({text})"), false),
        _ => (text, false),
    }
}

/// Why a connection to Redis failed, in plain words (never a password), and whether retrying cannot help.
fn redis_refusal(error: &fred::error::Error) -> (String, bool) {
    use fred::error::ErrorKind;
    let details = error.details().to_owned();
    match error.kind() {
        ErrorKind::Auth => (format!("authentication refused ({details})"), true),
        ErrorKind::Tls => (format!("the TLS handshake failed ({details})"), true),
        _ if details.contains("WRONGPASS") || details.contains("NOAUTH") || details.contains("NOPERM") => {
            (format!("authentication refused ({details})"), true)
        }
        ErrorKind::IO => io_refusal(&std::io::Error::other(details)),
        _ => (details, false),
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
    let place = match &config.server {
        fred::types::config::ServerConfig::Centralized { server } => format!("{}:{}", server.host, server.port),
        _ => "its servers".to_owned(),
    };
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
        // The errors of the connection attempts, which a timed-out `init` would otherwise not tell.
        let mut errors = client.error_rx();
        let connected = tokio::time::timeout(Duration::from_secs(5), client.init()).await;
        let failed = match connected {
            Ok(Ok(_)) => match client.ping::<String>(None).await {
                Ok(_) => return Ok(client),
                Err(error) => redis_refusal(&error),
            },
            Ok(Err(error)) => redis_refusal(&error),
            Err(_) => {
                let mut last = None;
                while let Ok((error, _)) = errors.try_recv() {
                    last = Some(error);
                }
                match last {
                    Some(error) => redis_refusal(&error),
                    // A plaintext server waits for the rest of what it takes for an inline command.
                    None if url.starts_with("rediss:") => {
                        ("no answer to the TLS handshake within 5 s: is that port TLS?".to_owned(), false)
                    }
                    None => ("no answer within 5 s".to_owned(), false),
                }
            }
        };
        let _ = client.quit().await;
        let (why, lasting) = failed;
        if lasting || started.elapsed() >= STARTUP_PATIENCE {
            let after = if lasting { String::new() } else { " (gave up after 30 s)".to_owned() };
            bail!("REDIS_URL: cannot connect to Redis at {place}{after}: {why}");
        }
        tracing::warn!(why, "Redis is not reachable yet; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_connection_says_why_in_plain_words() {
        let unknown = std::io::Error::other("failed to lookup address information: Name or service not known");
        assert!(io_refusal(&unknown).0.starts_with("the host name was not found"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(io_refusal(&refused).0.starts_with("the connection was refused"));
        let tls = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert_eq!(
            io_refusal(&tls),
            ("the TLS handshake failed (invalid peer certificate: UnknownIssuer)".into(), true)
        );
        let (why, lasting) = postgres_refusal(&sqlx::Error::Io(unknown));
        assert!(why.starts_with("the host name was not found") && !lasting, "a name may resolve later: retried");
    }

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
