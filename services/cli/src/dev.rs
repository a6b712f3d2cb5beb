//! `kiroku dev`: command, query and projector in one process against the local PostgreSQL and Redis, with the
//! development identity provider standing in for Auth0 and GitHub. For development only.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_dev_identity::{DEV_API_AUDIENCE, DEV_AUDIENCE, DEV_IDENTITY_ADDR, DevAccount, DevIdentityProvider};
use kiroku_platform::config::{ConfigError, Environment, Source};
use kiroku_platform::{Shutdown, shutdown_signal};
use sqlx::Connection;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/kiroku_dev";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// Where the development identity provider listens (and where `kiroku dev token` finds it).
const IDENTITY_ADDR: &str = "KIROKU_DEV_IDENTITY_ADDR";

/// The environment, with `kiroku dev`'s defaults and its own identity provider in place of Auth0 and GitHub.
struct DevSource {
    issuer: String,
    github_api_url: String,
    /// This service's own Redis user, when `kiroku dev` could make one (see [`redis_users`]).
    redis_url: Option<String>,
}

impl Source for DevSource {
    fn get(&self, name: &str) -> Option<String> {
        match name {
            // Never a real tenant: dev tokens are signed locally.
            "KIROKU_AUTH0_ISSUER" => Some(self.issuer.clone()),
            "KIROKU_AUTH0_AUDIENCE" => Some(DEV_AUDIENCE.to_owned()),
            "KIROKU_API_AUDIENCE" => Some(DEV_API_AUDIENCE.to_owned()),
            "KIROKU_AUTH0_JWKS_URL" => None,
            "KIROKU_GITHUB_API_URL" => Some(self.github_api_url.clone()),
            "KIROKU_GITHUB_TOKEN" => None,
            // Without KIROKU_MASTER_KEY, the development key kept in the (local) database.
            "KIROKU_DEV_MASTER_KEY_IN_DATABASE" => Some("true".to_owned()),
            "DATABASE_URL" => Some(Environment.get(name).unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())),
            "REDIS_URL" => self.redis_url.clone().or_else(|| Some(redis_url())),
            _ => Environment.get(name),
        }
    }
}

pub(crate) async fn run() -> Result<()> {
    let database_url = Environment.get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    create_database_if_missing(&database_url).await?;

    let identity = DevIdentityProvider::start(identity_addr()?, &kiroku::permissions::ALL).await?;
    let users = redis_users().await;
    let user_names: Vec<String> =
        users.iter().flatten().filter_map(|url| url::Url::parse(url).ok().map(|u| u.username().to_owned())).collect();
    let source = |redis_url: Option<String>| DevSource {
        issuer: identity.issuer().to_owned(),
        github_api_url: identity.github_api_url(),
        redis_url,
    };
    let [relay, projector, query] = users.map_or([None, None, None], |urls| urls.map(Some));

    let command = kiroku_command::Application::build(
        kiroku_command::config::Settings::from_source(&source(relay)).unwrap_or_else(|e| config_error(&e)),
    )
    .await?;
    // One process, one metrics registry: the command's endpoint shows all three services.
    let mut query_settings =
        kiroku_query::config::Settings::from_source(&source(query)).unwrap_or_else(|e| config_error(&e));
    query_settings.metrics_addr = None;
    let query = kiroku_query::Application::build(query_settings).await?;
    let mut projector_settings =
        kiroku_projector::config::Settings::from_source(&source(projector)).unwrap_or_else(|e| config_error(&e));
    projector_settings.metrics_addr = None;
    let projector = kiroku_projector::Application::build(projector_settings).await?;

    // A fresh GitHub account each run, so the printed line registers a new user the first time it is pasted.
    let github_id = 90_000_000 + kiroku_dev_identity::unix_now() % 10_000_000;
    let account = DevAccount { github_id, login: format!("dev-{github_id}") };
    let token = identity.mint(&account, Duration::from_secs(24 * 3600))?;
    let caller = identity.mint_caller(&kiroku::permissions::ALL, Duration::from_secs(24 * 3600))?;
    let command_addr = command.local_addr();
    let query_addr = query.local_addr();

    eprintln!();
    eprintln!("  kiroku dev: FOR DEVELOPMENT ONLY. Tokens are signed by a local identity provider on");
    eprintln!("  {} that stands in for Auth0 and GitHub; never expose these ports.", identity.local_addr());
    eprintln!();
    eprintln!("  CommandService  {command_addr}    QueryService  {query_addr}");
    eprintln!("  database        {}", without_password(&database_url));
    if let Some(metrics) = command.metrics_addr() {
        eprintln!("  metrics         http://{metrics}/metrics   (Prometheus text; every service of this process)");
    }
    eprintln!();
    eprintln!("  Register GitHub account {github_id} (login {}) with a 24-hour token:", account.login);
    println!("{}", grpcurl_line(&caller, &token, command_addr));
    eprintln!();
    eprintln!("  Every kiroku.v1 call needs a caller token; this one holds every permission, for the lines of the");
    eprintln!("  README (\"$KIROKU_CALLER_TOKEN\"):");
    println!("export KIROKU_CALLER_TOKEN={caller}");
    eprintln!();
    eprintln!("  More tokens: kiroku dev token --github-id N --login NAME, or kiroku dev token --caller");
    eprintln!("  [--permissions kiroku:read,kiroku:watch].   Stop: Ctrl-C");
    eprintln!();

    let (trigger, shutdown) = Shutdown::new();
    let tasks = [
        tokio::spawn(command.run_until_stopped(shutdown.clone())),
        tokio::spawn(query.run_until_stopped(shutdown.clone())),
        tokio::spawn(projector.run_until_stopped(shutdown)),
    ];
    shutdown_signal().await;
    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(8), futures_join(tasks)).await;
    // The users were made for this run.
    if !user_names.is_empty()
        && let Ok(admin) = kiroku_platform::connect_redis(&redis_url()).await
    {
        let _: Result<i64, _> = admin.acl_deluser(user_names).await;
        let _ = admin.quit().await;
    }
    Ok(())
}

