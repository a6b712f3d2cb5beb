//! kiroku's domain, pure and synchronous: for each aggregate, `decide` (which events a command produces) and
//! `evolve` (what state events build). No I/O here: token checks and GitHub calls happen before, appends after.
//!
//! Events are serde-tagged enums whose variant names are the event types, stored as `event_type` plus the
//! variant's payload as versioned JSON (`schema_version` in the metadata). The `events!` macro below gives each
//! enum its one list of type names, and its `encode` and `decode`: the one place payloads are written and read.

mod audit;
mod ids;
mod upcast;
mod user;

pub use audit::{
    AttemptPersonal, AuditCommand, AuditEvent, RegistrationAudit, RegistrationRefusal, UserRegistrationFailed,
};
pub use ids::{AuditId, Auth0Subject, ClaimKind, GitHubId, IdError, UserId};
pub use upcast::{ERASED, PERSONAL, redact, upcast};
pub use user::{
    DeactivationReason, GitHubProfile, PersonalProfile, ProfileChanges, RegisterUser, RegisteredPersonal, SyncProfile,
    User, UserCommand, UserDeactivated, UserErased, UserError, UserEvent, UserProfileUpdated, UserReactivated,
    UserRegistered, UserStatus,
};

/// The version of every payload schema written today. 1: personal fields in clear, spread over the payload.
/// 2: every personal field under `personal`, which the log stores sealed under the person's data key.
pub const SCHEMA_VERSION: u32 = 2;

/// An event payload that does not match its type's schema. Its message names the type and where the payload
/// went wrong, never a value (serde's own message may quote one, and payloads hold personal data).
#[derive(Debug, thiserror::Error)]
#[error("cannot decode a {event_type} event: {:?} error at line {}, column {}", cause.classify(), cause.line(), cause.column())]
pub struct DecodeError {
    pub event_type: String,
    pub cause: serde_json::Error,
}

/// An event that cannot be written as JSON (a payload type that serde cannot represent: a bug, never data).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode a {event_type} event: {source}")]
pub struct EncodeError {
    pub event_type: &'static str,
    #[source]
    pub source: serde_json::Error,
}

/// Defines an aggregate's event enum: one variant per event, named after its payload type, which is also the
/// event type stored in the log. Serde tags it with `event_type` and `data`, which is how `encode` and
/// `decode` split it into the log's two columns and join them back.
macro_rules! events {
    ($(#[$meta:meta])* pub enum $name:ident ($aggregate:literal) { $($variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(tag = "event_type", content = "data")]
        pub enum $name {
            $($variant($variant),)+
        }

        $(
            impl $variant {
                /// The event type stored with this event.
                pub const EVENT_TYPE: &'static str = stringify!($variant);
            }
        )+

        impl $name {
            /// The aggregate type these events belong to.
            pub const AGGREGATE_TYPE: &'static str = $aggregate;
            /// Every event type of the aggregate.
            pub const TYPES: &'static [&'static str] = &[$(stringify!($variant)),+];

            /// The type stored with the event.
            pub fn event_type(&self) -> &'static str {
                match self {
                    $($name::$variant(_) => stringify!($variant),)+
                }
            }

            /// The event type and its payload, as the log stores them.
            pub fn encode(&self) -> Result<(&'static str, serde_json::Value), $crate::EncodeError> {
                let event_type = self.event_type();
                let error = |source| $crate::EncodeError { event_type, source };
                match serde_json::to_value(self).map_err(error)? {
                    serde_json::Value::Object(mut tagged) => {
                        Ok((event_type, tagged.remove("data").unwrap_or(serde_json::Value::Null)))
                    }
                    _ => Err(error(serde::ser::Error::custom("a tagged event is not an object"))),
                }
            }

            /// Reads a stored payload back. `None` for an event type this aggregate does not have.
            ///
            /// The payload is read where it is, as the variant's own type: the same result as the tagged enum's
            /// deserializer, which needs a copy of the payload joined to its tag and then buffers it once more
            /// (its tag sorts after `data`), and that cost a projector rebuild a tenth of its time.
            pub fn decode(event_type: &str, data: &serde_json::Value) -> Option<Result<$name, $crate::DecodeError>> {
                use serde::Deserialize as _;
                let decoded = match event_type {
                    $(stringify!($variant) => $variant::deserialize(data).map($name::$variant),)+
                    _ => return None,
                };
                Some(decoded.map_err(|cause| $crate::DecodeError { event_type: event_type.to_owned(), cause }))
            }
        }
    };
}
pub(crate) use events;
