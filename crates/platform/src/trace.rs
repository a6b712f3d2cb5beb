//! W3C trace context (`traceparent`) through kiroku. An RPC continues the caller's trace (or starts one); its
//! trace and span ids go into the RPC's span (so every log line of the call carries them) and, as a
//! `traceparent`, into the metadata of every event the call writes. The relay's publish and the projector's
//! apply of those events are spans linked to that trace, and WatchEvents subscribers get the `traceparent` in
//! each event's metadata. With no OpenTelemetry layer installed (no OTLP endpoint), the ids are still made and
//! passed on, so logs and events correlate; only the export is off.

use std::collections::HashSet;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header, and the metadata key events carry it under.
pub const TRACEPARENT: &str = "traceparent";

/// Makes W3C trace context the process's propagator (for any library that asks the global one).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// The trace context of one call, as a `traceparent` value; the access log puts it in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent(pub String);

/// Trace and span ids of a call, in hex, with the `traceparent` to pass on.
#[derive(Clone, Debug)]
pub struct CallTrace {
    pub trace_id: String,
    pub span_id: String,
    pub traceparent: TraceParent,
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// Continues the trace of the caller's `traceparent` header in `span` (a fresh trace without one) and says
/// which ids the call has. `span` must not have been entered yet.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) -> CallTrace {
    let parent_context = TraceContextPropagator::new().extract(&Headers(headers));
    let parent = parent_context.span().span_context().clone();
    // Without the OpenTelemetry layer this is refused (LayerNotFound), and the span's context stays invalid.
    let _ = span.set_parent(parent_context);
    let own = span.context().span().span_context().clone();
    let (trace_id, span_id, sampled) = if own.is_valid() {
        (own.trace_id(), own.span_id(), own.is_sampled())
    } else {
        // Nothing records this span: it is sampled only if the caller's was (then something upstream records).
        let ids = RandomIdGenerator::default();
        let trace_id = if parent.is_valid() { parent.trace_id() } else { ids.new_trace_id() };
        (trace_id, ids.new_span_id(), parent.is_valid() && parent.is_sampled())
    };
    let (trace_id, span_id) = (trace_id.to_string(), span_id.to_string());
    let traceparent = TraceParent(format!("00-{trace_id}-{span_id}-{:02x}", u8::from(sampled)));
    CallTrace { trace_id, span_id, traceparent }
}

/// The span context a `traceparent` value names, if it is well formed.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let context = TraceContextPropagator::new().extract(&One(traceparent));
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Links `span` to the traces named by the events' metadata (`traceparent`), once each. Does nothing when spans
/// are not exported.
pub fn link_to_events<'a>(span: &tracing::Span, metadata: impl IntoIterator<Item = &'a serde_json::Value>) {
    if !span.context().span().span_context().is_valid() {
        return;
    }
    let mut seen = HashSet::new();
    for traceparent in metadata.into_iter().filter_map(|m| m.get(TRACEPARENT).and_then(serde_json::Value::as_str)) {
        if seen.insert(traceparent)
            && let Some(linked) = parse(traceparent)
        {
            span.add_link(linked);
        }
    }
}
