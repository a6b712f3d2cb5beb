//! The `User` aggregate: `UserRegistered`, then any number of `UserProfileUpdated`, `UserDeactivated` and
//! `UserReactivated`, and at most one `UserErased`, after which every command is refused.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{Auth0Subject, ClaimKind, GitHubId, UserId};

/// What GitHub says about an account, as far as kiroku cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitHubProfile {
    pub id: GitHubId,
    pub login: String,
    /// GitHub's `name`, which may be null.
    pub name: Option<String>,
    pub avatar_url: Option<String>,
    /// The response's ETag, kept for conditional re-fetches.
    pub etag: Option<String>,
}

/// What kiroku records of a GitHub profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonalProfile {
    pub github_username: String,
    pub display_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
}

/// The longest login, display name and avatar URL kiroku records (the read model's columns hold them).
pub(crate) const MAX_LOGIN_CHARS: usize = 100;
pub(crate) const MAX_DISPLAY_NAME_CHARS: usize = 300;
pub(crate) const MAX_AVATAR_URL_CHARS: usize = 2000;

impl PersonalProfile {
    /// What kiroku records of a GitHub profile, within what the read model can hold: a login that is missing,
    /// too long or carries control characters (a NUL would fail every insert, for ever) is refused; a display name
    /// loses its control characters and is cut to size, falling back to the login when GitHub has none; an avatar
    /// URL that does not fit, or is not a plain https URL, is left out.
    fn from_github(profile: &GitHubProfile) -> Result<Self, UserError> {
        let login = profile.login.trim();
        if login.is_empty() {
            return Err(UserError::MissingLogin);
        }
        if login.chars().count() > MAX_LOGIN_CHARS || login.chars().any(char::is_control) {
            return Err(UserError::InvalidLogin);
        }
        let name: String = profile.name.as_deref().unwrap_or_default().chars().filter(|c| !c.is_control()).collect();
        let name = name.trim();
        let display_name = if name.is_empty() { login } else { name };
        let avatar_url = profile.avatar_url.clone().filter(|url| {
            url.starts_with("https://")
                && url.chars().count() <= MAX_AVATAR_URL_CHARS
                && !url.chars().any(|c| c.is_control() || c.is_whitespace())
        });
        Ok(PersonalProfile {
            github_username: login.to_owned(),
            display_name: display_name.chars().take(MAX_DISPLAY_NAME_CHARS).collect(),
            avatar_url,
        })
    }
}

/// Everything personal a registration records: identities and profile. Sealed under the person's data key in
/// the log (schema 2), and absent once they are erased.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredPersonal {
    pub auth0_id: Auth0Subject,
    pub github_id: GitHubId,
    pub github_username: String,
    pub display_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    /// The GitHub response's ETag, kept for conditional re-fetches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_etag: Option<String>,
}

/// A user registered with their GitHub profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub registered_at: DateTime<Utc>,
    /// `None` once the person's data is erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal: Option<RegisteredPersonal>,
}

/// The personal fields that changed, and only those.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// `Some(None)` would mean "removed"; GitHub always has an avatar, so a removal is not modelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_etag: Option<String>,
}

impl ProfileChanges {
    pub fn is_empty(&self) -> bool {
        self.github_username.is_none() && self.display_name.is_none() && self.avatar_url.is_none()
    }
}

/// A registered user's GitHub profile changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProfileUpdated {
    pub updated_at: DateTime<Utc>,
    /// `None` once the person's data is erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal: Option<ProfileChanges>,
}

/// Why an administrator deactivated a user: free text, so it may name the person, and is personal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeactivationReason {
    pub reason: String,
}

/// An administrator deactivated the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeactivated {
    pub deactivated_at: DateTime<Utc>,
    /// `None` once the person's data is erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal: Option<DeactivationReason>,
}

/// An administrator reactivated a deactivated user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserReactivated {
    pub reactivated_at: DateTime<Utc>,
}

/// The person's data was erased: their data key destroyed, their identities released. `redacted_positions`
/// lists the events written before encryption (schema 1) whose personal fields the erasure removed in place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserErased {
    pub erased_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redacted_positions: Vec<u64>,
}

