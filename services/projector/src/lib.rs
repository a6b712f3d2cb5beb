//! `kiroku-projector`: consumes `{prefix}:events` and keeps the read models (`users_read`,
//! `registration_failures_read`), applying every event exactly once in global position order.

mod apply;
pub mod config;
mod consumer;
pub mod dead_letters;
mod projection;
pub mod rebuild;
mod startup;

pub use consumer::publish_dead_letter;
pub use projection::{PROJECTION, Projection, Status};
pub use startup::{Application, SERVICE_NAME};

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
