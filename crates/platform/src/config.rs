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

/// One setting of a process: its environment variable, its default, and what it is for. Each service's
/// `config.rs` declares its settings as constants and lists them in `SETTINGS`, which is what `--help` shows; the
/// readers below take the default from here, so help and behaviour cannot disagree.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    pub name: &'static str,
    /// The value when the variable is unset or empty; `None` for required settings and computed defaults
    /// (which `help` then describes).
    pub default: Option<&'static str>,
    pub help: &'static str,
}

impl Setting {
    pub const fn new(name: &'static str, default: Option<&'static str>, help: &'static str) -> Setting {
        Setting { name, default, help }
    }

    /// Its value, or its default.
    pub fn get(&self, source: &dyn Source) -> Option<String> {
        source.get(self.name).or_else(|| self.default.map(str::to_owned))
    }
}

pub const DATABASE_URL: Setting =
    Setting::new("DATABASE_URL", None, "PostgreSQL, postgres://user@host:port/database (required)");
pub const REDIS_URL: Setting =
    Setting::new("REDIS_URL", None, "Redis, redis://host:6379/0; the path selects the database (required)");
pub const REDIS_PREFIX: Setting = Setting::new(
    "KIROKU_REDIS_PREFIX",
    Some("kiroku"),
    "every Redis key starts with it; the stream is {prefix}:events",
);
pub const MIGRATE: Setting =
    Setting::new("KIROKU_MIGRATE", Some("true"), "apply pending migrations at start-up (true or false)");
pub const MIGRATE_DATABASE_URL: Setting = Setting::new(
    "KIROKU_MIGRATE_DATABASE_URL",
    None,
    "the schema's owner, who migrates (services log in as members of kiroku_command, kiroku_query, \
     kiroku_projector) [default: DATABASE_URL]",
);
pub const DATABASE_ROLE_PREFIX: Setting = Setting::new(
    "KIROKU_DATABASE_ROLE_PREFIX",
    Some("kiroku"),
    "the deployment's database roles, <prefix>_command, <prefix>_query, <prefix>_projector: the migrations give them \
     this database (and no other role may connect to it), so that deployments sharing a cluster stay apart",
);
pub const MASTER_KEY: Setting = Setting::new(
    "KIROKU_MASTER_KEY",
    None,
    "32 random bytes, base64: the master key that wraps the data keys sealing personal data (`kiroku keys new`; \
     required unless KIROKU_DEV_MASTER_KEY_IN_DATABASE=true)",
);
pub const ERASURE_LEDGER: Setting = Setting::new(
    "KIROKU_ERASURE_LEDGER",
    None,
    "a file outside the database and its backups where every erasure is recorded (user id and position, nothing \
     personal), for `kiroku erasure reapply` after a restore [default: none]",
);
pub const DEV_MASTER_KEY_IN_DATABASE: Setting = Setting::new(
    "KIROKU_DEV_MASTER_KEY_IN_DATABASE",
    Some("false"),
    "development only: without KIROKU_MASTER_KEY, use a master key kept in the database itself (whoever reads the \
     database can then open personal data at rest); refused unless the database is on this machine",
);
pub const PREVIOUS_MASTER_KEYS: Setting = Setting::new(
    "KIROKU_PREVIOUS_MASTER_KEYS",
    None,
    "earlier master keys, comma-separated, still accepted to unwrap data keys while a rotation runs \
     (`kiroku keys rewrap`) [default: none]",
);
pub const AUTH0_ISSUER: Setting =
    Setting::new("KIROKU_AUTH0_ISSUER", None, "the Auth0 tenant, e.g. https://tenant.auth0.com/ (required)");
pub const AUTH0_JWKS_URL: Setting =
    Setting::new("KIROKU_AUTH0_JWKS_URL", None, "the signing keys [default: the issuer + .well-known/jwks.json]");
pub const API_AUDIENCE: Setting = Setting::new(
    "KIROKU_API_AUDIENCE",
    None,
    "the audience of callers' tokens (authorization: Bearer, every kiroku.v1 RPC) (required)",
);