crate::events! {
    /// Every event of the `User` aggregate.
    pub enum UserEvent("User") {
        UserRegistered,
        UserProfileUpdated,
        UserDeactivated,
        UserReactivated,
        UserErased,
    }
}

/// Where a user stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserStatus {
    Active,
    Deactivated,
    Erased,
}

impl UserStatus {
    /// The status [`UserStatus::as_str`] names.
    pub fn parse(stored: &str) -> Option<UserStatus> {
        [UserStatus::Active, UserStatus::Deactivated, UserStatus::Erased].into_iter().find(|s| s.as_str() == stored)
    }

    /// As the read model stores it.
    pub const fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Deactivated => "deactivated",
            UserStatus::Erased => "erased",
        }
    }
}

/// A registered user, as its events build it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub status: UserStatus,
    /// `None` once the person's data is erased (and, for a reader after the erasure, at every point of the past).
    pub personal: Option<RegisteredPersonal>,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The number of events applied.
    pub version: u32,
}

/// Why the domain refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("the GitHub profile has no login")]
    MissingLogin,
    #[error("the GitHub profile's login is too long or has control characters")]
    InvalidLogin,
    #[error("the GitHub profile is for account {profile}, but the token names {subject}")]
    ProfileMismatch { subject: GitHubId, profile: GitHubId },
    #[error("the user is not registered")]
    NotRegistered,
    #[error("the user is already registered")]
    AlreadyRegistered,
    #[error("the user is deactivated")]
    Deactivated,
    #[error("the user's personal data was erased")]
    Erased,
    #[error("the user is {}, so cannot be {action}", status.as_str())]
    InvalidState { status: UserStatus, action: &'static str },
    #[error("the user's personal data cannot be read")]
    PersonalDataUnavailable,
}

impl UserError {
    /// The transitions that [`UserError::InvalidState`] names, by name: a refusal read back from storage.
    pub fn transition_name(name: &str) -> Option<&'static str> {
        [DEACTIVATED, REACTIVATED].into_iter().find(|t| *t == name)
    }
}

/// The transitions a user's state can refuse, as [`UserError::InvalidState`] names them.
const DEACTIVATED: &str = "deactivated";
const REACTIVATED: &str = "reactivated";

/// Register a user with their verified Auth0 subject and their GitHub profile.
#[derive(Clone, Debug)]
pub struct RegisterUser {
    pub subject: Auth0Subject,
    pub profile: GitHubProfile,
    pub now: DateTime<Utc>,
}

/// Record what changed in a user's GitHub profile. `profile` is `None` when GitHub said "not modified".
#[derive(Clone, Debug)]
pub struct SyncProfile {
    pub profile: Option<GitHubProfile>,
    pub now: DateTime<Utc>,
}

/// Every command of the `User` aggregate.
#[derive(Clone, Debug)]
pub enum UserCommand {
    Register(RegisterUser),
    SyncProfile(SyncProfile),
    Deactivate {
        reason: String,
        now: DateTime<Utc>,
    },
    Reactivate {
        now: DateTime<Utc>,
    },
    /// `redacted_positions`: the schema-1 events whose personal fields the erasure removes (found by the caller).
    Erase {
        redacted_positions: Vec<u64>,
        now: DateTime<Utc>,
    },
}

