//! `kiroku-projector`: see the crate documentation of `kiroku_projector`.

use std::process::ExitCode;

use kiroku_platform::config::{Environment, exit_on_config_error};
use kiroku_projector::config::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    kiroku_platform::init_tracing();
    let settings = Settings::from_source(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku-projector", &e));
    match kiroku_projector::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "kiroku-projector failed");
            ExitCode::FAILURE
        }
    }
}
