//! Tracing: human-readable lines on stderr, filtered by `RUST_LOG` (default `info`, with sqlx and h2 quieter).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{self, Source};

/// Starts logging, with the filter `RUST_LOG` from `source` (the command line or the environment).
pub fn init_tracing(source: &dyn Source) {
    let filter = source
        .get(config::RUST_LOG.name)
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info,sqlx=warn,h2=warn"));
    // Colours only for a person at a terminal: a log file or collector gets plain text.
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
