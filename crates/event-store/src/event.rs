//! Events as the store writes and reads them, and the global position.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef, Postgres};
use ulid::Ulid;
use uuid::Uuid;

/// The global position of an event: unique, strictly increasing in delivery order, with gaps.
///
/// `Position::ZERO` is "before every event".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(u64);

impl Position {
    pub const ZERO: Position = Position(0);

    pub const fn new(value: u64) -> Self {
        Position(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// As PostgreSQL's bigint. Positions come from xid8 values far below 2^47, so they always fit; anything
    /// larger is clamped, which for a lower bound only means "nothing is after it".
    fn as_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }
}

// A position is a `bigint` in every table (events, checkpoints, read models): bind and read it as one, so that no
// caller converts by hand.
impl sqlx::Type<Postgres> for Position {
    fn type_info() -> PgTypeInfo {
        <i64 as sqlx::Type<Postgres>>::type_info()
    }
}

impl sqlx::Encode<'_, Postgres> for Position {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <i64 as sqlx::Encode<'_, Postgres>>::encode_by_ref(&self.as_i64(), buf)
    }
}

impl sqlx::Decode<'_, Postgres> for Position {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        let value = <i64 as sqlx::Decode<'_, Postgres>>::decode(value)?;
        // The horizon of an empty cluster can be -1; "before everything" is the same position as zero.
        Ok(Position(u64::try_from(value).unwrap_or(0)))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What every event carries besides its payload. Serialized with snake_case keys into `events.metadata`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The caller's request id (AIP-155), when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Shared by everything one request caused.
    pub correlation_id: String,
    /// What directly caused this event (the request, or an earlier event).
    pub causation_id: String,
    /// The version of the payload's schema, for upcasting old events.
    pub schema_version: u32,
    /// The service that called (its verified token's `sub` and `azp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<CallerRef>,
    /// The W3C trace context of the call that wrote the event (`00-<trace id>-<span id>-<flags>`), so that what
    /// follows it (the relay, the projector, subscribers) can join the same trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Who called: a verified caller token's subject and authorized party.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerRef {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azp: Option<String>,
}

/// An event to append. Its id, version and position are assigned by the store.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_type: String,
    pub data: serde_json::Value,
    pub metadata: EventMetadata,
    pub occurred_at: DateTime<Utc>,
}

/// An event as committed.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    pub position: Position,
    pub event_id: Ulid,
    pub aggregate_id: Uuid,
    pub aggregate_type: String,
    pub event_type: String,
    pub version: u32,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}
