//! Logs and traces. Log lines go to stderr, filtered by `RUST_LOG` (default `info`, with sqlx and h2 quieter), as
//! text for a person or as JSON objects for a collector (`KIROKU_LOG_FORMAT`). Spans are exported over OTLP
//! (gRPC) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, under
//! `OTEL_SERVICE_NAME` (default: the program's name); otherwise no OpenTelemetry layer is installed at all, so
//! spans cost what they cost without it. The W3C trace-context propagator is set either way (see `trace.rs`).

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::{self, LogFormat, Source};

/// Keeps the span exporter alive; dropping it flushes what is buffered (for at most 1 s).
#[must_use = "dropping it stops the span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Blocking: the exporter's calls run on the runtime's other threads (the services' runtimes are
            // multi-threaded). One second, so that a stop still fits the 10 s the contract gives it.
            let _ = provider.shutdown_with_timeout(Duration::from_secs(1));
        }
    }
}

/// Starts logging (and tracing, when an OTLP endpoint is set) from `source` (the command line or the
/// environment). Call it inside the Tokio runtime: the OTLP exporter's connection belongs to it. An unknown log
/// format exits 64, like every other bad setting; an exporter that cannot be built is logged and left off.
pub fn init_tracing(source: &dyn Source) -> Telemetry {
    let program = std::env::args().next().unwrap_or_default();
    let program = program.rsplit('/').next().filter(|p| !p.is_empty()).unwrap_or("kiroku").to_owned();
    let format = config::log_format(source).unwrap_or_else(|error| config::exit_on_config_error(&program, &error));
    crate::trace::install_propagator();
    let filter = source
        .get(config::RUST_LOG.name)
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info,sqlx=warn,h2=warn"));
    let endpoint = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|name| source.get(name).filter(|value| !value.trim().is_empty()));
    let service = source.get("OTEL_SERVICE_NAME").filter(|name| !name.is_empty()).unwrap_or(program);
    let exporter = endpoint.as_ref().map(|endpoint| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
    });
    let (provider, exporter_error) = match exporter {
        Some(Ok(exporter)) => {
            let resource = Resource::builder().with_service_name(service).build();
            (Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()), None)
        }
        Some(Err(error)) => (None, Some(error)),
        None => (None, None),
    };
    let otel = provider.as_ref().map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("kiroku")));
    // Colours only for a person at a terminal: a log file or collector gets plain text.
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal())
    });
    // One object per line: the event's fields, the span it happened in (an RPC's method, request id, caller,
    // trace and span ids) and the spans around it.
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry().with(filter).with(text).with(json).with(otel).try_init();
    // The endpoint without any user or password it may carry.
    let shown = endpoint.as_deref().map(|endpoint| match url::Url::parse(endpoint) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => "(unparsable)".to_owned(),
    });
    if let Some(error) = exporter_error {
        tracing::error!(%error, endpoint = shown.as_deref(), "cannot export spans over OTLP; tracing is off");
    } else if let Some(endpoint) = shown {
        tracing::info!(%endpoint, "exporting spans over OTLP");
    }
    Telemetry { provider }
}
