//! `kiroku-query`: QueryService over the read models (GetUser, LookupUser, ListUsers, ListRegistrationFailures),
//! history from the event store (GetUserHistory), and the live feed (WatchEvents).

pub mod config;
mod error;
mod grpc;
mod paging;
mod read_models;
mod startup;
mod watch;
mod wire;

pub use startup::Application;
pub use watch::WatchSettings;

/// Runs the service until SIGTERM or Ctrl-C, then stops within 10 s.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let application = Application::build(settings).await?;
    kiroku_platform::run_until_signal(|shutdown| application.run_until_stopped(shutdown)).await
}
