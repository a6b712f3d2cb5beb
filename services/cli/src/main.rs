//! `kiroku`: the command line. `kiroku dev` runs everything in one process for development; `kiroku migrate`
//! applies the database migrations; the rest are operators' helpers.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiroku_platform::config::{self, Environment, exit_on_config_error};

mod dev;
mod projector;

#[derive(Parser)]
#[command(name = "kiroku", version, about = "kiroku: an event-sourced user registry")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs command, query and projector in one process with a local identity provider. Development only.
    Dev {
        #[command(subcommand)]
        action: Option<DevAction>,
    },
    /// Applies pending migrations to DATABASE_URL (a no-op when there are none).
    Migrate,
    /// Operates the projector's read models.
    Projector {
        #[command(subcommand)]
        action: ProjectorAction,
    },
    /// Master keys (KIROKU_MASTER_KEY), which wrap the data keys sealing personal data.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Erasure beyond the live database: the ledger of erasures (KIROKU_ERASURE_LEDGER).
    Erasure {
        #[command(subcommand)]
        action: ErasureAction,
    },
    /// Asks a kiroku server's grpc.health.v1 whether it is serving; exits 0 only if it is (for probes).
    Health {
        /// host:port of the server.
        address: String,
    },
}

#[derive(Subcommand)]
enum DevAction {
    /// Mints a 24-hour token from the running `kiroku dev`: for a GitHub account, a grpcurl line that registers
    /// it; with --caller, a caller token (for `authorization: Bearer`).
    Token {
        #[arg(long, required_unless_present = "caller", requires = "login")]
        github_id: Option<u64>,
        #[arg(long, requires = "github_id")]
        login: Option<String>,
        /// A caller token instead, holding every permission or those of --permissions.
        #[arg(long, conflicts_with_all = ["github_id", "login"])]
        caller: bool,
        /// Comma-separated, e.g. kiroku:read,kiroku:watch (with --caller).
        #[arg(long, requires = "caller", value_delimiter = ',')]
        permissions: Option<Vec<String>>,
    },
}

#[derive(Subcommand)]
enum ProjectorAction {
    /// Rebuilds the read models from the event store into a new generation, then switches queries to it.
    Rebuild,
    /// Prints the projection's generation, checkpoint and lag as JSON.
    Status,
    /// Dead letters: events that failed to apply too often and were skipped.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Prints a new master key (32 random bytes, base64), for KIROKU_MASTER_KEY.
    New,
    /// Makes KIROKU_MASTER_KEY current: re-wraps every data key under it (the old master key stays in
    /// KIROKU_PREVIOUS_MASTER_KEYS until this has run) and prints how many data keys each master key wraps.
    #[command(alias = "rewrap")]
    Rotate,
    /// Retires an old master key once no data key needs it: no service starts with it from then on, and once its
    /// material is destroyed, no backup that only it opens can be opened.
    Retire {
        /// The master key's id (as `kiroku keys rotate` prints it).
        id: String,
    },
}

#[derive(Subcommand)]
enum ErasureAction {
    /// After a restore: erases again everyone the erasure ledger names whom the database still holds readable.
    Reapply {
        /// The ledger [default: KIROKU_ERASURE_LEDGER].
        #[arg(long)]
        ledger: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Lists them as JSON lines.
    List,
    /// Applies them again, in position order; those that now apply leave the list.
    Replay,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|error| {
        // Help and version are answers; anything else is a usage error, which exits 64 like a bad setting.
        let code = if error.use_stderr() { config::EXIT_CONFIG } else { 0 };
        let _ = error.print();
        std::process::exit(code)
    });
    let _telemetry = kiroku_platform::init_tracing(&Environment);
    let outcome = match cli.command {
        Command::Dev { action: None } => dev::run().await,
        Command::Dev { action: Some(DevAction::Token { github_id, login, permissions, .. }) } => {
            dev::token(github_id.zip(login), permissions).await
        }
        Command::Migrate => migrate().await,
        Command::Projector { action } => projector::run(action).await,
        Command::Keys { action: KeysAction::New } => {
            kiroku_vault::generate_master_key().map(|key| println!("{key}")).map_err(anyhow::Error::from)
        }
        Command::Keys { action: KeysAction::Rotate } => rotate().await,
        Command::Keys { action: KeysAction::Retire { id } } => retire(&id).await,
        Command::Erasure { action: ErasureAction::Reapply { ledger } } => reapply(ledger).await,
        Command::Health { address } => health(&address).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kiroku: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate() -> anyhow::Result<()> {
    let url = config::database_url(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku migrate", &e));
    let prefix = config::role_prefix(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku migrate", &e));
    let pool = kiroku_platform::connect_postgres(&url, 2).await?;
    kiroku_event_store::migrate_with_roles(&pool, &prefix).await.context("apply migrations")?;
    println!("migrations applied");
    Ok(())
}

/// The vault of DATABASE_URL with the configured master keys, checked.
async fn vault(command: &str) -> anyhow::Result<kiroku_vault::Vault> {
    let url = config::database_url(&Environment).unwrap_or_else(|e| exit_on_config_error(command, &e));
    let master = kiroku_vault::master_keys(&Environment).unwrap_or_else(|e| exit_on_config_error(command, &e));
    let pool = kiroku_platform::connect_postgres(&url, 2).await?;
    let vault = kiroku_vault::Vault::new(kiroku_event_store::EventStore::new(pool), master);
    vault.check().await.context("KIROKU_MASTER_KEY does not open the data keys in the database")?;
    Ok(vault)
}

async fn rotate() -> anyhow::Result<()> {
    let (moved, by_key) = vault("kiroku keys").await?.rotate().await.context("re-wrap the data keys")?;
    let by_key: serde_json::Map<String, serde_json::Value> =
        by_key.into_iter().map(|(id, keys)| (id, serde_json::Value::from(keys))).collect();
    println!("{}", serde_json::json!({ "rewrapped": moved, "data_keys_by_master_key": by_key }));
    Ok(())
}

async fn retire(id: &str) -> anyhow::Result<()> {
    vault("kiroku keys").await?.retire(id).await?;
    println!(
        "master key {id} retired: delete it from KIROKU_PREVIOUS_MASTER_KEYS and destroy every copy of it; \
         services refuse to start with it from now on"
    );
    Ok(())
}

async fn reapply(ledger: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let ledger = match ledger.or_else(|| config::ERASURE_LEDGER.get(&Environment).map(Into::into)) {
        Some(ledger) => ledger,
        None => exit_on_config_error(
            "kiroku erasure reapply",
            &config::ConfigError::new(config::ERASURE_LEDGER.name, "is required (or --ledger)"),
        ),
    };
    let url = config::database_url(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku erasure", &e));
    let master = kiroku_vault::master_keys(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku erasure", &e));
    let pool = kiroku_platform::connect_postgres(&url, 2).await?;
    let store = kiroku_event_store::EventStore::new(pool);
    let vault = kiroku_vault::Vault::new(store.clone(), master);
    vault.check().await.context("KIROKU_MASTER_KEY does not open the data keys in the database")?;
    let reapplied = kiroku_command::erasure::reapply(&store, &vault, &ledger).await?;
    println!("{}", serde_json::to_string(&reapplied)?);
    Ok(())
}

async fn health(address: &str) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .context("parse the address")?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connect to {address}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .context("health check")?
        .into_inner();
    let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    anyhow::ensure!(status == ServingStatus::Serving, "not serving");
    Ok(())
}