async fn futures_join(tasks: [tokio::task::JoinHandle<Result<()>>; 3]) {
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(error = format!("{error:#}"), "a service failed"),
            Err(error) => tracing::error!(%error, "a service panicked"),
        }
    }
}

/// The one line a developer pastes to register: the caller's token in the metadata, the user's in the body.
pub(crate) fn grpcurl_line(caller: &str, token: &str, command_addr: SocketAddr) -> String {
    format!(
        "grpcurl -plaintext -H 'authorization: Bearer {caller}' -d '{{\"auth0_token\":\"{token}\"}}' \
         {command_addr} kiroku.v1.CommandService/RegisterUser"
    )
}

/// `kiroku dev token`: asks the running `kiroku dev` for a token. With a GitHub account: teaches its GitHub
/// endpoint the login and prints a grpcurl line that registers it; with `--caller`: prints a caller token holding
/// `permissions` (all when none are named), for `export KIROKU_CALLER_TOKEN=$(kiroku dev token --caller)`.
pub(crate) async fn token(account: Option<(u64, String)>, permissions: Option<Vec<String>>) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let request = match &account {
        Some((github_id, login)) => serde_json::json!({ "github_id": github_id, "login": login }),
        None => serde_json::json!({ "caller": true, "permissions": permissions }),
    };
    let response = reqwest::Client::new()
        .post(format!("http://{}/dev/tokens", identity_addr()?))
        .json(&request)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .context("reach `kiroku dev` (is it running?)")?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("read the answer")?;
    anyhow::ensure!(status.is_success(), "kiroku dev refused: {}", body["message"].as_str().unwrap_or("unknown error"));
    let token = body["token"].as_str().context("no token in the answer")?;
    match account {
        Some(_) => {
            let caller = body["caller_token"].as_str().context("no caller token in the answer")?;
            println!("{}", grpcurl_line(caller, token, "127.0.0.1:50051".parse()?));
        }
        None => println!("{token}"),
    }
    Ok(())
}

fn redis_url() -> String {
    Environment.get("REDIS_URL").unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned())
}

/// Redis users for the relay, the projector and the query service, each allowed only its own work (the ACL
/// rules of `kiroku_relay::stream::acl_rules`), with passwords made for this run; their URLs, in that order.
/// `None` (and the one URL for all) when this Redis does not let us (an older server, a managed one).
async fn redis_users() -> Option<[String; 3]> {
    let base = redis_url();
    let prefix = Environment.get("KIROKU_REDIS_PREFIX").unwrap_or_else(|| "kiroku".to_owned());
    let admin = kiroku_platform::connect_redis(&base).await.ok()?;
    let rules = kiroku_relay::stream::acl_rules(&prefix);
    let mut urls = Vec::new();
    for (role, rules) in [("relay", rules.relay), ("projector", rules.projector), ("query", rules.query)] {
        // One set of users per stream, so that two `kiroku dev` on one Redis keep out of each other's way.
        let name = format!("kiroku-dev-{role}-{prefix}");
        let password = uuid::Uuid::new_v4().simple().to_string();
        let mut args = vec!["reset".to_owned(), "on".to_owned(), format!(">{password}")];
        args.extend(rules);
        let made = admin.acl_setuser(name.clone(), args).await;
        if let Err(error) = made {
            eprintln!(
                "  (no Redis users of their own for the services: {error}; they share {})",
                without_password(&base)
            );
            return None;
        }
        let mut url = url::Url::parse(&base).ok()?;
        url.set_username(&name).ok()?;
        url.set_password(Some(&password)).ok()?;
        urls.push(url.to_string());
    }
    let _ = admin.quit().await;
    urls.try_into().ok()
}

/// The identity provider's address: `KIROKU_DEV_IDENTITY_ADDR`, or 127.0.0.1:50053.
fn identity_addr() -> Result<SocketAddr> {
    let value = Environment.get(IDENTITY_ADDR).unwrap_or_else(|| DEV_IDENTITY_ADDR.to_owned());
    value.parse().with_context(|| format!("{IDENTITY_ADDR} must be host:port with an IP address"))
}

/// The URL as it may be shown: without its password.
fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// Creates the database of `url` when it does not exist (connecting to the server's `postgres` database).
async fn create_database_if_missing(url: &str) -> Result<()> {
    let mut parsed = url::Url::parse(url).context("DATABASE_URL is not a URL")?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    anyhow::ensure!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "kiroku dev creates only databases with plain names (letters, digits, _)"
    );
    parsed.set_path("/postgres");
    let mut admin = sqlx::PgConnection::connect(parsed.as_str()).await.context("connect to PostgreSQL")?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        // The name was checked above to be a plain identifier.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
        eprintln!("created database {name}");
    }
    Ok(())
}

fn config_error(error: &ConfigError) -> ! {
    kiroku_platform::config::exit_on_config_error("kiroku dev", error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_password_is_never_shown() {
        let shown = without_password("postgres://kiroku:hunter2@db:5432/kiroku");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(shown, "postgres://kiroku:***@db:5432/kiroku");
        assert_eq!(without_password(DEFAULT_DATABASE_URL), DEFAULT_DATABASE_URL);
    }
}
