//! Identifiers as newtypes, parsed at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be a UUID")]
    NotAUuid,
    #[error("must be github|<numeric id>")]
    NotAGitHubSubject,
}

/// A user (the `User` aggregate's id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(Uuid);

impl UserId {
    /// A new, time-ordered id (UUIDv7), so that new users land at the end of indexes.
    pub fn generate() -> Self {
        UserId(Uuid::now_v7())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        UserId(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl FromStr for UserId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(UserId).map_err(|_| IdError::NotAUuid)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One refused registration (a `UserRegistrationAudit` aggregate: a fresh one per refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AuditId(Uuid);

impl AuditId {
    pub fn generate() -> Self {
        AuditId(Uuid::now_v7())
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for AuditId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A GitHub account's numeric id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GitHubId(u64);

impl GitHubId {
    pub fn new(id: u64) -> Self {
        GitHubId(id)
    }

    pub fn get(&self) -> u64 {
        self.0
    }
}

impl fmt::Display for GitHubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// On the wire and in payloads GitHub ids are strings (grpcurl prints 64-bit numbers as strings anyway).
impl Serialize for GitHubId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GitHubId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(GitHubId).map_err(serde::de::Error::custom)
    }
}

/// The Auth0 subject of a user who signed in with GitHub: `github|<numeric id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Auth0Subject {
    github_id: GitHubId,
}

impl Auth0Subject {
    pub fn github_id(&self) -> GitHubId {
        self.github_id
    }
}

impl FromStr for Auth0Subject {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("github|").ok_or(IdError::NotAGitHubSubject)?;
        // Digits only: u64's parser would also take a leading '+'.
        if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdError::NotAGitHubSubject);
        }
        let id = digits.parse().map_err(|_| IdError::NotAGitHubSubject)?;
        Ok(Auth0Subject { github_id: GitHubId(id) })
    }
}

impl TryFrom<String> for Auth0Subject {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Auth0Subject> for String {
    fn from(subject: Auth0Subject) -> String {
        subject.to_string()
    }
}

impl fmt::Display for Auth0Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "github|{}", self.github_id)
    }
}

/// The kinds of identity a user holds exclusively. The event store's claims (kind, value) enforce it: the first
/// append that claims a value owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClaimKind {
    /// An Auth0 subject, `github|<id>`.
    Auth0Subject,
    /// A GitHub account id.
    GitHubId,
}

impl ClaimKind {
    /// The kind as the claims table stores it.
    pub const fn as_str(self) -> &'static str {
        match self {
            ClaimKind::Auth0Subject => "auth0_subject",
            ClaimKind::GitHubId => "github_id",
        }
    }

    /// The kind stored as `name`, if it is one.
    pub fn from_name(name: &str) -> Option<ClaimKind> {
        [ClaimKind::Auth0Subject, ClaimKind::GitHubId].into_iter().find(|kind| kind.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_github_subjects_with_numeric_ids_are_accepted() {
        assert_eq!("github|583231".parse::<Auth0Subject>().unwrap().github_id(), GitHubId::new(583231));
        for bad in ["google-oauth2|1", "github|", "github|abc", "github|+1", "github|1 ", "auth0|github|1", ""] {
            assert_eq!(bad.parse::<Auth0Subject>(), Err(IdError::NotAGitHubSubject), "{bad:?}");
        }
    }

    #[test]
    fn user_ids_must_be_uuids() {
        assert!("0191d1b4-7e2c-7cc0-9a4b-3c1d2e3f4a5b".parse::<UserId>().is_ok());
        assert_eq!("nope".parse::<UserId>(), Err(IdError::NotAUuid));
    }
}
