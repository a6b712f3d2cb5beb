//! `kiroku`: the command line. `kiroku dev` runs everything in one process for development; `kiroku migrate`
//! applies the database migrations; the rest are operators' helpers.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiroku_platform::config::{self, Environment, exit_on_config_error};

#[derive(Parser)]
#[command(name = "kiroku", version, about = "kiroku: an event-sourced user registry")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Applies pending migrations to DATABASE_URL (a no-op when there are none).
    Migrate,
    /// Asks a kiroku server's grpc.health.v1 whether it is serving; exits 0 only if it is (for probes).
    Health {
        /// host:port of the server.
        address: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    kiroku_platform::init_tracing();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Migrate => migrate().await,
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
    let pool = kiroku_platform::connect_postgres(&url, 2).await?;
    kiroku_event_store::migrate(&pool).await.context("apply migrations")?;
    println!("migrations applied");
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