pub const MAX_IN_FLIGHT: Setting = Setting::new(
    "KIROKU_MAX_IN_FLIGHT",
    Some("1024"),
    "calls a server handles at once; past it, RESOURCE_EXHAUSTED LIMIT_REACHED (never a queue)",
);
pub const MAX_IN_FLIGHT_PER_CALLER: Setting = Setting::new(
    "KIROKU_MAX_IN_FLIGHT_PER_CALLER",
    Some("256"),
    "calls one caller (a token's subject) may have in flight at once; past it, LIMIT_REACHED",
);
pub const REQUEST_TIMEOUT_MS: Setting =
    Setting::new("KIROKU_REQUEST_TIMEOUT_MS", Some("30000"), "the longest a unary call may take, in milliseconds");
pub const MAX_STREAMS_PER_CONNECTION: Setting =
    Setting::new("KIROKU_MAX_STREAMS_PER_CONNECTION", Some("256"), "HTTP/2 streams one connection may open at once");

pub const TLS_CERT: Setting =
    Setting::new("KIROKU_TLS_CERT", None, "the server's certificate chain (PEM); with KIROKU_TLS_KEY, gRPC over TLS");
pub const TLS_KEY: Setting = Setting::new("KIROKU_TLS_KEY", None, "the server's private key (PEM)");
pub const TLS_CLIENT_CA: Setting = Setting::new(
    "KIROKU_TLS_CLIENT_CA",
    None,
    "a CA (PEM) that client certificates must chain to: mutual TLS [default: no client certificates]",
);
pub const ALLOW_PLAINTEXT: Setting = Setting::new(
    "KIROKU_ALLOW_PLAINTEXT",
    Some("false"),
    "serve plaintext on a non-loopback address (a service mesh's sidecar encrypts); otherwise that exits 64",
);

/// How a server's gRPC listener is secured: TLS when a certificate and key are set; else plaintext, which
/// off-loopback must be asked for (`KIROKU_ALLOW_PLAINTEXT=true`).
pub fn transport(
    source: &dyn Source,
    listen: SocketAddr,
    listen_setting: &Setting,
) -> Result<Option<crate::tls::TlsSettings>, ConfigError> {
    let file = |setting: &Setting| -> Result<Option<std::path::PathBuf>, ConfigError> {
        let Some(path) = setting.get(source).map(std::path::PathBuf::from) else { return Ok(None) };
        std::fs::File::open(&path)
            .map_err(|e| ConfigError::new(setting.name, format!("cannot be read ({})", e.kind())))?;
        Ok(Some(path))
    };
    let (cert, key, client_ca) = (file(&TLS_CERT)?, file(&TLS_KEY)?, file(&TLS_CLIENT_CA)?);
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsSettings { cert, key, client_ca })),
        (Some(_), None) => Err(ConfigError::new(TLS_KEY.name, "is required with KIROKU_TLS_CERT")),
        (None, Some(_)) => Err(ConfigError::new(TLS_CERT.name, "is required with KIROKU_TLS_KEY")),
        (None, None) if client_ca.is_some() => {
            Err(ConfigError::new(TLS_CLIENT_CA.name, "needs KIROKU_TLS_CERT and KIROKU_TLS_KEY"))
        }
        (None, None) if !listen.ip().is_loopback() && !bool(source, &ALLOW_PLAINTEXT)? => Err(ConfigError::new(
            listen_setting.name,
            "is not a loopback address: set KIROKU_TLS_CERT and KIROKU_TLS_KEY, or KIROKU_ALLOW_PLAINTEXT=true when \
             a service mesh encrypts the traffic",
        )),
        (None, None) => Ok(None),
    }
}

/// What a gRPC server lets its clients take.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub in_flight: usize,
    pub in_flight_per_caller: usize,
    pub request_timeout: std::time::Duration,
    pub streams_per_connection: u32,
}

pub fn server_limits(source: &dyn Source) -> Result<ServerLimits, ConfigError> {
    Ok(ServerLimits {
        in_flight: positive(source, &MAX_IN_FLIGHT)?,
        in_flight_per_caller: positive(source, &MAX_IN_FLIGHT_PER_CALLER)?,
        request_timeout: std::time::Duration::from_millis(positive(source, &REQUEST_TIMEOUT_MS)?),
        streams_per_connection: positive(source, &MAX_STREAMS_PER_CONNECTION)?,
    })
}