impl User {
    /// Builds the state from the aggregate's events, oldest first. `None` when there is no `UserRegistered`.
    pub fn from_events<'a>(id: UserId, events: impl IntoIterator<Item = &'a UserEvent>) -> Option<User> {
        events.into_iter().fold(None, |state, event| User::evolve(state, id, event))
    }

    /// The state after one more event.
    pub fn evolve(state: Option<User>, id: UserId, event: &UserEvent) -> Option<User> {
        let Some(mut user) = state else {
            return match event {
                UserEvent::UserRegistered(e) => Some(User {
                    id,
                    status: UserStatus::Active,
                    personal: e.personal.clone(),
                    registered_at: e.registered_at,
                    updated_at: e.registered_at,
                    version: 1,
                }),
                // Nothing but a registration can start a user (expected versions forbid the rest).
                _ => None,
            };
        };
        user.version += 1;
        match event {
            UserEvent::UserRegistered(_) => {}
            UserEvent::UserProfileUpdated(e) => {
                user.updated_at = e.updated_at;
                match (&mut user.personal, &e.personal) {
                    (Some(personal), Some(changes)) => {
                        if let Some(login) = &changes.github_username {
                            personal.github_username.clone_from(login);
                        }
                        if let Some(name) = &changes.display_name {
                            personal.display_name.clone_from(name);
                        }
                        if let Some(avatar) = &changes.avatar_url {
                            personal.avatar_url = Some(avatar.clone());
                        }
                        if changes.github_etag.is_some() {
                            personal.github_etag.clone_from(&changes.github_etag);
                        }
                    }
                    // An update whose fields are gone: what it changed is gone too.
                    (_, None) => user.personal = None,
                    (None, Some(_)) => {}
                }
            }
            UserEvent::UserDeactivated(e) => {
                user.status = UserStatus::Deactivated;
                user.updated_at = e.deactivated_at;
            }
            UserEvent::UserReactivated(e) => {
                user.status = UserStatus::Active;
                user.updated_at = e.reactivated_at;
            }
            UserEvent::UserErased(e) => {
                user.status = UserStatus::Erased;
                user.personal = None;
                user.updated_at = e.erased_at;
            }
        }
        Some(user)
    }

    /// Decides which events a command produces, given the user's state (`None`: not registered).
    /// Uniqueness of identities is not decided here: the event store's claims do it (see [`ClaimKind`]).
    /// Whether the user's state admits the command at all, whatever it carries (a profile yet to be fetched, the
    /// redactions yet to be found): the precondition [`User::decide`] starts with, so that a command can be refused
    /// before it costs a call to GitHub or a search of the log.
    pub fn admits(state: Option<&User>, command: &UserCommand) -> Result<(), UserError> {
        let Some(user) = state else {
            return match command {
                UserCommand::Register(_) => Ok(()),
                _ => Err(UserError::NotRegistered),
            };
        };
        if user.status == UserStatus::Erased {
            return Err(UserError::Erased);
        }
        match (command, user.status) {
            (UserCommand::Register(_), _) => Err(UserError::AlreadyRegistered),
            (UserCommand::SyncProfile(_), UserStatus::Deactivated) => Err(UserError::Deactivated),
            (UserCommand::Deactivate { .. }, status) if status != UserStatus::Active => {
                Err(UserError::InvalidState { status, action: DEACTIVATED })
            }
            (UserCommand::Reactivate { .. }, status) if status != UserStatus::Deactivated => {
                Err(UserError::InvalidState { status, action: REACTIVATED })
            }
            _ => Ok(()),
        }
    }

    pub fn decide(state: Option<&User>, command: &UserCommand) -> Result<Vec<UserEvent>, UserError> {
        User::admits(state, command)?;
        if let UserCommand::Register(command) = command {
            return register(state, command).map(|event| vec![event]);
        }
        let user = state.ok_or(UserError::NotRegistered)?;
        match command {
            UserCommand::Register(_) => Err(UserError::AlreadyRegistered),
            UserCommand::SyncProfile(command) => sync_profile(user, command).map(Vec::from_iter),
            UserCommand::Deactivate { reason, now } => Ok(vec![UserEvent::UserDeactivated(UserDeactivated {
                deactivated_at: *now,
                personal: Some(DeactivationReason { reason: reason.clone() }),
            })]),
            UserCommand::Reactivate { now } => {
                Ok(vec![UserEvent::UserReactivated(UserReactivated { reactivated_at: *now })])
            }
            UserCommand::Erase { redacted_positions, now } => Ok(vec![UserEvent::UserErased(UserErased {
                erased_at: *now,
                redacted_positions: redacted_positions.clone(),
            })]),
        }
    }

    /// What the user holds exclusively once registered: one user per Auth0 subject and per GitHub account.
    /// (The store keeps a keyed hash of each value, never the value.)
    pub fn claims(subject: &Auth0Subject) -> [(ClaimKind, String); 2] {
        [(ClaimKind::Auth0Subject, subject.to_string()), (ClaimKind::GitHubId, subject.github_id().to_string())]
    }
}

