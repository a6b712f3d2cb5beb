//! The command service's settings: the only place that reads its environment (DESIGN.md, "Configuration").

use std::net::SocketAddr;
use std::time::Duration;

use kiroku_platform::config::{self, Auth0Tenant, ConfigError, Setting, Source};
use url::Url;

use kiroku_relay::RelaySettings;

/// Everything `kiroku-command` needs to start.
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
    /// The Auth0 tenant whose tokens kiroku accepts, from end users and from callers alike.
    pub tenant: Auth0Tenant,
    /// The audience of end users' tokens (RegisterUser's body).
    pub user_audience: String,
    /// The audience of callers' tokens (every RPC's metadata).
    pub api_audience: String,
    pub github: GitHubSettings,
    pub relay: RelaySettings,
    pub refusals_per_minute: u32,
    /// `GET /metrics`; `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// `KIROKU_ERASURE_LEDGER`: the file every erasure is recorded in, outside the database; `None`: none.
    pub erasure_ledger: Option<std::path::PathBuf>,
    /// `KIROKU_MASTER_KEY` (and the previous ones): wrap the data keys that seal personal data.
    pub master_keys: std::sync::Arc<kiroku_vault::MasterKeys>,
}

/// `KIROKU_API_AUDIENCE`, which must differ from `KIROKU_AUTH0_AUDIENCE`: with one audience for both, an end
/// user's token would pass as a caller's (up to its grant) and a caller's as an end user's.
fn distinct_audience(source: &dyn Source) -> Result<String, ConfigError> {
    let api = config::required(source, &config::API_AUDIENCE)?;
    let user = config::required(source, &AUTH0_AUDIENCE)?;
    if api.trim_end_matches('/') == user.trim_end_matches('/') {
        return Err(ConfigError::new(
            config::API_AUDIENCE.name,
            "must differ from KIROKU_AUTH0_AUDIENCE (callers' tokens and end users' tokens are for different audiences)",
        ));
    }
    Ok(api)
}

/// Where GitHub profiles come from.
#[derive(Clone)]
pub struct GitHubSettings {
    pub api_url: Url,
    /// Raises the rate limit; never logged.
    pub token: Option<Secret>,
    pub timeout: Duration,
}

/// A string that is never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Debug for GitHubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubSettings")
            .field("api_url", &self.api_url.as_str())
            .field("token", &self.token)
            .field("timeout", &self.timeout)
            .finish()
    }
}

pub const COMMAND_ADDR: Setting =
    Setting::new("KIROKU_COMMAND_ADDR", Some("127.0.0.1:50051"), "where CommandService listens");
pub const AUTH0_AUDIENCE: Setting =
    Setting::new("KIROKU_AUTH0_AUDIENCE", None, "the audience of end users' tokens in RegisterUser (required)");
pub const GITHUB_API_URL: Setting =
    Setting::new("KIROKU_GITHUB_API_URL", Some("https://api.github.com"), "where GitHub profiles come from");
pub const GITHUB_TOKEN: Setting =
    Setting::new("KIROKU_GITHUB_TOKEN", None, "a GitHub token, for a higher rate limit [default: none]");
pub const GITHUB_TIMEOUT_MS: Setting =
    Setting::new("KIROKU_GITHUB_TIMEOUT_MS", Some("5000"), "how long a GitHub call may take, in milliseconds");
pub const REDIS_MAXLEN: Setting =
    Setting::new("KIROKU_REDIS_MAXLEN", Some("1000000"), "the relay trims the stream to about this many entries");
pub const REFUSALS_PER_MINUTE: Setting = Setting::new(
    "KIROKU_REFUSALS_PER_MINUTE",
    Some("10"),
    "refused registrations of one subject per minute before it is told to wait (RESOURCE_EXHAUSTED)",
);
pub const RELAY_BATCH_SIZE: Setting =
    Setting::new("KIROKU_RELAY_BATCH_SIZE", Some("500"), "events the relay publishes per checkpoint");

