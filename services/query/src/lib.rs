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

pub use startup::{Application, SERVICE_NAME};
pub use watch::WatchSettings;

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
