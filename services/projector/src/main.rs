//! `kiroku-projector`: see the crate documentation of `kiroku_projector`.

use std::process::ExitCode;

use kiroku_platform::config::{CommandLine, exit_on_config_error};
use kiroku_projector::config::{SETTINGS, Settings};

const ABOUT: &str = "kiroku's projector: consumes the Redis stream and keeps the read models";

#[tokio::main]
async fn main() -> ExitCode {
    let command_line = CommandLine::parse("kiroku-projector", ABOUT, SETTINGS);
    let _telemetry = kiroku_platform::init_tracing(&command_line);
    let settings =
        Settings::from_source(&command_line).unwrap_or_else(|e| exit_on_config_error("kiroku-projector", &e));
    match kiroku_projector::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "kiroku-projector failed");
            ExitCode::FAILURE
        }
    }
}
