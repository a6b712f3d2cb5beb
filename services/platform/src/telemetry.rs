//! Tracing: lines on stderr, filtered by `RUST_LOG` (default `info`, with sqlx and h2 quieter), as text for a
//! person or as JSON objects for a collector (`KIROKU_LOG_FORMAT`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{self, LogFormat, Source};

/// Starts logging, with the filter `RUST_LOG` and the format `KIROKU_LOG_FORMAT` from `source` (the command line
/// or the environment). An unknown format exits 64, like every other bad setting.
pub fn init_tracing(source: &dyn Source) {
    let format = config::log_format(source).unwrap_or_else(|error| {
        let program = std::env::args().next().unwrap_or_default();
        let program = program.rsplit('/').next().unwrap_or("kiroku").to_owned();
        config::exit_on_config_error(&program, &error)
    });
    let filter = source
        .get(config::RUST_LOG.name)
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info,sqlx=warn,h2=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        // Colours only for a person at a terminal: a log file or collector gets plain text.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        // One object per line: the event's fields, the span it happened in (an RPC's method, request id, caller,
        // trace id) and the spans around it.
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
}
