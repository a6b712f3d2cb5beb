//! The command service's settings: the only place that reads its environment (DESIGN.md, "Configuration").

use std::net::SocketAddr;
use std::time::Duration;

use kiroku_platform::config::{self, ConfigError, Source};
use url::Url;

use kiroku_relay::RelaySettings;

/// Everything `kiroku-command` needs to start.
#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub listen_addr: SocketAddr,
    pub migrate: bool,
    pub auth0: Auth0Settings,
    pub github: GitHubSettings,
    pub relay: RelaySettings,
}

/// Which tokens RegisterUser accepts.
#[derive(Clone, Debug)]
pub struct Auth0Settings {
    /// Compared with the token's `iss` with or without a trailing slash.
    pub issuer: String,
    pub audience: String,
    pub jwks_url: Url,
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

impl Settings {
    /// Reads and checks every setting; the first bad one is the error.
    pub fn from_source(source: &dyn Source) -> Result<Settings, ConfigError> {
        let redis_prefix = config::redis_prefix(source)?;
        let issuer = config::required(source, "KIROKU_AUTH0_ISSUER")?;
        config::web_url("KIROKU_AUTH0_ISSUER", &issuer)?;
        let jwks_url = match source.get("KIROKU_AUTH0_JWKS_URL") {
            Some(url) => config::web_url("KIROKU_AUTH0_JWKS_URL", &url)?,
            None => config::web_url(
                "KIROKU_AUTH0_ISSUER",
                &format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')),
            )?,
        };
        let mut relay = RelaySettings::new(&redis_prefix);
        relay.max_len = config::number_or(source, "KIROKU_REDIS_MAXLEN", relay.max_len)?;
        relay.batch_size = config::number_or(source, "KIROKU_RELAY_BATCH_SIZE", relay.batch_size)?;
        if relay.batch_size == 0 {
            return Err(ConfigError::new("KIROKU_RELAY_BATCH_SIZE", "must be at least 1"));
        }
        Ok(Settings {
            database_url: config::database_url(source)?,
            redis_url: config::redis_url(source)?,
            listen_addr: config::socket_addr_or(source, "KIROKU_COMMAND_ADDR", "127.0.0.1:50051")?,
            migrate: config::bool_or(source, "KIROKU_MIGRATE", true)?,
            auth0: Auth0Settings { issuer, audience: config::required(source, "KIROKU_AUTH0_AUDIENCE")?, jwks_url },
            github: GitHubSettings {
                api_url: config::web_url(
                    "KIROKU_GITHUB_API_URL",
                    &source.get("KIROKU_GITHUB_API_URL").unwrap_or_else(|| "https://api.github.com".to_owned()),
                )?,
                token: source.get("KIROKU_GITHUB_TOKEN").map(Secret::new),
                timeout: Duration::from_millis(config::number_or(source, "KIROKU_GITHUB_TIMEOUT_MS", 5_000u64)?),
            },
            relay,
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
    ];

    #[test]
    fn the_jwks_url_defaults_to_the_issuers_well_known_path_with_one_slash() {
        let settings = from(BASE).unwrap();
        assert_eq!(settings.auth0.jwks_url.as_str(), "https://tenant.auth0.com/.well-known/jwks.json");
        assert_eq!(settings.listen_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(settings.relay.stream_key, "kiroku:events");
        assert_eq!(settings.github.api_url.as_str(), "https://api.github.com/");
        assert!(settings.migrate);
    }

    #[test]
    fn a_missing_audience_is_named() {
        let error = from(&BASE[..3]).err().unwrap();
        assert_eq!(error.name, "KIROKU_AUTH0_AUDIENCE");
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
