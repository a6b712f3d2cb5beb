//! Reading settings from the environment. Each service's `config.rs` describes its settings with these helpers;
//! a missing or malformed one is a [`ConfigError`] that `main` prints as one line before exiting with 64.

use std::net::{IpAddr, SocketAddr};

use url::Url;

/// The exit code for a bad setting (EX_CONFIG would be 78; the contract says 64, EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// A setting that is missing or malformed. Its message names the variable and never echoes a secret value.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(name: &'static str, problem: impl Into<String>) -> Self {
        ConfigError { name, problem: problem.into() }
    }
}

/// Where settings come from: the process environment, or a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Environment;

impl Source for Environment {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<F: Fn(&str) -> Option<String>> Source for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name).filter(|v| !v.is_empty())
    }
}

pub fn required(source: &dyn Source, name: &'static str) -> Result<String, ConfigError> {
    source.get(name).ok_or_else(|| ConfigError::new(name, "is required but not set"))
}

pub fn bool_or(source: &dyn Source, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match source.get(name).as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(_) => Err(ConfigError::new(name, "must be true or false")),
    }
}

pub fn number_or<T: std::str::FromStr>(source: &dyn Source, name: &'static str, default: T) -> Result<T, ConfigError> {
    match source.get(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| ConfigError::new(name, format!("must be a number, not {v:?}"))),
    }
}

pub fn socket_addr_or(source: &dyn Source, name: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
    let value = source.get(name).unwrap_or_else(|| default.to_owned());
    value.parse().map_err(|_| ConfigError::new(name, format!("must be host:port with an IP address, not {value:?}")))
}

/// A Redis key prefix: non-empty, no spaces or braces (braces would change cluster hash slots).
pub fn redis_prefix(source: &dyn Source) -> Result<String, ConfigError> {
    const NAME: &str = "KIROKU_REDIS_PREFIX";
    let prefix = source.get(NAME).unwrap_or_else(|| "kiroku".to_owned());
    if prefix.chars().any(|c| c.is_whitespace() || c == '{' || c == '}') {
        return Err(ConfigError::new(NAME, "must not contain spaces or braces"));
    }
    Ok(prefix)
}

/// True for 127.0.0.0/8, ::1 and localhost.
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// An `https://` URL, or an `http://` one on a loopback host.
pub fn web_url(name: &'static str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|e| ConfigError::new(name, format!("is not a URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        "http" => Err(ConfigError::new(name, "http:// is accepted only for loopback hosts; use https://")),
        other => Err(ConfigError::new(name, format!("must be https://, not {other}://"))),
    }
}

/// A `postgres://` URL. The message never repeats the URL, which may hold a password.
pub fn database_url(source: &dyn Source) -> Result<String, ConfigError> {
    const NAME: &str = "DATABASE_URL";
    let value = required(source, NAME)?;
    let url = Url::parse(&value).map_err(|_| ConfigError::new(NAME, "is not a URL"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(ConfigError::new(NAME, "must start with postgres://"));
    }
    Ok(value)
}

/// A `redis://` URL; its path selects the database.
pub fn redis_url(source: &dyn Source) -> Result<String, ConfigError> {
    const NAME: &str = "REDIS_URL";
    let value = required(source, NAME)?;
    let url = Url::parse(&value).map_err(|_| ConfigError::new(NAME, "is not a URL"))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(ConfigError::new(NAME, "must start with redis:// or rediss://"));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u8>().is_err() {
        return Err(ConfigError::new(NAME, "its path must be a database number, like redis://host:6379/0"));
    }
    Ok(value)
}

/// Prints the one-line message of the contract and exits with [`EXIT_CONFIG`].
pub fn exit_on_config_error(program: &str, error: &ConfigError) -> ! {
    eprintln!("{program}: configuration error: {error}");
    std::process::exit(EXIT_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn http_is_refused_except_on_loopback_hosts() {
        assert!(web_url("X", "http://127.0.0.1:50053/").is_ok());
        assert!(web_url("X", "http://127.9.9.9/").is_ok());
        assert!(web_url("X", "http://localhost:8080/").is_ok());
        assert!(web_url("X", "http://[::1]:8080/").is_ok());
        assert!(web_url("X", "https://example.auth0.com/").is_ok());
        assert!(web_url("X", "http://example.auth0.com/").is_err());
        assert!(web_url("X", "http://10.0.0.1/").is_err());
        assert!(web_url("X", "ftp://localhost/").is_err());
    }

    #[test]
    fn a_missing_or_malformed_setting_names_itself_without_echoing_secrets() {
        let empty = source(&[]);
        assert_eq!(database_url(&empty).unwrap_err().to_string(), "DATABASE_URL: is required but not set");
        let bad = source(&[("DATABASE_URL", "mysql://user:hunter2@db/x")]);
        let message = database_url(&bad).unwrap_err().to_string();
        assert!(message.starts_with("DATABASE_URL") && !message.contains("hunter2"), "{message}");
        let bad_redis = source(&[("REDIS_URL", "redis://127.0.0.1:6379/zero")]);
        assert!(redis_url(&bad_redis).unwrap_err().to_string().starts_with("REDIS_URL"));
        let bad_bool = source(&[("KIROKU_MIGRATE", "maybe")]);
        assert!(bool_or(&bad_bool, "KIROKU_MIGRATE", true).is_err());
        assert!(bool_or(&empty, "KIROKU_MIGRATE", true).unwrap());
    }
}
