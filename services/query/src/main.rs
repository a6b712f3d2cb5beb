//! `kiroku-query`: see the crate documentation of `kiroku_query`.

use std::process::ExitCode;

use kiroku_platform::config::{CommandLine, exit_on_config_error};
use kiroku_query::config::{SETTINGS, Settings};

const ABOUT: &str = "kiroku's QueryService: the read models, user history, and the live event feed (WatchEvents)";

#[tokio::main]
async fn main() -> ExitCode {
    let command_line = CommandLine::parse("kiroku-query", ABOUT, SETTINGS);
    let _telemetry = kiroku_platform::init_tracing(&command_line);
    let settings = Settings::from_source(&command_line).unwrap_or_else(|e| exit_on_config_error("kiroku-query", &e));
    match kiroku_query::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "kiroku-query failed");
            ExitCode::FAILURE
        }
    }
}
