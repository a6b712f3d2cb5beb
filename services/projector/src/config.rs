//! The projector's settings: the only place that reads its environment.

use std::net::SocketAddr;

use kiroku_platform::config::{self, ConfigError, Source};

#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub migrate: bool,
    /// Where `grpc.health.v1` answers (compose probes it with `kiroku health`).
    pub health_addr: SocketAddr,
    /// This process's name in the consumer group; unique per process.
    pub consumer_name: String,
    /// Attempts before an event that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// Entries idle this long in another consumer's pending list are taken over.
    pub claim_idle_ms: u64,
}

impl Settings {
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        let max_attempts = config::number_or(source, "KIROKU_PROJECTOR_MAX_ATTEMPTS", 5u32)?;
        if max_attempts == 0 {
            return Err(ConfigError::new("KIROKU_PROJECTOR_MAX_ATTEMPTS", "must be at least 1"));
        }
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            redis_prefix: config::redis_prefix(source)?,
            migrate: config::bool_or(source, "KIROKU_MIGRATE", true)?,
            health_addr: config::socket_addr_or(source, "KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:50054")?,
            consumer_name: source
                .get("KIROKU_PROJECTOR_CONSUMER")
                .unwrap_or_else(|| format!("projector-{}-{}", std::process::id(), ulid::Ulid::new())),
            max_attempts,
            claim_idle_ms: config::number_or(source, "KIROKU_PROJECTOR_CLAIM_IDLE_MS", 30_000u64)?,
        })
    }
}
