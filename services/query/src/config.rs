//! The query service's settings: the only place that reads its environment.

use std::net::SocketAddr;
use std::time::Duration;

use kiroku_platform::config::{self, ConfigError, Setting, Source};

use crate::watch::WatchSettings;

/// No `Debug`: the URLs may hold passwords, and nothing here needs printing.
#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub listen_addr: SocketAddr,
    /// The schema owner's URL, to migrate with at start-up (`KIROKU_MIGRATE`, `KIROKU_MIGRATE_DATABASE_URL`).
    pub migrate: Option<config::Migration>,
    /// TLS for the gRPC listener (`KIROKU_TLS_*`); `None`: plaintext.
    pub tls: Option<kiroku_platform::tls::TlsSettings>,
    /// What the gRPC server lets its clients take.
    pub limits: config::ServerLimits,
    pub watch: WatchSettings,
    /// Who issues callers' tokens, and the audience they must carry.
    pub tenant: config::Auth0Tenant,
    pub api_audience: String,
    /// `GET /metrics`; `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// `KIROKU_MASTER_KEY` (and the previous ones): unwrap the data keys that open personal data.
    pub master_keys: std::sync::Arc<kiroku_vault::MasterKeys>,
}

/// The replays' share of the pool's connections, and one caller's share of that: below the whole of it, so that
/// one caller's catch-ups cannot hold every replay back; and below the pool, which the other queries need.
fn replay_connections(source: &dyn Source) -> Result<(usize, usize), ConfigError> {
    let total: usize = config::positive(source, &WATCH_REPLAY_CONNECTIONS)?;
    let per_caller: usize = config::positive(source, &WATCH_REPLAY_CONNECTIONS_PER_CALLER)?;
    if total >= POOL_CONNECTIONS as usize {
        return Err(ConfigError::new(
            WATCH_REPLAY_CONNECTIONS.name,
            format!("must be below the query service's {POOL_CONNECTIONS} connections"),
        ));
    }
    if per_caller > total || (per_caller == total && total > 1) {
        return Err(ConfigError::new(
            WATCH_REPLAY_CONNECTIONS_PER_CALLER.name,
            "must be below KIROKU_WATCH_REPLAY_CONNECTIONS",
        ));
    }
    Ok((total, per_caller))
}

/// The query service's pool of database connections.
pub const POOL_CONNECTIONS: u32 = 32;

pub const QUERY_ADDR: Setting =
    Setting::new("KIROKU_QUERY_ADDR", Some("127.0.0.1:50052"), "where QueryService listens");
pub const WATCH_BUFFER: Setting =
    Setting::new("KIROKU_WATCH_BUFFER", Some("1024"), "messages buffered per WatchEvents subscriber");
pub const WATCH_STALL_TIMEOUT_MS: Setting = Setting::new(
    "KIROKU_WATCH_STALL_TIMEOUT_MS",
    Some("30000"),
    "a subscriber that leaves a full buffer unread this long (ms) is ended with CONSUMER_TOO_SLOW",
);

pub const WATCH_MAX_STREAMS: Setting =
    Setting::new("KIROKU_WATCH_MAX_STREAMS", Some("10000"), "WatchEvents streams this process serves at once");
pub const WATCH_MAX_STREAMS_PER_CALLER: Setting =
    Setting::new("KIROKU_WATCH_MAX_STREAMS_PER_CALLER", Some("100"), "WatchEvents streams one caller may hold at once");
pub const WATCH_REPLAY_CONNECTIONS: Setting = Setting::new(
    "KIROKU_WATCH_REPLAY_CONNECTIONS",
    Some("8"),
    "database connections WatchEvents replays share (of the query service's 32); a replay waits for one",
);
pub const WATCH_REPLAY_CONNECTIONS_PER_CALLER: Setting = Setting::new(
    "KIROKU_WATCH_REPLAY_CONNECTIONS_PER_CALLER",
    Some("4"),
    "of those, the most one caller's replays hold at once (below KIROKU_WATCH_REPLAY_CONNECTIONS)",
);

