//! `kiroku-command`: see the crate documentation of `kiroku_command`.

use std::process::ExitCode;

use kiroku_command::config::{SETTINGS, Settings};
use kiroku_platform::config::{CommandLine, exit_on_config_error};

const ABOUT: &str =
    "kiroku's CommandService (RegisterUser, SyncGitHubProfile) and the relay that publishes the event log to Redis";

#[tokio::main]
async fn main() -> ExitCode {
    let command_line = CommandLine::parse("kiroku-command", ABOUT, SETTINGS);
    let _telemetry = kiroku_platform::init_tracing(&command_line);
    let settings = Settings::from_source(&command_line).unwrap_or_else(|e| exit_on_config_error("kiroku-command", &e));
    match kiroku_command::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "kiroku-command failed");
            ExitCode::FAILURE
        }
    }
}
