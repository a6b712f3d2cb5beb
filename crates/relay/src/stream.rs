//! The Redis stream's format, in one place: its keys, and the fields of its entries (DESIGN.md, "Redis").
//!
//! - `{prefix}:events` holds one entry per event, in global position order, with id `<position>-0` and the fields
//!   `position`, `prev_position` (the position published just before it), `event_id`, `aggregate_id`,
//!   `aggregate_type`, `event_type`, `version`, `payload` (JSON: `data`, `metadata`, `occurred_at`).
//! - `{prefix}:events:dead` holds the projector's dead letters.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use kiroku_event_store::{Position, RecordedEvent};

/// The stream every event is published to.
pub fn events_key(prefix: &str) -> String {
    format!("{prefix}:events")
}

/// The stream dead letters are published to.
pub fn dead_letters_key(prefix: &str) -> String {
    format!("{prefix}:events:dead")
}

/// What a Redis user needs to connect and nothing more (ACL rules).
/// What the client does on every connection: among it, `INFO server` (fred reads the server's version, and warns
/// when it may not), and no other section of INFO.
const CONNECT: [&str; 8] =
    ["+ping", "+auth", "+hello", "+select", "+client|setname", "+client|id", "+info|server", "+quit"];

/// The Redis ACL rules (the arguments after `ACL SETUSER <name> on ><password>`) of each kind of user of the
/// stream of `prefix`: least privilege on Redis as on PostgreSQL.
#[derive(Clone, Debug)]
pub struct AclRules {
    /// The relay: writes the stream (through its publish script), nothing else.
    pub relay: Vec<String>,
    /// The projector: reads the stream and manages its consumer group; writes only the dead letters.
    pub projector: Vec<String>,
    /// The query service: pings (its health probe).
    pub query: Vec<String>,
}

pub fn acl_rules(prefix: &str) -> AclRules {
    let events = events_key(prefix);
    let dead = dead_letters_key(prefix);
    let rules = |keys: &[String], commands: &[&str], more: &[String]| -> Vec<String> {
        let mut rules = vec!["resetkeys".to_owned(), "resetchannels".to_owned(), "-@all".to_owned()];
        rules.extend(keys.iter().map(|key| format!("~{key}")));
        rules.extend(CONNECT.iter().chain(commands).map(|c| (*c).to_owned()));
        rules.extend(more.iter().cloned());
        rules
    };
    AclRules {
        // XDEL and the dead letters: an erasure's scrub of entries published in clear (see `Relay::scrub`).
        relay: rules(
            std::slice::from_ref(&events),
            &["+eval", "+evalsha", "+exists", "+xinfo|stream", "+xadd", "+xdel"],
            &[format!("(~{dead} +xrange +xdel)")],
        ),
        projector: rules(
            &[events],
            &[
                "+xreadgroup",
                "+xack",
                "+xautoclaim",
                "+xgroup|create",
                "+xgroup|delconsumer",
                "+xinfo|consumers",
                "+xinfo|groups",
            ],
            // A selector: the dead-letter stream, to add dead letters and to remove those of a replayed event or
            // of a generation that was replaced.
            &[format!("(~{dead} +xadd +xrange +xdel)")],
        ),
        query: rules(&[], &[], &[]),
    }
}

/// How many fields an event entry has.
pub const ENTRY_FIELDS: usize = 8;

/// One event as the stream carries it, chained to the entry published before it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The position published just before this one: a consumer that has not seen it has missed something.
    pub prev_position: Position,
    pub event: RecordedEvent,
}

/// A stream entry that is not an event entry of this format.
#[derive(Debug, thiserror::Error)]
#[error("malformed stream entry: {0}")]
pub struct EntryError(String);

impl Entry {
    /// The entry id: the position, so that the stream itself refuses duplicates and disorder.
    pub fn id(&self) -> String {
        format!("{}-0", self.event.position)
    }

