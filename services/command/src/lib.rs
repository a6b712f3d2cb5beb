//! `kiroku-command`: CommandService (RegisterUser, SyncGitHubProfile) and the relay that publishes the event
//! store's committed events to Redis.

mod auth;
mod commands;
pub mod config;
mod error;
mod github;
mod grpc;
mod register_user;
pub mod relay;
mod startup;
mod sync_github_profile;

pub use startup::{Application, SERVICE_NAME};

use std::time::Duration;

use kiroku_platform::{Shutdown, shutdown_signal};

/// Runs the service until SIGTERM or Ctrl-C, then stops within 10 s.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let application = Application::build(settings).await?;
    let (trigger, shutdown) = Shutdown::new();
    let server = tokio::spawn(application.run_until_stopped(shutdown));
    shutdown_signal().await;
    trigger.trigger();
    match tokio::time::timeout(Duration::from_secs(9), server).await {
        Ok(joined) => joined?,
        Err(_) => {
            tracing::warn!("shutdown took longer than 9 s; exiting anyway");
            Ok(())
        }
    }
}