/// An Auth0 tenant: who issues the tokens kiroku accepts, and where its signing keys are.
#[derive(Clone, Debug)]
pub struct Auth0Tenant {
    /// Compared with a token's `iss` with or without a trailing slash.
    pub issuer: String,
    pub jwks_url: Url,
}

pub fn auth0_tenant(source: &dyn Source) -> Result<Auth0Tenant, ConfigError> {
    let issuer = required(source, &AUTH0_ISSUER)?;
    web_url(AUTH0_ISSUER.name, &issuer)?;
    let jwks_url = match AUTH0_JWKS_URL.get(source) {
        Some(url) => web_url(AUTH0_JWKS_URL.name, &url)?,
        None => web_url(AUTH0_ISSUER.name, &format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')))?,
    };
    Ok(Auth0Tenant { issuer, jwks_url })
}

/// Read by the logger rather than by `config.rs`; listed so that `--help` shows it.
pub const LOG_FORMAT: Setting = Setting::new(
    "KIROKU_LOG_FORMAT",
    Some("text"),
    "text (lines for people) or json (one object per line, with the span's fields, for a log collector)",
);

/// `KIROKU_METRICS_ADDR`, with a service's own default port (DESIGN.md: command 9101, query 9102, projector 9103).
pub const fn metrics_addr_setting(default: &'static str) -> Setting {
    Setting::new("KIROKU_METRICS_ADDR", Some(default), "where GET /metrics (Prometheus text) is served; off: nowhere")
}

/// The metrics address, or `None` when it is `off`.
pub fn metrics_addr(source: &dyn Source, setting: &Setting) -> Result<Option<SocketAddr>, ConfigError> {
    match setting.get(source).as_deref().map(str::trim) {
        None | Some("off") => Ok(None),
        Some(_) => socket_addr(source, setting).map(Some),
    }
}

/// The log format: `text` or `json`.
pub fn log_format(source: &dyn Source) -> Result<LogFormat, ConfigError> {
    match LOG_FORMAT.get(source).as_deref().map(str::trim) {
        Some("json") => Ok(LogFormat::Json),
        None | Some("text") => Ok(LogFormat::Text),
        Some(other) => Err(ConfigError::new(LOG_FORMAT.name, format!("must be text or json, not {other:?}"))),
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub const RUST_LOG: Setting = Setting::new("RUST_LOG", Some("info"), "log filter, e.g. info,kiroku_projector=debug");

// OpenTelemetry's own variables, read as its specification says (see `telemetry.rs`).
pub const OTLP_ENDPOINT: Setting = Setting::new(
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    None,
    "the OTLP collector (HTTP: a base URL, /v1/traces appended); spans are exported only with it, a traces \
     endpoint or a protocol [default: none]",
);
pub const OTLP_TRACES_ENDPOINT: Setting = Setting::new(
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    None,
    "the OTLP endpoint of traces, taken as it is [default: none]",
);
pub const OTLP_PROTOCOL: Setting =
    Setting::new("OTEL_EXPORTER_OTLP_PROTOCOL", Some("http/protobuf"), "grpc or http/protobuf");
pub const OTLP_TRACES_PROTOCOL: Setting = Setting::new(
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    None,
    "grpc or http/protobuf, for traces [default: OTEL_EXPORTER_OTLP_PROTOCOL]",
);
pub const OTEL_SERVICE_NAME: Setting =
    Setting::new("OTEL_SERVICE_NAME", None, "the service name on exported spans [default: the program's name]");

pub fn required(source: &dyn Source, setting: &Setting) -> Result<String, ConfigError> {
    setting.get(source).ok_or_else(|| ConfigError::new(setting.name, "is required but not set"))
}

pub fn bool(source: &dyn Source, setting: &Setting) -> Result<bool, ConfigError> {
    match required(source, setting)?.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::new(setting.name, "must be true or false")),
    }
}

pub fn number<T: std::str::FromStr>(source: &dyn Source, setting: &Setting) -> Result<T, ConfigError> {
    let value = required(source, setting)?;
    value.trim().parse().map_err(|_| ConfigError::new(setting.name, format!("must be a number, not {value:?}")))
}

/// A number that must be at least 1.
pub fn positive<T: std::str::FromStr + PartialOrd + From<u8>>(
    source: &dyn Source,
    setting: &Setting,
) -> Result<T, ConfigError> {
    let value: T = number(source, setting)?;
    if value < T::from(1) {
        return Err(ConfigError::new(setting.name, "must be at least 1"));
    }
    Ok(value)
}

pub fn socket_addr(source: &dyn Source, setting: &Setting) -> Result<SocketAddr, ConfigError> {
    let value = required(source, setting)?;
    value
        .parse()
        .map_err(|_| ConfigError::new(setting.name, format!("must be host:port with an IP address, not {value:?}")))
}

/// A Redis key prefix: non-empty, no spaces or braces (braces would change cluster hash slots).
pub fn redis_prefix(source: &dyn Source) -> Result<String, ConfigError> {
    let prefix = required(source, &REDIS_PREFIX)?;
    if prefix.chars().any(|c| c.is_whitespace() || c == '{' || c == '}') {
        return Err(ConfigError::new(REDIS_PREFIX.name, "must not contain spaces or braces"));
    }
    Ok(prefix)
}

/// Whether the connection sqlx will make for a PostgreSQL URL stays on this machine: a Unix socket, or a loopback
/// address, as sqlx resolves it (the URL's host, its `host` and `hostaddr` parameters, `PGHOST` and `PGHOSTADDR`
/// when the URL names none). The URL's host alone would call `postgres://127.0.0.1/db?hostaddr=10.0.0.5` local.
pub fn database_is_local(url: &str) -> bool {
    use std::str::FromStr;
    let Ok(options) = sqlx::postgres::PgConnectOptions::from_str(url) else { return false };
    if options.get_socket().is_some() {
        return true;
    }
    let host = options.get_host();
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// True for 127.0.0.0/8, ::1 and localhost. (A URL of a scheme the URL standard does not know, such as
/// `postgres://`, keeps its host as text, so an address there is parsed here.)
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => {
            domain.eq_ignore_ascii_case("localhost")
                || domain
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
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
    postgres_url(&DATABASE_URL, required(source, &DATABASE_URL)?)
}

/// How a process migrates: as the schema's owner (`url`), for the deployment's roles (`role_prefix`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    pub url: String,
    pub role_prefix: String,
}

/// How to migrate at start-up, if `KIROKU_MIGRATE` says to: as `KIROKU_MIGRATE_DATABASE_URL`, else `DATABASE_URL`.
pub fn migration(source: &dyn Source) -> Result<Option<Migration>, ConfigError> {
    if !bool(source, &MIGRATE)? {
        return Ok(None);
    }
    let url = match MIGRATE_DATABASE_URL.get(source) {
        Some(url) => postgres_url(&MIGRATE_DATABASE_URL, url)?,
        None => database_url(source)?,
    };
    Ok(Some(Migration { url, role_prefix: role_prefix(source)? }))
}

/// `KIROKU_DATABASE_ROLE_PREFIX`: a lower-case letter, then letters, digits and `_` (roles `<prefix>_command`, …).
pub fn role_prefix(source: &dyn Source) -> Result<String, ConfigError> {
    let prefix = DATABASE_ROLE_PREFIX.get(source).unwrap_or_else(|| "kiroku".to_owned());
    let valid = prefix.len() <= 41
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(ConfigError::new(
            DATABASE_ROLE_PREFIX.name,
            "must be a lower-case letter, then lower-case letters, digits and _ (at most 41)",
        ));
    }
    Ok(prefix)
}

