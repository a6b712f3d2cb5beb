//! The access log: every RPC of every kiroku server runs inside an `rpc` span and ends with exactly one line
//! giving its method, gRPC code and latency (target `kiroku::access`).
//!
//! The code is known only at the very end: an error is a trailers-only response (`grpc-status` in the
//! headers), a success or a stream's end is in the trailers that follow the body. So the line is written when
//! the response body is dropped, with whatever status it saw; a call dropped before its status (the client went
//! away) is `CANCELLED`. The caller check adds the verified `caller`, and handlers what only they know:
//! `request_id` (AIP-155, from the message body) and `command_id`. The span continues the caller's W3C trace
//! (`traceparent`; see `trace.rs`) and carries its `trace_id` and `span_id`; the `traceparent` to pass on goes
//! into the request's extensions, for the events the call writes.
//!
//! The same moment counts the call in `kiroku_grpc_server_handled_total{service, method, code}` and its
//! latency in `kiroku_grpc_server_handling_seconds{service, method}`. The labels come from the methods the port
//! really serves: any other path (a client is free to send one) is counted as `service="unknown"`, so that
//! nobody can grow the label set.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

/// The HTTP header (gRPC metadata) that carries a correlation id across services.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// Wraps a gRPC service so that each call gets a span, an access-log line and its metrics.
#[derive(Clone, Debug, Default)]
pub struct AccessLogLayer {
    /// The paths (`/package.Service/Method`) the port serves: the only values the metrics' labels take.
    known: Arc<HashSet<String>>,
}

impl AccessLogLayer {
    pub fn new(known: HashSet<String>) -> Self {
        AccessLogLayer { known: Arc::new(known) }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLog { inner, known: self.known.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
    known: Arc<HashSet<String>>,
}

/// The future every layer of the server (access log, caller check, shedding) returns.
pub(crate) type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AccessLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
{
    type Response = http::Response<Logged<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was made ready is the one to call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let method = request.uri().path().to_owned();
        let correlation_id = request
            .headers()
            .get(CORRELATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 128)
            .map(str::to_owned);
        let known = self.known.contains(&method);
        // A path this port does not serve is the client's text: quoted up to a bound, like any input.
        let shown = if known { std::borrow::Cow::Borrowed(method.as_str()) } else { crate::echo::clip(&method) };
        // The span shares the access log's target, so that whatever shows the line shows its fields too.
        let span = tracing::info_span!(
            target: "kiroku::access",
            "rpc",
            method = %shown,
            request_id = tracing::field::Empty,
            command_id = tracing::field::Empty,
            caller = tracing::field::Empty,
            correlation_id = correlation_id.as_deref(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            // The span's name is a label in trace stores too: a path this port does not serve is "unknown".
            otel.name = if known { method.as_str() } else { "unknown" },
            otel.kind = "server",
            rpc.system = "grpc",
        );
        let trace = crate::trace::continue_trace(&span, request.headers());
        span.record("trace_id", trace.trace_id.as_str()).record("span_id", trace.span_id.as_str());
        let mut request = request;
        request.extensions_mut().insert(trace.traceparent);
        let mut record =
            Record { span: span.clone(), method, known, started: Instant::now(), code: None, malformed: false };
        Box::pin(
            async move {
                let response = inner.call(request).await?;
                record.note(response.headers());
                Ok(response.map(|body| Logged { inner: body, record }))
            }
            .instrument(span),
        )
    }
}

/// A response body that notes the `grpc-status` of its trailers and writes the access-log line when dropped.
#[derive(Debug)]
pub struct Logged<B> {
    inner: B,
    record: Record,
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
        {
            this.record.note(trailers);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the access-log line says; written once, when dropped.
#[derive(Debug)]
struct Record {
    span: tracing::Span,
    method: String,
    /// Whether `method` is one the port serves (else its metrics say `unknown`).
    known: bool,
    started: Instant,
    code: Option<tonic::Code>,
    /// INTERNAL because the request could not be read (malformed protobuf or framing), not because kiroku failed.
    malformed: bool,
}

/// How tonic (and prost, through it) words the INTERNAL of a request it cannot read: the gRPC status guide makes
/// that INTERNAL, but it is the client's fault, and must not look like kiroku's.
const MALFORMED_REQUEST: [&str; 5] = [
    "failed to decode Protobuf message",
    "protocol error:",
    "Error decompressing:",
    "Unexpected EOF decoding stream",
    "Message compressed, compression support not enabled",
];

impl Record {
    /// The status of a response's headers (trailers-only) or trailers, when they carry one.
    fn note(&mut self, headers: &HeaderMap) {
        let Some(code) = grpc_status(headers) else { return };
        self.code = Some(code);
        if code == tonic::Code::Internal {
            // grpc-message is percent-encoded; the status reads it back.
            let message = tonic::Status::from_header_map(headers).map(|s| s.message().to_owned()).unwrap_or_default();
            self.malformed = MALFORMED_REQUEST.iter().any(|prefix| message.starts_with(prefix));
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let code = code_name(self.code.unwrap_or(tonic::Code::Cancelled));
        let elapsed = self.started.elapsed();
        let (service, method) = match self.method.trim_start_matches('/').split_once('/') {
            Some((service, method)) if self.known => (service.to_owned(), method.to_owned()),
            _ => ("unknown".to_owned(), "unknown".to_owned()),
        };
        let malformed = if self.malformed { "true" } else { "false" };
        metrics::counter!("kiroku_grpc_server_handled_total", "service" => service.clone(), "method" => method.clone(), "code" => code, "malformed" => malformed)
            .increment(1);
        metrics::histogram!("kiroku_grpc_server_handling_seconds", "service" => service, "method" => method)
            .record(elapsed.as_secs_f64());
        let latency_ms = format_args!("{:.3}", elapsed.as_secs_f64() * 1000.0);
        let _entered = self.span.enter();
        // Health probes (every few seconds from orchestrators) and reflection (grpcurl) are plumbing: they log
        // at debug, so that the info log is kiroku's own API.
        if self.malformed {
            tracing::info!(target: "kiroku::access", %code, %latency_ms, malformed = true, "rpc finished: malformed request");
        } else if self.method.starts_with("/kiroku.") {
            tracing::info!(target: "kiroku::access", %code, %latency_ms, "rpc finished");
        } else {
            tracing::debug!(target: "kiroku::access", %code, %latency_ms, "rpc finished");
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|value| tonic::Code::from_bytes(value.as_bytes()))
}

/// The canonical name of a code, as grpcurl and every other gRPC tool print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
