//! The event store's types: the global position and a stream's version, events as written and read, appends
//! and what they answer, and the keys and erasures an append carries. Every other module of the store uses these;
//! this one uses none of them.

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

impl sqlx::postgres::PgHasArrayType for Position {
    fn array_type_info() -> PgTypeInfo {
        <i64 as sqlx::postgres::PgHasArrayType>::array_type_info()
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

/// The version of one aggregate's stream: the version of its last event, which is how many it holds (0: none
/// yet). An `integer` in the log, so 0 to `i32::MAX`: a version from outside the store (a request's expected
/// version) is made with [`Version::try_from`], which refuses anything else, and one read from the log is checked
/// as it is decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Version(i32);

impl Version {
    /// The version of a stream with no events.
    pub const NONE: Version = Version(0);

    pub const fn get(self) -> u32 {
        self.0.unsigned_abs()
    }
}

/// A version no stream of the log can have (above `i32::MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("version {0} is beyond any stream's")]
pub struct VersionOutOfRange(pub u64);

impl TryFrom<u64> for Version {
    type Error = VersionOutOfRange;

    fn try_from(value: u64) -> Result<Self, Self::Error> {
        i32::try_from(value).map(Version).map_err(|_| VersionOutOfRange(value))
    }
}

impl TryFrom<u32> for Version {
    type Error = VersionOutOfRange;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Version::try_from(u64::from(value))
    }
}

/// Every u16 is a version: for versions written out in code (`Version::from(2u16)`).
impl From<u16> for Version {
    fn from(value: u16) -> Version {
        Version(i32::from(value))
    }
}

impl From<Version> for u64 {
    fn from(version: Version) -> u64 {
        u64::from(version.get())
    }
}

impl From<Version> for u32 {
    fn from(version: Version) -> u32 {
        version.get()
    }
}

/// Text that is no version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a version (0 to 2147483647)")]
pub struct NotAVersion;

impl std::str::FromStr for Version {
    type Err = NotAVersion;

    /// A version as [`Display`](fmt::Display) writes it.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.parse::<i32>() {
            Ok(value) if value >= 0 => Ok(Version(value)),
            _ => Err(NotAVersion),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// A version is an `integer` in every table (events, idempotency records, read models): bound and read as one.
impl sqlx::Type<Postgres> for Version {
    fn type_info() -> PgTypeInfo {
        <i32 as sqlx::Type<Postgres>>::type_info()
    }
}

impl sqlx::postgres::PgHasArrayType for Version {
    fn array_type_info() -> PgTypeInfo {
        <i32 as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

impl sqlx::Encode<'_, Postgres> for Version {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <i32 as sqlx::Encode<'_, Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl sqlx::Decode<'_, Postgres> for Version {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        let value = <i32 as sqlx::Decode<'_, Postgres>>::decode(value)?;
        if value < 0 {
            return Err(format!("a negative version ({value})").into());
        }
        Ok(Version(value))
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
    pub version: Version,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// The version an append expects its aggregate to be at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Whatever it is; only a concurrent append to the same aggregate conflicts.
    Any,
    /// The aggregate has no events yet.
    NoStream,
    /// Exactly this version (its last event's version).
    Exact(Version),
}

impl ExpectedVersion {
    /// As `kiroku_append` takes it: NULL for any version, 0 for no stream.
    pub(crate) fn as_sql(self) -> Option<Version> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(Version::NONE),
            ExpectedVersion::Exact(version) => Some(version),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// A unique key that the appended aggregate takes (e.g. kind `github_id`, value `1234`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    pub kind: String,
    pub value: String,
}

/// Identifies one command of one caller (AIP-155).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub caller: String,
    pub request_id: String,
}

/// The answer to store with the events, returned to any later append with the same key.
#[derive(Clone, Debug)]
pub struct IdempotencyRecord {
    pub key: IdempotencyKey,
    pub outcome: serde_json::Value,
}

/// One append: events to one aggregate, the claims they take, and the command's idempotency record.
#[derive(Clone, Debug)]
pub struct Append {
    pub aggregate_id: Uuid,
    pub aggregate_type: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub claims: Vec<Claim>,
    pub idempotency: Option<IdempotencyRecord>,
    /// The data key of a new owner, stored with the events sealed under it.
    pub new_key: Option<WrappedKey>,
    /// An erasure: its writes commit with its event, or neither does.
    pub erasure: Option<Erasure>,
}

/// What a committed append wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub aggregate_id: Uuid,
    /// The aggregate's version after the append.
    pub version: Version,
    /// One per event, in order.
    pub positions: Vec<Position>,
    pub event_ids: Vec<Ulid>,
}

impl Appended {
    /// The position of the last event written: a read-your-writes token.
    pub fn last_position(&self) -> Position {
        self.positions.last().copied().unwrap_or(Position::ZERO)
    }
}

/// The answer an earlier command with the same idempotency key stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredOutcome {
    pub outcome: serde_json::Value,
    pub aggregate_id: Uuid,
    pub version: Version,
    pub position: Position,
}

/// The result of an append that did not fail.
#[derive(Clone, Debug, PartialEq)]
pub enum AppendOutcome {
    /// The events were committed.
    Appended(Appended),
    /// The idempotency key was already used: nothing was written, here is the first answer.
    Replayed(StoredOutcome),
}

/// A data key as stored: wrapped (encrypted) by the master key named `master_key_id`.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub owner: Uuid,
    pub master_key_id: String,
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey").field("owner", &self.owner).field("master_key_id", &self.master_key_id).finish()
    }
}

/// What the store holds for an owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredKey {
    Live(WrappedKey),
    /// Destroyed by an erasure: whatever was sealed under it can never be opened again.
    Destroyed,
}

/// What an erasure does besides appending its event, in the same transaction: destroy the owner's data key
/// (leaving a tombstone), release every claim the owner holds, forget the stored answers that tie the person to
/// the owner, and redact events written before encryption.
#[derive(Clone, Debug)]
pub struct Erasure {
    pub owner: Uuid,
    /// Events (by position) and the payload to store instead (see `kiroku_redact_events`: members may only go).
    pub redactions: Vec<(Position, serde_json::Value)>,
    /// Idempotency records whose caller starts with one of these, and whose stored answer names the owner
    /// (`outcome.user_id`), are deleted: those keyed by the person (a keyed hash of their subject), not by a
    /// service.
    pub forget_callers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_what_the_logs_integer_column_can_hold_and_nothing_else() {
        assert_eq!(Version::try_from(0u64), Ok(Version::NONE));
        assert_eq!(Version::try_from(2_147_483_647u64).map(u64::from), Ok(2_147_483_647));
        assert_eq!(Version::try_from(2_147_483_648u64), Err(VersionOutOfRange(2_147_483_648)));
        assert_eq!(Version::try_from(u32::MAX), Err(VersionOutOfRange(u64::from(u32::MAX))));
        assert_eq!("7".parse::<Version>(), Ok(Version::from(7u16)));
        assert_eq!("-1".parse::<Version>(), Err(NotAVersion));
        assert_eq!("2147483648".parse::<Version>(), Err(NotAVersion));
        assert_eq!(serde_json::to_string(&Version::from(3u16)).unwrap(), "3");
        assert!(serde_json::from_str::<Version>("3000000000").is_err());
    }
}