/// Every setting of `kiroku-query`, as `--help` lists them.
pub const SETTINGS: &[Setting] = &[
    config::DATABASE_URL,
    config::REDIS_URL,
    config::REDIS_PREFIX,
    QUERY_ADDR,
    config::AUTH0_ISSUER,
    config::AUTH0_JWKS_URL,
    config::API_AUDIENCE,
    config::MASTER_KEY,
    config::PREVIOUS_MASTER_KEYS,
    config::DEV_MASTER_KEY_IN_DATABASE,
    config::MIGRATE,
    config::MIGRATE_DATABASE_URL,
    config::DATABASE_ROLE_PREFIX,
    config::TLS_CERT,
    config::TLS_KEY,
    config::TLS_CLIENT_CA,
    config::ALLOW_PLAINTEXT,
    config::MAX_IN_FLIGHT,
    config::MAX_IN_FLIGHT_PER_CALLER,
    config::REQUEST_TIMEOUT_MS,
    config::MAX_STREAMS_PER_CONNECTION,
    WATCH_BUFFER,
    WATCH_STALL_TIMEOUT_MS,
    WATCH_MAX_STREAMS,
    WATCH_MAX_STREAMS_PER_CALLER,
    WATCH_REPLAY_CONNECTIONS,
    WATCH_REPLAY_CONNECTIONS_PER_CALLER,
    METRICS_ADDR,
    config::LOG_FORMAT,
    config::RUST_LOG,
    config::OTLP_ENDPOINT,
    config::OTLP_TRACES_ENDPOINT,
    config::OTLP_PROTOCOL,
    config::OTLP_TRACES_PROTOCOL,
    config::OTEL_SERVICE_NAME,
];

/// Where `GET /metrics` is served.
pub const METRICS_ADDR: Setting = config::metrics_addr_setting("127.0.0.1:9102");

impl Settings {
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        let client_buffer: usize = config::positive(source, &WATCH_BUFFER)?;
        let listen_addr = config::socket_addr(source, &QUERY_ADDR)?;
        let replay_connections = replay_connections(source)?;
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            redis_prefix: config::redis_prefix(source)?,
            listen_addr,
            tls: config::transport(source, listen_addr, &QUERY_ADDR)?,
            migrate: config::migration(source)?,
            limits: config::server_limits(source)?,
            tenant: config::auth0_tenant(source)?,
            api_audience: config::required(source, &config::API_AUDIENCE)?,
            master_keys: kiroku_vault::master_keys(source)?,
            metrics_addr: config::metrics_addr(source, &METRICS_ADDR)?,
            watch: WatchSettings {
                client_buffer,
                broadcast_buffer: WatchSettings::default().broadcast_buffer.max(client_buffer),
                stall_timeout: Duration::from_millis(config::positive(source, &WATCH_STALL_TIMEOUT_MS)?),
                max_streams: config::positive(source, &WATCH_MAX_STREAMS)?,
                max_streams_per_caller: config::positive(source, &WATCH_MAX_STREAMS_PER_CALLER)?,
                replay_connections: replay_connections.0,
                replay_connections_per_caller: replay_connections.1,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[(&str, &str)] = &[
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kiroku"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("KIROKU_AUTH0_ISSUER", "https://tenant.auth0.com/"),
        ("KIROKU_API_AUDIENCE", "kiroku-api"),
        ("KIROKU_MASTER_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
    ];

    #[test]
    fn every_setting_read_is_listed_in_help_and_the_defaults_are_the_watchers_own() {
        let read = std::sync::Mutex::new(Vec::new());
        let recording = |name: &str| {
            read.lock().unwrap().push(name.to_owned());
            BASE.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        let settings = Settings::from_source(&recording).unwrap();
        for name in read.into_inner().unwrap() {
            assert!(SETTINGS.iter().any(|s| s.name == name), "{name} is read but not in SETTINGS");
        }
        let own = WatchSettings::default();
        assert_eq!(
            (settings.watch.client_buffer, settings.watch.stall_timeout),
            (own.client_buffer, own.stall_timeout)
        );
    }
}
