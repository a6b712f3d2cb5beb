//! `kiroku-command`: CommandService (RegisterUser, SyncGitHubProfile) and the relay that publishes the event
//! store's committed events to Redis.

mod commands;
pub mod config;
mod deactivate_user;
mod erase_user;
pub mod erasure;
mod error;
mod github;
mod grpc;
mod housekeeping;
mod limits;
mod pipeline;
mod reactivate_user;
mod register_user;
mod startup;
mod sync_github_profile;

pub use startup::Application;

/// Runs the service until SIGTERM or Ctrl-C, then stops within 10 s.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let application = Application::build(settings).await?;
    kiroku_platform::run_until_signal(|shutdown| application.run_until_stopped(shutdown)).await
}