fn postgres_url(setting: &Setting, value: String) -> Result<String, ConfigError> {
    let url = Url::parse(&value).map_err(|_| ConfigError::new(setting.name, "is not a URL"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(ConfigError::new(setting.name, "must start with postgres://"));
    }
    // What the driver will make of it (sslmode, sslrootcert, …), now rather than after 30 s of retries. Its
    // message may quote the URL: only the setting's name is shown.
    value
        .parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(|_| ConfigError::new(setting.name, "has an option the driver refuses (sslmode, …)"))?;
    for (option, file) in url.query_pairs() {
        if matches!(option.as_ref(), "sslrootcert" | "sslcert" | "sslkey")
            && std::fs::File::open(file.as_ref()).is_err()
        {
            return Err(ConfigError::new(setting.name, format!("its {option} cannot be read")));
        }
    }
    Ok(value)
}

/// A `redis://` URL; its path selects the database.
pub fn redis_url(source: &dyn Source) -> Result<String, ConfigError> {
    const NAME: &str = REDIS_URL.name;
    let value = required(source, &REDIS_URL)?;
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

/// A service's command line: `--help` lists every setting with its environment variable and default, each
/// setting also has a flag (`--database-url` for `DATABASE_URL`, `--command-addr` for `KIROKU_COMMAND_ADDR`), and
/// anything else exits with [`EXIT_CONFIG`]. The values are flags first, then the environment.
pub struct CommandLine {
    matches: clap::ArgMatches,
    settings: &'static [Setting],
}

impl CommandLine {
    /// Parses the process's arguments; prints help or the error and exits when there is nothing to run.
    pub fn parse(program: &'static str, about: &'static str, settings: &'static [Setting]) -> CommandLine {
        match CommandLine::try_parse(program, about, settings, std::env::args_os()) {
            Ok(command_line) => command_line,
            Err(error) => {
                // Help and version are answers; anything else is a usage error.
                let code = if error.use_stderr() { EXIT_CONFIG } else { 0 };
                let _ = error.print();
                std::process::exit(code)
            }
        }
    }

    pub fn try_parse(
        program: &'static str,
        about: &'static str,
        settings: &'static [Setting],
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<CommandLine, clap::Error> {
        let mut command = clap::Command::new(program)
            .about(about)
            .version(env!("CARGO_PKG_VERSION"))
            .after_help("Flags override the environment. Exit code 64: a missing or malformed setting.");
        for setting in settings {
            let help = match setting.default {
                Some(default) => format!("{} [default: {default}]", setting.help),
                None => setting.help.to_owned(),
            };
            command = command.arg(
                clap::Arg::new(setting.name)
                    .long(flag(setting.name))
                    .value_name("VALUE")
                    .env(setting.name)
                    .hide_env_values(true)
                    .help(help),
            );
        }
        Ok(CommandLine { matches: command.try_get_matches_from(args)?, settings })
    }
}

impl Source for CommandLine {
    fn get(&self, name: &str) -> Option<String> {
        // Settings not declared for this program (read by a shared helper) come from the environment.
        if !self.settings.iter().any(|s| s.name == name) {
            return Environment.get(name);
        }
        self.matches.get_one::<String>(name).filter(|v| !v.is_empty()).cloned()
    }
}

/// The flag of a setting: its variable without `KIROKU_`, in lower case, with dashes.
fn flag(name: &str) -> String {
    name.strip_prefix("KIROKU_").unwrap_or(name).to_ascii_lowercase().replace('_', "-")
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
        assert!(bool(&bad_bool, &MIGRATE).is_err());
        assert!(bool(&empty, &MIGRATE).unwrap(), "the default applies");
    }

    #[test]
    fn the_command_line_takes_flags_and_refuses_unknown_arguments() {
        const SETTINGS: &[Setting] = &[DATABASE_URL, MIGRATE];
        let parsed = CommandLine::try_parse("x", "x", SETTINGS, ["x", "--database-url", "postgres://h/db"]).unwrap();
        assert_eq!(parsed.get("DATABASE_URL").as_deref(), Some("postgres://h/db"));
        assert_eq!(flag("KIROKU_COMMAND_ADDR"), "command-addr");
        let error = CommandLine::try_parse("x", "x", SETTINGS, ["x", "--bogus"]).err().unwrap();
        assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
        let help = CommandLine::try_parse("x", "x", SETTINGS, ["x", "--help"]).err().unwrap().to_string();
        assert!(help.contains("KIROKU_MIGRATE") && help.contains("[default: true]"), "{help}");
    }
}
