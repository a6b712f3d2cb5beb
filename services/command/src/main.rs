//! `kiroku-command`: see the crate documentation of `kiroku_command`.

use std::process::ExitCode;

use kiroku_command::config::Settings;
use kiroku_platform::config::{Environment, exit_on_config_error};

#[tokio::main]
async fn main() -> ExitCode {
    kiroku_platform::init_tracing();
    let settings = Settings::from_source(&Environment).unwrap_or_else(|e| exit_on_config_error("kiroku-command", &e));
    match kiroku_command::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "kiroku-command failed");
            ExitCode::FAILURE
        }
    }
}
