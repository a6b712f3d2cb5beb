//! The query service's settings: the only place that reads its environment.

use std::net::SocketAddr;
use std::time::Duration;

use kiroku_platform::config::{self, ConfigError, Source};

use crate::watch::WatchSettings;

#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub listen_addr: SocketAddr,
    pub migrate: bool,
    pub watch: WatchSettings,
}

impl Settings {
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        let defaults = WatchSettings::default();
        let client_buffer = config::number_or(source, "KIROKU_WATCH_BUFFER", defaults.client_buffer)?;
        if client_buffer == 0 {
            return Err(ConfigError::new("KIROKU_WATCH_BUFFER", "must be at least 1"));
        }
        let stall_ms = config::number_or(
            source,
            "KIROKU_WATCH_STALL_TIMEOUT_MS",
            u64::try_from(defaults.stall_timeout.as_millis()).unwrap_or(30_000),
        )?;
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            redis_prefix: config::redis_prefix(source)?,
            listen_addr: config::socket_addr_or(source, "KIROKU_QUERY_ADDR", "127.0.0.1:50052")?,
            migrate: config::bool_or(source, "KIROKU_MIGRATE", true)?,
            watch: WatchSettings {
                client_buffer,
                broadcast_buffer: defaults.broadcast_buffer.max(client_buffer),
                stall_timeout: Duration::from_millis(stall_ms),
            },
        })
    }
}