/// Every setting of `kiroku-command`, as `--help` lists them.
pub const SETTINGS: &[Setting] = &[
    config::DATABASE_URL,
    config::REDIS_URL,
    config::REDIS_PREFIX,
    COMMAND_ADDR,
    config::AUTH0_ISSUER,
    AUTH0_AUDIENCE,
    config::AUTH0_JWKS_URL,
    config::API_AUDIENCE,
    config::MASTER_KEY,
    config::PREVIOUS_MASTER_KEYS,
    config::DEV_MASTER_KEY_IN_DATABASE,
    config::ERASURE_LEDGER,
    GITHUB_API_URL,
    GITHUB_TOKEN,
    GITHUB_TIMEOUT_MS,
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
    REDIS_MAXLEN,
    RELAY_BATCH_SIZE,
    REFUSALS_PER_MINUTE,
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
pub const METRICS_ADDR: Setting = config::metrics_addr_setting("127.0.0.1:9101");

impl Settings {
    /// Reads and checks every setting; the first bad one is the error.
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        let redis_prefix = config::redis_prefix(source)?;
        let tenant = config::auth0_tenant(source)?;
        let mut relay = RelaySettings::new(&redis_prefix);
        relay.max_len = config::positive(source, &REDIS_MAXLEN)?;
        relay.batch_size = config::positive(source, &RELAY_BATCH_SIZE)?;
        let listen_addr = config::socket_addr(source, &COMMAND_ADDR)?;
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            listen_addr,
            tls: config::transport(source, listen_addr, &COMMAND_ADDR)?,
            migrate: config::migration(source)?,
            limits: config::server_limits(source)?,
            tenant,
            user_audience: config::required(source, &AUTH0_AUDIENCE)?,
            api_audience: distinct_audience(source)?,
            github: GitHubSettings {
                api_url: config::web_url(GITHUB_API_URL.name, &config::required(source, &GITHUB_API_URL)?)?,
                token: GITHUB_TOKEN.get(source).map(Secret::new),
                timeout: Duration::from_millis(config::positive(source, &GITHUB_TIMEOUT_MS)?),
            },
            relay,
            refusals_per_minute: config::positive(source, &REFUSALS_PER_MINUTE)?,
            metrics_addr: config::metrics_addr(source, &METRICS_ADDR)?,
            master_keys: kiroku_vault::master_keys(source)?,
            erasure_ledger: config::ERASURE_LEDGER.get(source).map(std::path::PathBuf::from),
            redis_prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &'static [(&'static str, &'static str)]) -> Result<Settings, ConfigError> {
        let source = move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned());
        Settings::from_source(&source)
    }

    const BASE: &[(&str, &str)] = &[
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kiroku"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("KIROKU_AUTH0_ISSUER", "https://tenant.auth0.com/"),
        ("KIROKU_AUTH0_AUDIENCE", "https://kiroku/api"),
        ("KIROKU_API_AUDIENCE", "kiroku-api"),
        ("KIROKU_MASTER_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
    ];

    #[test]
    fn the_jwks_url_defaults_to_the_issuers_well_known_path_with_one_slash() {
        let settings = from(BASE).unwrap();
        assert_eq!(settings.tenant.jwks_url.as_str(), "https://tenant.auth0.com/.well-known/jwks.json");
        assert_eq!(settings.listen_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(settings.relay.stream_key, "kiroku:events");
        assert_eq!(settings.github.api_url.as_str(), "https://api.github.com/");
        assert_eq!(settings.migrate.map(|m| m.url).as_deref(), Some("postgres://postgres@127.0.0.1:5432/kiroku"));
    }

    #[test]
    fn the_declared_defaults_are_the_relays_own() {
        let settings = from(BASE).unwrap();
        let own = RelaySettings::new("kiroku");
        assert_eq!((settings.relay.max_len, settings.relay.batch_size), (own.max_len, own.batch_size));
    }

    #[test]
    fn every_setting_read_is_listed_in_help() {
        let read = std::sync::Mutex::new(Vec::new());
        let recording = |name: &str| {
            read.lock().unwrap().push(name.to_owned());
            BASE.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        Settings::from_source(&recording).unwrap();
        for name in read.into_inner().unwrap() {
            assert!(SETTINGS.iter().any(|s| s.name == name), "{name} is read but not in SETTINGS");
        }
    }

    #[test]
    fn one_audience_for_callers_and_end_users_is_refused_naming_both() {
        let same: &'static [(&'static str, &'static str)] = Box::leak(
            [
                &BASE[..3],
                &[("KIROKU_AUTH0_AUDIENCE", "https://kiroku/api"), ("KIROKU_API_AUDIENCE", "https://kiroku/api/")],
            ]
            .concat()
            .into_boxed_slice(),
        );
        let error = from(same).err().unwrap();
        assert_eq!(error.name, "KIROKU_API_AUDIENCE");
        assert!(error.to_string().contains("KIROKU_AUTH0_AUDIENCE"), "{error}");
    }

    #[test]
    fn a_missing_audience_is_named() {
        let error = from(&BASE[..3]).err().unwrap();
        assert_eq!(error.name, "KIROKU_AUTH0_AUDIENCE");
        // Without a master key: refused, unless development asks for the key kept in a local database.
        assert_eq!(from(&BASE[..5]).err().unwrap().name, "KIROKU_MASTER_KEY");
        let dev: &'static [(&'static str, &'static str)] =
            Box::leak([&BASE[..5], &[("KIROKU_DEV_MASTER_KEY_IN_DATABASE", "true")]].concat().into_boxed_slice());
        assert!(from(dev).is_ok());
        let remote: &'static [(&'static str, &'static str)] = Box::leak(
            [&[("DATABASE_URL", "postgres://kiroku@db.internal:5432/kiroku")], &BASE[1..5]].concat().into_boxed_slice(),
        );
        assert_eq!(from(remote).err().unwrap().name, "KIROKU_MASTER_KEY");
    }

    #[test]
    fn the_github_token_is_never_printed() {
        let mut pairs = BASE.to_vec();
        pairs.push(("KIROKU_GITHUB_TOKEN", "ghp_supersecret"));
        let pairs: &'static [(&'static str, &'static str)] = Box::leak(pairs.into_boxed_slice());
        let settings = from(pairs).unwrap();
        assert!(!format!("{:?}", settings.github).contains("supersecret"));
        assert_eq!(settings.github.token.unwrap().expose(), "ghp_supersecret");
    }
}
