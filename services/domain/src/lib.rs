//! kiroku's domain, pure and synchronous: which events a command produces (`decide`) and what state events
//! build (`evolve`). No I/O here: token checks and GitHub calls happen before, appends after.
//!
//! Event payloads are versioned JSON (`schema_version` in the metadata); [`UserEvent::decode`] and
//! [`AuditEvent::decode`] are the one place that reads them back.

mod audit;
mod ids;
mod user;

pub use audit::{AuditEvent, RegistrationRefusal, UserRegistrationFailed, refuse_registration};
pub use ids::{AuditId, Auth0Subject, GitHubId, IdError, UserId};
pub use user::{
    GitHubProfile, PersonalProfile, ProfileChanges, RegisterUser, SyncProfile, User, UserError, UserEvent,
    UserProfileUpdated, UserRegistered,
};

/// The version of every payload schema written today.
pub const SCHEMA_VERSION: u32 = 1;

/// An event payload that does not match its type's schema.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode a {event_type} event: {source}")]
pub struct DecodeError {
    pub event_type: String,
    #[source]
    pub source: serde_json::Error,
}
