//! An OTLP trace receiver on loopback (gRPC, and HTTP with protobuf bodies), standing in for an OpenTelemetry
//! collector: it keeps every span it is sent, with the name of the service that sent it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
pub use opentelemetry_proto::tonic::trace::v1::Span;

/// The spans received so far, each with its `service.name`.
#[derive(Clone, Default)]
pub struct OtlpReceiver(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for OtlpReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.keep(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl OtlpReceiver {
    fn keep(&self, request: ExportTraceServiceRequest) {
        let Ok(mut spans) = self.0.lock() else { return };
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
    }

    /// Serves OTLP/HTTP (`POST /v1/traces`, protobuf) on a free loopback port until the process ends; returns the
    /// address.
    pub async fn start_http(&self) -> anyhow::Result<SocketAddr> {
        use prost::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let receiver = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let receiver = receiver.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            receiver.keep(request);
                            let answer = ExportTraceServiceResponse::default().encode_to_vec();
                            (axum::http::StatusCode::OK, [("content-type", "application/x-protobuf")], answer)
                        }
                        Err(_) => {
                            (axum::http::StatusCode::BAD_REQUEST, [("content-type", "text/plain")], b"bad".to_vec())
                        }
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(address)
    }

    /// Serves on a free loopback port until the process ends; returns the address.
    pub async fn start(&self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(address)
    }

    /// How many spans have arrived.
    pub fn len(&self) -> usize {
        self.0.lock().map(|spans| spans.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `service` sent a span named `name` in trace `trace_id` (as its own trace, or through a link).
    pub fn has(&self, service: &str, name: &str, trace_id: &[u8]) -> bool {
        self.0.lock().is_ok_and(|spans| {
            spans.iter().any(|(from, span)| {
                from == service
                    && span.name == name
                    && (span.trace_id == trace_id || span.links.iter().any(|link| link.trace_id == trace_id))
            })
        })
    }

    /// How long the spans of each name took, in nanoseconds, by name.
    pub fn durations(&self) -> std::collections::BTreeMap<String, Vec<u64>> {
        let mut durations = std::collections::BTreeMap::<String, Vec<u64>>::new();
        if let Ok(spans) = self.0.lock() {
            for (_, span) in spans.iter() {
                let took = span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano);
                durations.entry(span.name.clone()).or_default().push(took);
            }
        }
        durations
    }

    /// The first span named `name`.
    pub fn span(&self, name: &str) -> Option<Span> {
        self.0.lock().ok()?.iter().find(|(_, span)| span.name == name).map(|(_, span)| span.clone())
    }
}
