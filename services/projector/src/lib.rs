//! `kiroku-projector`: consumes `{prefix}:events` and keeps the read models (`users_read`,
//! `registration_failures_read`), applying every event exactly once in global position order.

mod apply;
pub mod config;
mod consumer;
pub mod dead_letters;
mod metrics;
mod projection;
pub mod rebuild;
mod startup;

pub use metrics::describe_metrics;
pub(crate) use metrics::record_status;
pub use projection::{PROJECTION, Projection, Status, Step, Target};
pub use startup::{Application, SERVICE_NAME};

/// Runs the projector until SIGTERM or Ctrl-C, then stops within 10 s.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let application = Application::build(settings).await?;
    kiroku_platform::run_until_signal(|shutdown| application.run_until_stopped(shutdown)).await
}