    /// The fields in the order of the contract, `position` first.
    pub fn encode(&self) -> Result<[(&'static str, String); ENTRY_FIELDS], serde_json::Error> {
        encode_fields(self.prev_position, &self.event)
    }

    /// Reads an entry's fields back. The stream does not keep the commit time, so `created_at` is the time the
    /// event occurred.
    pub fn decode(fields: &HashMap<String, String>) -> Result<Entry, EntryError> {
        let get = |name: &str| fields.get(name).ok_or_else(|| EntryError(format!("no {name}")));
        let parse_error = |name: &str| EntryError(format!("{name} does not parse"));
        let payload: serde_json::Value = serde_json::from_str(get("payload")?).map_err(|_| parse_error("payload"))?;
        let occurred_at: DateTime<Utc> = payload
            .get("occurred_at")
            .and_then(serde_json::Value::as_str)
            .and_then(|at| at.parse().ok())
            .ok_or_else(|| parse_error("payload.occurred_at"))?;
        let position = |name: &str| -> Result<Position, EntryError> {
            get(name)?.parse().map(Position::new).map_err(|_| parse_error(name))
        };
        Ok(Entry {
            prev_position: position("prev_position")?,
            event: RecordedEvent {
                position: position("position")?,
                event_id: get("event_id")?.parse().map_err(|_| parse_error("event_id"))?,
                aggregate_id: get("aggregate_id")?.parse().map_err(|_| parse_error("aggregate_id"))?,
                aggregate_type: get("aggregate_type")?.clone(),
                event_type: get("event_type")?.clone(),
                version: get("version")?.parse().map_err(|_| parse_error("version"))?,
                data: payload.get("data").cloned().ok_or_else(|| parse_error("payload.data"))?,
                metadata: payload.get("metadata").cloned().ok_or_else(|| parse_error("payload.metadata"))?,
                occurred_at,
                created_at: occurred_at,
            },
        })
    }
}

/// The fields of the entry of `event`, chained to `prev_position`, in the order of the contract (`position`
/// first). The relay publishes from here without copying the event into an [`Entry`].
pub fn encode_fields(
    prev_position: Position,
    event: &RecordedEvent,
) -> Result<[(&'static str, String); ENTRY_FIELDS], serde_json::Error> {
    let payload = serde_json::json!({
        "data": event.data,
        "metadata": event.metadata,
        "occurred_at": event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    });
    Ok([
        ("position", event.position.to_string()),
        ("prev_position", prev_position.to_string()),
        ("event_id", event.event_id.to_string()),
        ("aggregate_id", event.aggregate_id.to_string()),
        ("aggregate_type", event.aggregate_type.clone()),
        ("event_type", event.event_type.clone()),
        ("version", event.version.to_string()),
        ("payload", serde_json::to_string(&payload)?),
    ])
}

/// The position an entry's fields announce, if any (also for entries that do not decode).
pub fn entry_position(fields: &HashMap<String, String>) -> Option<Position> {
    fields.get("position")?.parse().ok().map(Position::new)
}

/// A dead letter: an event the projection `projection` skipped after `attempts` failed attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetterEntry {
    pub projection: String,
    /// The generation of the read models it failed in: a rebuild's dead letters go when its generation does.
    pub generation: i32,
    pub event: RecordedEvent,
    pub attempts: i32,
    pub error: String,
}

impl DeadLetterEntry {
    /// The fields of its entry in `{prefix}:events:dead`.
    pub fn encode(&self) -> Vec<(&'static str, String)> {
        let event = &self.event;
        vec![
            ("projection", self.projection.clone()),
            ("generation", self.generation.to_string()),
            ("position", event.position.to_string()),
            ("event_id", event.event_id.to_string()),
            ("aggregate_id", event.aggregate_id.to_string()),
            ("aggregate_type", event.aggregate_type.clone()),
            ("event_type", event.event_type.clone()),
            ("version", event.version.to_string()),
            ("attempts", self.attempts.to_string()),
            ("error", self.error.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> RecordedEvent {
        let at: DateTime<Utc> = "2026-11-27T06:00:00.123456Z".parse().unwrap();
        RecordedEvent {
            position: Position::new(123_456_789),
            event_id: ulid::Ulid::new(),
            aggregate_id: uuid::Uuid::new_v4(),
            aggregate_type: "User".to_owned(),
            event_type: "UserRegistered".to_owned(),
            version: kiroku_event_store::Version::from(3u16),
            data: serde_json::json!({ "personal": { "github_username": "octocat" } }),
            metadata: serde_json::json!({ "correlation_id": "c", "schema_version": 1 }),
            occurred_at: at,
            created_at: at,
        }
    }

    #[test]
    fn an_entry_decodes_back_to_what_was_encoded() {
        let entry = Entry { prev_position: Position::new(99), event: event() };
        let fields: HashMap<String, String> =
            entry.encode().unwrap().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(Entry::decode(&fields).unwrap(), entry);
        assert_eq!(entry.id(), "123456789-0");
        assert_eq!(entry_position(&fields), Some(Position::new(123_456_789)));
    }

    #[test]
    fn the_fields_follow_the_contract_in_order() {
        let entry = Entry { prev_position: Position::ZERO, event: event() };
        let names: Vec<&str> = entry.encode().unwrap().iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "position",
                "prev_position",
                "event_id",
                "aggregate_id",
                "aggregate_type",
                "event_type",
                "version",
                "payload"
            ]
        );
        assert_eq!(events_key("kiroku"), "kiroku:events");
        assert_eq!(dead_letters_key("kiroku"), "kiroku:events:dead");
    }

    #[test]
    fn a_malformed_entry_is_an_error_not_an_event() {
        let entry = Entry { prev_position: Position::ZERO, event: event() };
        let mut fields: HashMap<String, String> =
            entry.encode().unwrap().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        fields.insert("version".to_owned(), "three".to_owned());
        assert!(Entry::decode(&fields).is_err());
        fields.remove("payload");
        assert!(Entry::decode(&fields).is_err());
    }
}
