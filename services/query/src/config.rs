//! The query service's settings: the only place that reads its environment.

use std::net::SocketAddr;

use kiroku_platform::config::{self, ConfigError, Source};

#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub listen_addr: SocketAddr,
    pub migrate: bool,
}

impl Settings {
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            redis_prefix: config::redis_prefix(source)?,
            listen_addr: config::socket_addr_or(source, "KIROKU_QUERY_ADDR", "127.0.0.1:50052")?,
            migrate: config::bool_or(source, "KIROKU_MIGRATE", true)?,
        })
    }
}