fn register(state: Option<&User>, command: &RegisterUser) -> Result<UserEvent, UserError> {
    if state.is_some() {
        return Err(UserError::AlreadyRegistered);
    }
    let profile = &command.profile;
    if profile.id != command.subject.github_id() {
        return Err(UserError::ProfileMismatch { subject: command.subject.github_id(), profile: profile.id });
    }
    let recorded = PersonalProfile::from_github(profile)?;
    Ok(UserEvent::UserRegistered(UserRegistered {
        registered_at: command.now,
        personal: Some(RegisteredPersonal {
            auth0_id: command.subject.clone(),
            github_id: profile.id,
            github_username: recorded.github_username,
            display_name: recorded.display_name,
            avatar_url: recorded.avatar_url,
            github_etag: profile.etag.clone(),
        }),
    }))
}

/// Nothing, or one `UserProfileUpdated` with the changed fields (login, name, avatar).
fn sync_profile(user: &User, command: &SyncProfile) -> Result<Option<UserEvent>, UserError> {
    let current = user.personal.as_ref().ok_or(UserError::PersonalDataUnavailable)?;
    let Some(profile) = &command.profile else { return Ok(None) };
    if profile.id != current.github_id {
        return Err(UserError::ProfileMismatch { subject: current.github_id, profile: profile.id });
    }
    let fresh = PersonalProfile::from_github(profile)?;
    let changed = |old: &str, new: &str| (old != new).then(|| new.to_owned());
    let mut changes = ProfileChanges {
        github_username: changed(&current.github_username, &fresh.github_username),
        display_name: changed(&current.display_name, &fresh.display_name),
        avatar_url: match (&current.avatar_url, &fresh.avatar_url) {
            (old, Some(new)) if old.as_ref() != Some(new) => Some(new.clone()),
            _ => None,
        },
        github_etag: None,
    };
    if changes.is_empty() {
        return Ok(None);
    }
    changes.github_etag.clone_from(&profile.etag);
    Ok(Some(UserEvent::UserProfileUpdated(UserProfileUpdated { updated_at: command.now, personal: Some(changes) })))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 6, 0, 0).unwrap()
    }

    fn octocat() -> GitHubProfile {
        GitHubProfile {
            id: GitHubId::new(583231),
            login: "octocat".to_owned(),
            name: Some("The Octocat".to_owned()),
            avatar_url: Some("https://avatars.githubusercontent.com/u/583231".to_owned()),
            etag: Some("\"abc\"".to_owned()),
        }
    }

    fn subject() -> Auth0Subject {
        "github|583231".parse().unwrap()
    }

    fn registering(profile: GitHubProfile) -> UserCommand {
        UserCommand::Register(RegisterUser { subject: subject(), profile, now: now() })
    }

    fn syncing(profile: Option<GitHubProfile>) -> UserCommand {
        UserCommand::SyncProfile(SyncProfile { profile, now: now() })
    }

    /// given(events).when(command).then(events), after disintegrate's test harness.
    struct Given(Option<User>);

    struct When(Result<Vec<UserEvent>, UserError>);

    fn given(events: &[UserEvent]) -> Given {
        Given(User::from_events(UserId::from_uuid(uuid::Uuid::nil()), events))
    }

    impl Given {
        fn when(self, command: UserCommand) -> When {
            When(User::decide(self.0.as_ref(), &command))
        }
    }

    impl When {
        fn then(self, expected: &[UserEvent]) {
            assert_eq!(self.0.as_deref(), Ok(expected));
        }

        fn then_refused(self, expected: UserError) {
            assert_eq!(self.0, Err(expected));
        }

        fn event(self) -> UserEvent {
            let mut events = self.0.unwrap();
            assert_eq!(events.len(), 1, "{events:?}");
            events.remove(0)
        }
    }

    fn registered() -> UserEvent {
        given(&[]).when(registering(octocat())).event()
    }

    fn payload(event: &UserEvent) -> serde_json::Value {
        event.encode().unwrap().1
    }

    #[test]
    fn registers_a_new_user_with_the_personal_fields_apart() {
        let event = given(&[]).when(registering(octocat())).event();
        assert_eq!(event.event_type(), "UserRegistered");
        assert_eq!(
            payload(&event),
            json!({
                "registered_at": "2026-11-27T06:00:00Z",
                "personal": {
                    "auth0_id": "github|583231",
                    "github_id": "583231",
                    "github_username": "octocat",
                    "display_name": "The Octocat",
                    "avatar_url": "https://avatars.githubusercontent.com/u/583231",
                    "github_etag": "\"abc\"",
                },
            })
        );
    }

    #[test]
    fn the_display_name_falls_back_to_the_login_when_github_has_no_name() {
        let profile = GitHubProfile { name: None, ..octocat() };
        let UserEvent::UserRegistered(event) = given(&[]).when(registering(profile)).event() else { panic!() };
        assert_eq!(event.personal.unwrap().display_name, "octocat");
        let blank = GitHubProfile { name: Some("  ".to_owned()), ..octocat() };
        let UserEvent::UserRegistered(event) = given(&[]).when(registering(blank)).event() else { panic!() };
        assert_eq!(event.personal.unwrap().display_name, "octocat");
    }

    #[test]
    fn refuses_a_profile_of_another_account_than_the_token_names() {
        let other = GitHubProfile { id: GitHubId::new(1), ..octocat() };
        given(&[])
            .when(registering(other))
            .then_refused(UserError::ProfileMismatch { subject: GitHubId::new(583231), profile: GitHubId::new(1) });
    }

    #[test]
    fn refuses_a_profile_without_a_login() {
        let nameless = GitHubProfile { login: " ".to_owned(), ..octocat() };
        given(&[]).when(registering(nameless)).then_refused(UserError::MissingLogin);
    }

    #[test]
    fn a_profile_is_kept_within_what_the_read_model_holds() {
        let bad_login = GitHubProfile { login: "oct\0cat".to_owned(), ..octocat() };
        given(&[]).when(registering(bad_login)).then_refused(UserError::InvalidLogin);
        let long_login = GitHubProfile { login: "x".repeat(MAX_LOGIN_CHARS + 1), ..octocat() };
        given(&[]).when(registering(long_login)).then_refused(UserError::InvalidLogin);
        let messy = GitHubProfile {
            name: Some(format!("Octo\0{}", "名".repeat(MAX_DISPLAY_NAME_CHARS))),
            avatar_url: Some(format!("https://a/{}", "x".repeat(MAX_AVATAR_URL_CHARS))),
            ..octocat()
        };
        let UserEvent::UserRegistered(event) = given(&[]).when(registering(messy)).event() else { panic!() };
        let personal = event.personal.unwrap();
        assert_eq!(personal.display_name.chars().count(), MAX_DISPLAY_NAME_CHARS);
        assert!(personal.display_name.starts_with("Octo名"), "control characters are dropped");
        assert_eq!(personal.avatar_url, None, "an avatar URL that does not fit is left out");
    }

    #[test]
    fn refuses_to_register_a_user_twice() {
        given(&[registered()]).when(registering(octocat())).then_refused(UserError::AlreadyRegistered);
    }

    #[test]
    fn an_unchanged_profile_changes_nothing() {
        given(&[registered()]).when(syncing(Some(octocat()))).then(&[]);
        given(&[registered()]).when(syncing(None)).then(&[]);
    }

    #[test]
    fn a_changed_profile_records_only_the_changed_fields() {
        let renamed = GitHubProfile { login: "octodog".to_owned(), etag: Some("\"def\"".to_owned()), ..octocat() };
        let event = given(&[registered()]).when(syncing(Some(renamed))).event();
        assert_eq!(
            payload(&event),
            json!({ "updated_at": "2026-11-27T06:00:00Z", "personal": { "github_username": "octodog", "github_etag": "\"def\"" } })
        );
        let user = User::from_events(UserId::generate(), &[registered(), event]).unwrap();
        let personal = user.personal.unwrap();
        assert_eq!((personal.github_username.as_str(), user.version), ("octodog", 2));
        assert_eq!(personal.display_name, "The Octocat");
        assert_eq!(personal.github_etag.as_deref(), Some("\"def\""));
    }

    #[test]
    fn syncing_an_unregistered_user_is_refused() {
        given(&[]).when(syncing(Some(octocat()))).then_refused(UserError::NotRegistered);
    }

    #[test]
    fn events_decode_back_to_what_was_encoded() {
        let event = registered();
        let (event_type, data) = event.encode().unwrap();
        assert_eq!(UserEvent::decode(event_type, &data).unwrap().unwrap(), event);
        assert!(UserEvent::decode("SomethingElse", &json!({})).is_none());
        assert!(UserEvent::decode("UserRegistered", &json!({ "personal": { "auth0_id": "nope" } })).unwrap().is_err());
        assert_eq!(
            UserEvent::TYPES,
            ["UserRegistered", "UserProfileUpdated", "UserDeactivated", "UserReactivated", "UserErased"]
        );
        assert_eq!(UserEvent::AGGREGATE_TYPE, "User");
    }

    #[test]
    fn a_user_claims_its_auth0_subject_and_github_account() {
        assert_eq!(
            User::claims(&subject()),
            [(ClaimKind::Auth0Subject, "github|583231".to_owned()), (ClaimKind::GitHubId, "583231".to_owned())]
        );
    }

    fn deactivating() -> UserCommand {
        UserCommand::Deactivate { reason: "asked by support".to_owned(), now: now() }
    }

    fn erasing() -> UserCommand {
        UserCommand::Erase { redacted_positions: vec![], now: now() }
    }

    fn deactivated() -> UserEvent {
        given(&[registered()]).when(deactivating()).event()
    }

    fn erased() -> UserEvent {
        given(&[registered()]).when(erasing()).event()
    }

    #[test]
    fn an_active_user_can_be_deactivated_then_reactivated() {
        let event = deactivated();
        assert_eq!(
            payload(&event),
            json!({ "deactivated_at": "2026-11-27T06:00:00Z", "personal": { "reason": "asked by support" } })
        );
        let user = User::from_events(UserId::generate(), &[registered(), event.clone()]).unwrap();
        assert_eq!((user.status, user.version), (UserStatus::Deactivated, 2));
        let reactivated = given(&[registered(), event]).when(UserCommand::Reactivate { now: now() }).event();
        let user = User::from_events(UserId::generate(), &[registered(), deactivated(), reactivated]).unwrap();
        assert_eq!((user.status, user.version), (UserStatus::Active, 3));
    }

    #[test]
    fn transitions_that_do_not_fit_the_status_are_refused() {
        given(&[registered(), deactivated()])
            .when(deactivating())
            .then_refused(UserError::InvalidState { status: UserStatus::Deactivated, action: "deactivated" });
        given(&[registered()])
            .when(UserCommand::Reactivate { now: now() })
            .then_refused(UserError::InvalidState { status: UserStatus::Active, action: "reactivated" });
        given(&[registered(), deactivated()]).when(syncing(Some(octocat()))).then_refused(UserError::Deactivated);
        given(&[]).when(deactivating()).then_refused(UserError::NotRegistered);
        given(&[]).when(erasing()).then_refused(UserError::NotRegistered);
    }

    #[test]
    fn every_command_on_an_erased_user_is_refused() {
        for command in [deactivating(), UserCommand::Reactivate { now: now() }, erasing(), syncing(Some(octocat()))] {
            given(&[registered(), erased()]).when(command).then_refused(UserError::Erased);
        }
        given(&[registered(), deactivated()]).when(erasing()).event();
    }

    #[test]
    fn an_erasure_leaves_a_user_without_personal_data() {
        let user = User::from_events(UserId::generate(), &[registered(), deactivated(), erased()]).unwrap();
        assert_eq!((user.status, user.personal, user.version), (UserStatus::Erased, None, 3));
        // Read after the erasure, the earlier events have no personal part either: the state shows that.
        let unreadable = UserEvent::UserRegistered(UserRegistered { registered_at: now(), personal: None });
        let user = User::from_events(UserId::generate(), &[unreadable]).unwrap();
        assert_eq!((user.status, user.personal), (UserStatus::Active, None));
        given(&[UserEvent::UserRegistered(UserRegistered { registered_at: now(), personal: None })])
            .when(syncing(Some(octocat())))
            .then_refused(UserError::PersonalDataUnavailable);
    }
}
