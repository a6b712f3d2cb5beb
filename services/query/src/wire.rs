//! Converting to the wire: events (the one place stored events are decoded for clients, where old schema
//! versions will be upcast) and JSON into `google.protobuf.Struct`.

use kiroku::v1::Event;
use kiroku_event_store::RecordedEvent;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};

/// An event as the wire has it; by value, so that its strings move rather than copy.
pub(crate) fn event(event: RecordedEvent) -> Event {
    Event {
        position: event.position.get(),
        event_id: event.event_id.to_string(),
        aggregate_id: event.aggregate_id.to_string(),
        aggregate_type: event.aggregate_type,
        event_type: event.event_type,
        version: u64::from(event.version),
        occurred_at: Some(timestamp(event.occurred_at)),
        data: Some(to_struct(event.data)),
        metadata: Some(to_struct(event.metadata)),
    }
}

pub(crate) fn timestamp(at: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp { seconds: at.timestamp(), nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0) }
}

/// A JSON object as a Struct; anything else is wrapped as `{"value": …}` so nothing is lost.
pub(crate) fn to_struct(json: serde_json::Value) -> Struct {
    match json {
        serde_json::Value::Object(map) => Struct { fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect() },
        other => Struct { fields: [("value".to_owned(), to_value(other))].into_iter().collect() },
    }
}

fn to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => {
            Kind::ListValue(ListValue { values: items.into_iter().map(to_value).collect() })
        }
        object @ serde_json::Value::Object(_) => Kind::StructValue(to_struct(object)),
    };
    Value { kind: Some(kind) }
}
