//! Logs and traces. Log lines go to stderr, filtered by `RUST_LOG` (default `info`, with sqlx and h2 quieter), as
//! text for a person or as JSON objects for a collector (`KIROKU_LOG_FORMAT`). Spans are exported over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or a protocol) is set, under
//! `OTEL_SERVICE_NAME` (default: the program's name), as the OpenTelemetry specification reads those variables:
//! `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or else `OTEL_EXPORTER_OTLP_PROTOCOL`, `grpc` or `http/protobuf` (the
//! default), anything else a bad setting (exit 64); an HTTP base endpoint gets `/v1/traces` appended, a
//! signal's own endpoint is taken as it is; a protocol without an endpoint goes to the protocol's default
//! (`http://localhost:4317` for gRPC, `http://localhost:4318` for HTTP). Without any, no OpenTelemetry layer is
//! installed at all, so spans cost what they cost without it. The W3C trace-context propagator is set either way
//! (see `trace.rs`).

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

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how spans are exported, from the OpenTelemetry variables (see the module's comment); `None`: not at
/// all. An unsupported protocol is a [`config::ConfigError`] naming its variable.
pub(crate) fn otlp_export(source: &dyn Source) -> Result<Option<(OtlpProtocol, String)>, config::ConfigError> {
    let set = |name: &str| source.get(name).filter(|value| !value.trim().is_empty());
    let chosen = [config::OTLP_TRACES_PROTOCOL.name, config::OTLP_PROTOCOL.name]
        .into_iter()
        .find_map(|name| set(name).map(|value| (name, value)));
    let protocol = match &chosen {
        None => OtlpProtocol::HttpProtobuf,
        Some((_, value)) if value.trim() == "grpc" => OtlpProtocol::Grpc,
        Some((_, value)) if value.trim() == "http/protobuf" => OtlpProtocol::HttpProtobuf,
        Some((name, _)) => {
            return Err(config::ConfigError::new(
                name,
                "takes grpc or http/protobuf (http/json is not supported by this build)",
            ));
        }
    };
    let (default_base, signal_path) = match protocol {
        OtlpProtocol::Grpc => ("http://localhost:4317", ""),
        OtlpProtocol::HttpProtobuf => ("http://localhost:4318", "/v1/traces"),
    };
    let endpoint = match (set(config::OTLP_TRACES_ENDPOINT.name), set(config::OTLP_ENDPOINT.name)) {
        (Some(traces), _) => traces.trim().to_owned(),
        (None, Some(base)) => format!("{}{signal_path}", base.trim().trim_end_matches('/')),
        (None, None) if chosen.is_some() => format!("{default_base}{signal_path}"),
        (None, None) => return Ok(None),
    };
    Ok(Some((protocol, endpoint)))
}

/// The OTLP/HTTP exporter's client: kiroku's own HTTP client on the runtime that started tracing. The batch
/// processor exports from a thread of its own; the request runs on the runtime, and the thread waits for it.
#[derive(Debug)]
struct RuntimeHttp {
    client: Option<reqwest::Client>,
    runtime: Option<tokio::runtime::Handle>,
}

impl RuntimeHttp {
    fn new() -> Self {
        RuntimeHttp { client: crate::auth::http_client().ok(), runtime: tokio::runtime::Handle::try_current().ok() }
    }
}

#[tonic::async_trait]
impl opentelemetry_http::HttpClient for RuntimeHttp {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<opentelemetry_http::Response<opentelemetry_http::Bytes>, opentelemetry_http::HttpError> {
        let (Some(client), Some(runtime)) = (self.client.clone(), self.runtime.clone()) else {
            return Err("no HTTP client or runtime for the OTLP exporter".into());
        };
        let request = reqwest::Request::try_from(request)?;
        let sent = runtime.spawn(async move {
            let response = client.execute(request).await?;
            let mut answer = opentelemetry_http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                answer = answer.header(name, value);
            }
            let body = crate::auth::read_capped(response, 4 * 1024 * 1024).await?;
            Ok::<_, anyhow::Error>(answer.body(opentelemetry_http::Bytes::from(body))?)
        });
        Ok(sent.await??)
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
    let export = otlp_export(source).unwrap_or_else(|error| config::exit_on_config_error(&program, &error));
    let endpoint = export.as_ref().map(|(_, endpoint)| endpoint.clone());
    let service = source.get(config::OTEL_SERVICE_NAME.name).filter(|name| !name.is_empty()).unwrap_or(program);
    let exporter = export.map(|(protocol, endpoint)| match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build(),
        OtlpProtocol::HttpProtobuf => {
            use opentelemetry_otlp::WithHttpConfig;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(5))
                .with_http_client(RuntimeHttp::new())
                .build()
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn export(pairs: &'static [(&'static str, &'static str)]) -> Result<Option<(OtlpProtocol, String)>, String> {
        let source = move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned());
        otlp_export(&source).map_err(|e| e.name.to_owned())
    }

    #[test]
    fn the_otlp_variables_are_read_as_the_specification_says() {
        use OtlpProtocol::{Grpc, HttpProtobuf};
        assert_eq!(export(&[]), Ok(None), "nothing set: no export");
        // http/protobuf by default; a base endpoint gets the signal's path.
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]),
            Ok(Some((HttpProtobuf, "http://collector:4318/v1/traces".to_owned())))
        );
        // A signal's own endpoint is taken as it is.
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/custom")]),
            Ok(Some((HttpProtobuf, "http://collector:4318/custom".to_owned())))
        );
        assert_eq!(
            export(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
            ]),
            Ok(Some((Grpc, "http://collector:4317".to_owned())))
        );
        // The traces protocol wins over the general one.
        assert_eq!(
            export(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ]),
            Ok(Some((HttpProtobuf, "http://c:4318/v1/traces".to_owned())))
        );
        // A protocol alone: its default endpoint and port.
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            Ok(Some((Grpc, "http://localhost:4317".to_owned())))
        );
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")]),
            Ok(Some((HttpProtobuf, "http://localhost:4318/v1/traces".to_owned())))
        );
        // Unsupported: a bad setting, named.
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Err("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned())
        );
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")]),
            Err("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL".to_owned())
        );
    }
}
