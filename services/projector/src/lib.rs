//! `kiroku-projector`: consumes the Redis stream and keeps the read models.

pub mod config;
mod startup;

pub use startup::Application;

use std::time::Duration;

use kiroku_platform::{Shutdown, shutdown_signal};

/// Runs the projector until SIGTERM or Ctrl-C, then stops within 10 s.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let application = Application::build(settings).await?;
    let (trigger, shutdown) = Shutdown::new();
    let projector = tokio::spawn(application.run_until_stopped(shutdown));
    shutdown_signal().await;
    trigger.trigger();
    match tokio::time::timeout(Duration::from_secs(9), projector).await {
        Ok(joined) => joined?,
        Err(_) => {
            tracing::warn!("shutdown took longer than 9 s; exiting anyway");
            Ok(())
        }
    }
}
