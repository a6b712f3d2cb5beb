//! The projector's settings: the only place that reads its environment.

use std::net::SocketAddr;

use kiroku_platform::config::{self, ConfigError, Setting, Source};

/// No `Debug`: the URLs may hold passwords, and nothing here needs printing.
#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    /// The schema owner's URL, to migrate with at start-up (`KIROKU_MIGRATE`, `KIROKU_MIGRATE_DATABASE_URL`).
    pub migrate: Option<config::Migration>,
    /// TLS for the gRPC listener (`KIROKU_TLS_*`); `None`: plaintext.
    pub tls: Option<kiroku_platform::tls::TlsSettings>,
    /// Where `grpc.health.v1` answers (compose probes it with `kiroku health`).
    pub health_addr: SocketAddr,
    /// This process's name in the consumer group; unique per process.
    pub consumer_name: String,
    /// Attempts before an event that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// Entries idle this long in another consumer's pending list are taken over.
    pub claim_idle_ms: u64,
    /// `GET /metrics`; `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// `KIROKU_MASTER_KEY` (and the previous ones): unwrap the data keys that open personal data.
    pub master_keys: std::sync::Arc<kiroku_vault::MasterKeys>,
}

pub const HEALTH_ADDR: Setting = Setting::new(
    "KIROKU_PROJECTOR_HEALTH_ADDR",
    Some("127.0.0.1:50054"),
    "where grpc.health.v1 (and reflection) answer",
);
pub const MAX_ATTEMPTS: Setting =
    Setting::new("KIROKU_PROJECTOR_MAX_ATTEMPTS", Some("5"), "attempts before an event is dead-lettered");
pub const CONSUMER: Setting = Setting::new(
    "KIROKU_PROJECTOR_CONSUMER",
    None,
    "this process's name in the consumer group [default: unique per process]",
);
pub const CLAIM_IDLE_MS: Setting = Setting::new(
    "KIROKU_PROJECTOR_CLAIM_IDLE_MS",
    Some("30000"),
    "entries idle this long (ms) in another consumer's pending list are taken over",
);

/// Every setting of `kiroku-projector`, as `--help` lists them.
pub const SETTINGS: &[Setting] = &[
    config::DATABASE_URL,
    config::REDIS_URL,
    config::REDIS_PREFIX,
    HEALTH_ADDR,
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
    MAX_ATTEMPTS,
    CONSUMER,
    CLAIM_IDLE_MS,
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
pub const METRICS_ADDR: Setting = config::metrics_addr_setting("127.0.0.1:9103");

impl Settings {
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        let health_addr = config::socket_addr(source, &HEALTH_ADDR)?;
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            redis_prefix: config::redis_prefix(source)?,
            migrate: config::migration(source)?,
            health_addr,
            tls: config::transport(source, health_addr, &HEALTH_ADDR)?,
            consumer_name: CONSUMER
                .get(source)
                .unwrap_or_else(|| format!("projector-{}-{}", std::process::id(), ulid::Ulid::new())),
            max_attempts: config::positive(source, &MAX_ATTEMPTS)?,
            claim_idle_ms: config::positive(source, &CLAIM_IDLE_MS)?,
            metrics_addr: config::metrics_addr(source, &METRICS_ADDR)?,
            master_keys: kiroku_vault::master_keys(source)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_read_is_listed_in_help() {
        let base = [
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kiroku"),
            ("REDIS_URL", "redis://h:6379/0"),
            ("KIROKU_MASTER_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
        ];
        let read = std::sync::Mutex::new(Vec::new());
        let recording = |name: &str| {
            read.lock().unwrap().push(name.to_owned());
            base.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        let settings = Settings::from_source(&recording).unwrap();
        for name in read.into_inner().unwrap() {
            assert!(SETTINGS.iter().any(|s| s.name == name), "{name} is read but not in SETTINGS");
        }
        assert_eq!(settings.max_attempts, 5);
    }
}
