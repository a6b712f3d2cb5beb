//! The query service's settings: the only place that reads its environment.

use std::net::SocketAddr;
use std::time::Duration;

use kiroku_platform::config::{self, ConfigError, Setting, Source};

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

pub const QUERY_ADDR: Setting =
    Setting::new("KIROKU_QUERY_ADDR", Some("127.0.0.1:50052"), "where QueryService listens");
pub const WATCH_BUFFER: Setting =
    Setting::new("KIROKU_WATCH_BUFFER", Some("1024"), "messages buffered per WatchEvents subscriber");
pub const WATCH_STALL_TIMEOUT_MS: Setting = Setting::new(
    "KIROKU_WATCH_STALL_TIMEOUT_MS",
    Some("30000"),
    "a subscriber that leaves a full buffer unread this long (ms) is ended with CONSUMER_TOO_SLOW",
);

/// Every setting of `kiroku-query`, as `--help` lists them.
pub const SETTINGS: &[Setting] = &[
    config::DATABASE_URL,
    config::REDIS_URL,
    config::REDIS_PREFIX,
    QUERY_ADDR,
    config::MIGRATE,
    WATCH_BUFFER,
    WATCH_STALL_TIMEOUT_MS,
    config::RUST_LOG,
];

impl Settings {
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        let client_buffer: usize = config::positive(source, &WATCH_BUFFER)?;
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            redis_prefix: config::redis_prefix(source)?,
            listen_addr: config::socket_addr(source, &QUERY_ADDR)?,
            migrate: config::bool(source, &config::MIGRATE)?,
            watch: WatchSettings {
                client_buffer,
                broadcast_buffer: WatchSettings::default().broadcast_buffer.max(client_buffer),
                stall_timeout: Duration::from_millis(config::number(source, &WATCH_STALL_TIMEOUT_MS)?),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[(&str, &str)] =
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kiroku"), ("REDIS_URL", "redis://127.0.0.1:6379/0")];

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
