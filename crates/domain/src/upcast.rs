//! Upcasting: every payload, whatever schema version wrote it, read as today's type. One chain of steps per
//! event type, here and nowhere else; readers call [`upcast`] on an opened payload before decoding it.
//!
//! Schema 1 (before encryption) spread personal fields over the payload in clear: `auth0_id`, `github_id` and
//! `github_etag` at the top, the profile under `personal`. Schema 2 puts every personal field under `personal`,
//! the one part the log stores sealed under the person's data key (see the vault). A payload without `personal`
//! but with `"erased": true` is one whose person was erased: it upcasts like any other, its personal part absent.

use serde_json::{Map, Value};

use crate::{SCHEMA_VERSION, UserProfileUpdated, UserRegistered, UserRegistrationFailed};

/// The member of a payload that holds everything personal (schema 2 and later).
pub const PERSONAL: &str = "personal";
/// The member that marks a payload whose personal part is gone with its person's data key.
pub const ERASED: &str = "erased";

/// The schema-1 members of each event type that are personal, besides `personal` itself.
fn personal_v1(event_type: &str) -> &'static [&'static str] {
    match event_type {
        UserRegistered::EVENT_TYPE => &["auth0_id", "github_id", "github_etag"],
        UserProfileUpdated::EVENT_TYPE => &["github_etag"],
        UserRegistrationFailed::EVENT_TYPE => &["auth0_id", "github_id"],
        _ => &[],
    }
}

/// `data` of `event_type`, written at `schema_version`, as today's schema reads it. Versions above today's (a
/// newer kiroku wrote them) are returned as they are.
pub fn upcast(event_type: &str, schema_version: u32, mut data: Value) -> Value {
    for version in schema_version.max(1)..SCHEMA_VERSION {
        data = match version {
            1 => v1_to_v2(event_type, data),
            _ => data,
        };
    }
    data
}

/// Schema 1 → 2: the personal members move under `personal` (which the profile already used).
fn v1_to_v2(event_type: &str, data: Value) -> Value {
    let Value::Object(mut payload) = data else { return data };
    let moved: Vec<(String, Value)> = personal_v1(event_type)
        .iter()
        .filter_map(|name| payload.remove(*name).map(|v| ((*name).to_owned(), v)))
        .collect();
    if !moved.is_empty() {
        let personal = payload.entry(PERSONAL).or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(personal) = personal {
            personal.extend(moved);
        }
    }
    Value::Object(payload)
}

/// A stored payload of `event_type` at `schema_version` with its personal members removed and the erased marker
/// set: what an erasure writes over a row that predates encryption (the one mutation the log allows). `None`
/// when the payload holds nothing personal.
pub fn redact(event_type: &str, schema_version: u32, data: &Value) -> Option<Value> {
    let Value::Object(payload) = data else { return None };
    let mut redacted = payload.clone();
    let mut removed = redacted.remove(PERSONAL).is_some();
    if schema_version <= 1 {
        for name in personal_v1(event_type) {
            removed |= redacted.remove(*name).is_some();
        }
    }
    if !removed {
        return None;
    }
    redacted.insert(ERASED.to_owned(), Value::Bool(true));
    Some(Value::Object(redacted))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{AuditEvent, UserEvent};

    /// A UserRegistered as kiroku wrote it before encryption.
    fn registered_v1() -> Value {
        json!({
            "auth0_id": "github|583231",
            "github_id": "583231",
            "personal": {
                "github_username": "octocat",
                "display_name": "The Octocat",
                "avatar_url": "https://avatars.githubusercontent.com/u/583231",
            },
            "registered_at": "2026-11-27T06:00:00Z",
            "github_etag": "\"abc\"",
        })
    }

    #[test]
    fn a_schema_1_registration_reads_as_todays_type() {
        let data = upcast("UserRegistered", 1, registered_v1());
        let Some(Ok(UserEvent::UserRegistered(event))) = UserEvent::decode("UserRegistered", &data) else {
            panic!("{data}")
        };
        let personal = event.personal.unwrap();
        assert_eq!(personal.auth0_id.to_string(), "github|583231");
        assert_eq!((personal.github_username.as_str(), personal.github_etag.as_deref()), ("octocat", Some("\"abc\"")));
    }

    #[test]
    fn schema_1_updates_and_refusals_read_as_todays_types() {
        let updated = json!({ "personal": { "display_name": "Octo" }, "updated_at": "2026-11-27T06:00:00Z", "github_etag": "\"e\"" });
        let data = upcast("UserProfileUpdated", 1, updated);
        let Some(Ok(UserEvent::UserProfileUpdated(event))) = UserEvent::decode("UserProfileUpdated", &data) else {
            panic!("{data}")
        };
        let changes = event.personal.unwrap();
        assert_eq!((changes.display_name.as_deref(), changes.github_etag.as_deref()), (Some("Octo"), Some("\"e\"")));

        let failed = json!({ "auth0_id": "github|7", "github_id": "7", "reason": "DUPLICATE_AUTH0_ID", "attempted_at": "2026-11-27T06:00:00Z" });
        let data = upcast("UserRegistrationFailed", 1, failed);
        let Some(Ok(AuditEvent::UserRegistrationFailed(event))) = AuditEvent::decode("UserRegistrationFailed", &data)
        else {
            panic!("{data}")
        };
        assert_eq!(event.personal.unwrap().github_id.get(), 7);
    }

    #[test]
    fn todays_payloads_are_left_as_they_are() {
        let data = json!({ "registered_at": "2026-11-27T06:00:00Z", "personal": { "auth0_id": "github|1" } });
        assert_eq!(upcast("UserRegistered", SCHEMA_VERSION, data.clone()), data);
    }

    #[test]
    fn a_redacted_schema_1_row_keeps_only_what_is_not_personal() {
        let redacted = redact("UserRegistered", 1, &registered_v1()).unwrap();
        assert_eq!(redacted, json!({ "registered_at": "2026-11-27T06:00:00Z", "erased": true }));
        let data = upcast("UserRegistered", 1, redacted.clone());
        let Some(Ok(UserEvent::UserRegistered(event))) = UserEvent::decode("UserRegistered", &data) else {
            panic!("{data}")
        };
        assert_eq!(event.personal, None);
        assert_eq!(redact("UserRegistered", 1, &redacted), None, "nothing personal is left to redact");
        assert_eq!(redact("UserReactivated", 1, &json!({ "reactivated_at": "2026-11-27T06:00:00Z" })), None);
    }
}
