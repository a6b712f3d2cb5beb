//! A user's whole life end to end: DeactivateUser, ReactivateUser and EraseUser over real PostgreSQL and Redis,
//! their refusals and retries, re-registration after an erasure, the read model's status, GetUserHistory and
//! WatchEvents after an erasure, GetUserAsOf at several points of a history, and a rebuild after erasures.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::{CommandApp, Commands, Queries, field, get_user, history, reason};
use kiroku::permissions::{ADMIN, READ, REGISTER, WATCH};
use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku::v1::{
    DeactivateUserRequest, DeactivateUserResponse, EraseUserRequest, EraseUserResponse, Event, GetUserAsOfRequest,
    ListUsersRequest, LookupUserRequest, ReactivateUserRequest, ReactivateUserResponse, SyncGitHubProfileRequest,
    SyncGitHubProfileResponse, User, UserStatus, WatchEventsRequest, get_user_as_of_request, lookup_user_request,
    watch_events_request, watch_events_response,
};
use kiroku_testkit::{binary_path, eventually};
use prost_types::value::Kind;
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

// ---------------------------------------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------------------------------------

async fn deactivate(
    client: &Commands,
    user_id: &str,
    why: &str,
    request_id: &str,
    expected_version: u64,
) -> Result<DeactivateUserResponse, Status> {
    client
        .clone()
        .deactivate_user(DeactivateUserRequest {
            user_id: user_id.to_owned(),
            reason: why.to_owned(),
            request_id: request_id.to_owned(),
            expected_version,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn reactivate(
    client: &Commands,
    user_id: &str,
    request_id: &str,
    expected_version: u64,
) -> Result<ReactivateUserResponse, Status> {
    client
        .clone()
        .reactivate_user(ReactivateUserRequest {
            user_id: user_id.to_owned(),
            request_id: request_id.to_owned(),
            expected_version,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn erase(client: &Commands, user_id: &str, request_id: &str) -> Result<EraseUserResponse, Status> {
    client
        .clone()
        .erase_user(EraseUserRequest { user_id: user_id.to_owned(), request_id: request_id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
}

/// SyncGitHubProfile with the user's own Auth0 token.
async fn sync(app: &CommandApp, github_id: u64) -> Result<SyncGitHubProfileResponse, Status> {
    app.client
        .clone()
        .sync_git_hub_profile(SyncGitHubProfileRequest {
            auth0_token: app.token(github_id),
            request_id: String::new(),
            expected_version: 0,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn as_of(client: &Queries, user_id: &str, point: Option<get_user_as_of_request::AsOf>) -> Result<User, Status> {
    client
        .clone()
        .get_user_as_of(GetUserAsOfRequest { user_id: user_id.to_owned(), as_of: point })
        .await
        .map(|response| response.into_inner().user.unwrap())
}

fn at_position(position: u64) -> Option<get_user_as_of_request::AsOf> {
    Some(get_user_as_of_request::AsOf::AsOfPosition(position))
}

fn at_time(time: SystemTime) -> Option<get_user_as_of_request::AsOf> {
    Some(get_user_as_of_request::AsOf::AsOfTime(prost_types::Timestamp::from(time)))
}

/// The user ids of ListUsers with `filter`, in the order it gives them.
async fn list_ids(client: &Queries, filter: &str) -> Vec<String> {
    let page = client
        .clone()
        .list_users(ListUsersRequest { page_size: 1000, page_token: String::new(), filter: filter.to_owned() })
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_page_token.is_empty(), "{filter}: one page");
    page.users.into_iter().map(|u| u.user_id).collect()
}

/// Makes GitHub answer this profile for the account, ahead of every answer mounted with a larger `priority`
/// (wiremock tries lower numbers first; `github_knows` mounts at the default, 5).
async fn github_answers(app: &CommandApp, github_id: u64, login: &str, name: &str, avatar_url: &str, priority: u8) {
    Mock::given(method("GET"))
        .and(path(format!("/user/{github_id}")))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("ETag", format!("\"{login}-etag\""))
                .set_body_json(json!({ "id": github_id, "login": login, "name": name, "avatar_url": avatar_url })),
        )
        .with_priority(priority)
        .named(format!("github user {github_id} as {login}"))
        .mount(&app.github)
        .await;
}

/// Waits until every event up to `position` is final (another test's open transaction may hold the horizon back),
/// so that reads of the log up to it are complete.
async fn wait_final(app: &CommandApp, position: u64) {
    let store = kiroku_event_store::EventStore::new(app.db.pool.clone());
    eventually(Duration::from_secs(30), "the events to be final", || async {
        Ok((store.safe_horizon().await?.get() >= position).then_some(()))
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------------------------

#[track_caller]
fn assert_refused(status: &Status, code: Code, expected_reason: &str) {
    assert_eq!((status.code(), reason(status).as_str()), (code, expected_reason), "{status:?}");
}

/// The user shows the erased marker and none of the person's fields.
#[track_caller]
fn assert_no_personal_data(user: &User) {
    assert!(user.erased, "the erased marker: {user:?}");
    assert_eq!(
        (
            user.auth0_id.as_str(),
            user.github_id.as_str(),
            user.github_username.as_str(),
            user.display_name.as_str(),
            user.avatar_url.as_str()
        ),
        ("", "", "", "", ""),
        "no personal field: {user:?}"
    );
}

fn string_field<'a>(s: &'a prost_types::Struct, name: &str) -> Option<&'a str> {
    match field(s, name) {
        Some(Kind::StringValue(text)) => Some(text.as_str()),
        _ => None,
    }
}

fn struct_field<'a>(s: &'a prost_types::Struct, name: &str) -> Option<&'a prost_types::Struct> {
    match field(s, name) {
        Some(Kind::StructValue(inner)) => Some(inner),
        _ => None,
    }
}

/// `erased: true` in an event's data.
fn marked_erased(data: &prost_types::Struct) -> bool {
    matches!(field(data, "erased"), Some(Kind::BoolValue(true)))
}

fn data(event: &Event) -> &prost_types::Struct {
    event.data.as_ref().unwrap()
}

fn event_types(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

/// The event types that carry personal fields (sealed under the person's key) until the person is erased.
const PERSONAL_EVENT_TYPES: [&str; 3] = ["UserRegistered", "UserProfileUpdated", "UserDeactivated"];

// ---------------------------------------------------------------------------------------------------------------
// Transitions
// ---------------------------------------------------------------------------------------------------------------

/// Deactivate, reactivate and erase, each read back through GetUser at its own position: the read model's status
/// follows the user's life (a deactivated user keeps their profile), each command adds one version, and after the
/// erasure the row keeps only the id, status and bookkeeping; no former key finds it any more.
#[tokio::test]
async fn a_user_is_deactivated_reactivated_and_erased_and_the_read_model_follows() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, mut client) = app.start_query(&[]).await;
    app.github_knows(731904101, "zq-lifecycle-login-7319", Some("Zelda Lifecycle 7319")).await;
    let registered = app.register(731904101, "").await.unwrap();
    let id = registered.user_id.clone();

    let deactivated = deactivate(&app.client, &id, "zq lifecycle check 7319", "", 0).await.unwrap();
    assert_eq!(deactivated.version, 2);
    assert!(deactivated.position > registered.position);
    let user = get_user(&client, &id, deactivated.position).await;
    assert_eq!((user.status, user.version), (UserStatus::Deactivated as i32, 2));
    assert_eq!(
        (user.github_username.as_str(), user.display_name.as_str()),
        ("zq-lifecycle-login-7319", "Zelda Lifecycle 7319"),
        "a deactivated user keeps their profile"
    );
    assert!(!user.erased);

    let reactivated = reactivate(&app.client, &id, "", 0).await.unwrap();
    assert_eq!(reactivated.version, 3);
    assert!(reactivated.position > deactivated.position);
    let user = get_user(&client, &id, reactivated.position).await;
    assert_eq!((user.status, user.version), (UserStatus::Active as i32, 3));
    assert_eq!(user.github_username, "zq-lifecycle-login-7319");

    let erased = erase(&app.client, &id, "").await.unwrap();
    assert!(erased.position > reactivated.position);
    let user = get_user(&client, &id, erased.position).await;
    assert_eq!((user.user_id.as_str(), user.status, user.version), (id.as_str(), UserStatus::Erased as i32, 4));
    assert_no_personal_data(&user);
    assert!(user.created_at.is_some() && user.updated_at.is_some(), "bookkeeping stays: {user:?}");

    for key in [
        lookup_user_request::Key::Auth0Id("github|731904101".into()),
        lookup_user_request::Key::GithubId("731904101".into()),
        lookup_user_request::Key::GithubUsername("zq-lifecycle-login-7319".into()),
    ] {
        let status = client.lookup_user(LookupUserRequest { key: Some(key.clone()) }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{key:?} no longer finds the erased user");
    }

    let types: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = $1::uuid ORDER BY event_version")
            .bind(&id)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(types, ["UserRegistered", "UserDeactivated", "UserReactivated", "UserErased"]);
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

/// Transitions the domain forbids are FAILED_PRECONDITION with their reason and write nothing: reactivating an
/// active user, deactivating a deactivated one (INVALID_USER_STATE), syncing a deactivated user's profile
/// (USER_DEACTIVATED; the same sync succeeds once reactivated), and any lifecycle command on an erased user
/// (USER_ERASED).
#[tokio::test]
async fn forbidden_transitions_are_failed_precondition_and_write_nothing() {
    let app = CommandApp::spawn().await;
    app.github_knows(731904202, "zq-refusals-login-7319", Some("Zelda Refusals 7319")).await;
    let id = app.register(731904202, "").await.unwrap().user_id;

    let refused = reactivate(&app.client, &id, "", 0).await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "INVALID_USER_STATE");
    assert_eq!(app.total_events().await, 1, "a refusal writes nothing");

    deactivate(&app.client, &id, "zq first deactivation 7319", "", 0).await.unwrap();
    let refused = deactivate(&app.client, &id, "zq second deactivation 7319", "", 0).await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "INVALID_USER_STATE");
    let refused = sync(&app, 731904202).await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "USER_DEACTIVATED");
    assert_eq!(app.total_events().await, 2, "refusals write nothing");

    // Reactivated, the same sync is accepted: the refusal was the deactivation's.
    reactivate(&app.client, &id, "", 0).await.unwrap();
    let synced = sync(&app, 731904202).await.unwrap();
    assert_eq!(synced.user_id, id);

    erase(&app.client, &id, "").await.unwrap();
    let events = app.total_events().await;
    let refusals = [
        deactivate(&app.client, &id, "zq after erasure 7319", "", 0).await.unwrap_err(),
        reactivate(&app.client, &id, "", 0).await.unwrap_err(),
        erase(&app.client, &id, "").await.unwrap_err(),
    ];
    for refused in &refusals {
        assert_refused(refused, Code::FailedPrecondition, "USER_ERASED");
    }
    assert_eq!(app.total_events().await, events, "refusals on an erased user write nothing");
    assert_eq!(app.count_events("UserErased").await, 1);
    app.stop().await;
}

/// The lifecycle commands validate their user id (malformed: INVALID_ARGUMENT; unknown: NOT_FOUND
/// USER_NOT_FOUND) and the deactivation reason's length, honour expected_version (ABORTED VERSION_CONFLICT, then
/// accepted with the right one), and need `kiroku:admin`: a caller with every other permission is refused
/// PERMISSION_MISSING. Nothing refused is written.
#[tokio::test]
async fn lifecycle_commands_validate_ids_check_versions_and_need_the_admin_permission() {
    let app = CommandApp::spawn().await;
    app.github_knows(731904303, "zq-validation-login-7319", None).await;
    let id = app.register(731904303, "").await.unwrap().user_id;

    for malformed in ["", "not-a-uuid-7319"] {
        let refusals = [
            deactivate(&app.client, malformed, "zq", "", 0).await.unwrap_err(),
            reactivate(&app.client, malformed, "", 0).await.unwrap_err(),
            erase(&app.client, malformed, "").await.unwrap_err(),
        ];
        for refused in &refusals {
            assert_eq!(refused.code(), Code::InvalidArgument, "{malformed:?}: {refused:?}");
        }
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    let refusals = [
        deactivate(&app.client, &unknown, "zq", "", 0).await.unwrap_err(),
        reactivate(&app.client, &unknown, "", 0).await.unwrap_err(),
        erase(&app.client, &unknown, "").await.unwrap_err(),
    ];
    for refused in &refusals {
        assert_refused(refused, Code::NotFound, "USER_NOT_FOUND");
    }
    let too_long = "z".repeat(501);
    let refused = deactivate(&app.client, &id, &too_long, "", 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "a reason above 500 characters: {refused:?}");
    assert_eq!(app.total_events().await, 1, "nothing refused is written");

    // Versions: the user is at 1.
    let stale = deactivate(&app.client, &id, "zq", "", 5).await.unwrap_err();
    assert_refused(&stale, Code::Aborted, "VERSION_CONFLICT");
    let deactivated = deactivate(&app.client, &id, "zq", "", 1).await.unwrap();
    assert_eq!(deactivated.version, 2);
    let stale = reactivate(&app.client, &id, "", 1).await.unwrap_err();
    assert_refused(&stale, Code::Aborted, "VERSION_CONFLICT");
    let reactivated = reactivate(&app.client, &id, "", 2).await.unwrap();
    assert_eq!(reactivated.version, 3);
    assert_eq!(app.total_events().await, 3);

    // Permission: everything but kiroku:admin.
    let channel =
        kiroku_testkit::connect_caller(app.address, &app.caller_token(&[REGISTER, READ, WATCH])).await.unwrap();
    let registrar: Commands = CommandServiceClient::new(channel);
    let refusals = [
        deactivate(&registrar, &id, "zq", "", 0).await.unwrap_err(),
        reactivate(&registrar, &id, "", 0).await.unwrap_err(),
        erase(&registrar, &id, "").await.unwrap_err(),
    ];
    for refused in &refusals {
        assert_refused(refused, Code::PermissionDenied, "PERMISSION_MISSING");
        let info = refused.get_details_error_info().unwrap();
        assert_eq!(info.metadata.get("permission").map(String::as_str), Some(ADMIN), "{refused:?}");
    }
    assert_eq!(app.total_events().await, 3, "refused callers write nothing");
    app.stop().await;
}

/// A lifecycle command retried with its request_id replays the first answer (same version and position) and
/// writes nothing more, even where the command itself would now be refused (the user is already deactivated, or
/// erased); a new request_id on the erased user is refused, which shows the answer came from the record.
#[tokio::test]
async fn a_retried_lifecycle_command_replays_its_first_answer_and_writes_nothing_more() {
    let app = CommandApp::spawn().await;
    app.github_knows(731904404, "zq-retry-login-7319", None).await;
    let id = app.register(731904404, "").await.unwrap().user_id;

    let first = deactivate(&app.client, &id, "zq retry 7319", "zq-deactivate-7319", 0).await.unwrap();
    let events = app.total_events().await;
    assert_eq!(events, 2);
    let again = deactivate(&app.client, &id, "zq retry 7319", "zq-deactivate-7319", 0).await.unwrap();
    assert_eq!((again.version, again.position), (first.version, first.position));
    assert_eq!(app.total_events().await, events, "the retry wrote nothing");

    let first = reactivate(&app.client, &id, "zq-reactivate-7319", 0).await.unwrap();
    let again = reactivate(&app.client, &id, "zq-reactivate-7319", 0).await.unwrap();
    assert_eq!((again.version, again.position), (first.version, first.position));
    assert_eq!(app.total_events().await, 3);

    let first = erase(&app.client, &id, "zq-erase-7319").await.unwrap();
    let again = erase(&app.client, &id, "zq-erase-7319").await.unwrap();
    assert_eq!(again.position, first.position);
    assert_eq!(app.total_events().await, 4);
    assert_eq!(app.count_events("UserErased").await, 1);

    let refused = erase(&app.client, &id, "zq-erase-again-7319").await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "USER_ERASED");
    app.stop().await;
}

/// Erasure releases the person's identities: the same GitHub account with the same token, refused as a
/// duplicate before the erasure, registers afterwards as a new user (new id, active, with the profile), while the
/// erased user stays erased; the identity then belongs to the new user.
#[tokio::test]
async fn an_erased_person_may_register_again_and_gets_a_new_user() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, mut client) = app.start_query(&[]).await;
    app.github_knows(731904505, "zq-returning-login-7319", Some("Zelda Returning 7319")).await;
    let first = app.register(731904505, "").await.unwrap();
    let duplicate = app.register(731904505, "").await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists, "before the erasure the identity is taken: {duplicate:?}");

    let erased = erase(&app.client, &first.user_id, "").await.unwrap();
    let second = app.register(731904505, "").await.unwrap();
    assert_ne!(second.user_id, first.user_id, "a new user");
    assert!(second.position > erased.position);

    let user = get_user(&client, &second.user_id, second.position).await;
    assert_eq!((user.status, user.version, user.erased), (UserStatus::Active as i32, 1, false));
    assert_eq!(
        (user.auth0_id.as_str(), user.github_id.as_str(), user.github_username.as_str()),
        ("github|731904505", "731904505", "zq-returning-login-7319")
    );
    let old = get_user(&client, &first.user_id, 0).await;
    assert_eq!(old.status, UserStatus::Erased as i32);
    assert_no_personal_data(&old);
    let found = client
        .lookup_user(LookupUserRequest { key: Some(lookup_user_request::Key::GithubId("731904505".into())) })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found.user_id, second.user_id);

    let again = app.register(731904505, "").await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "the identity is the new user's now: {again:?}");
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

/// ListUsers filters on each status: of three users, one active, one deactivated, one erased, each filter
/// returns exactly its own; no filter returns all three in registration order; status combines with the login.
#[tokio::test]
async fn list_users_filters_on_each_status() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, client) = app.start_query(&[]).await;
    let mut ids = Vec::new();
    for (github_id, login) in
        [(731904611, "zq-list-kept-7319"), (731904622, "zq-list-paused-7319"), (731904633, "zq-list-gone-7319")]
    {
        app.github_knows(github_id, login, None).await;
        ids.push(app.register(github_id, "").await.unwrap().user_id);
    }
    deactivate(&app.client, &ids[1], "zq list 7319", "", 0).await.unwrap();
    let erased = erase(&app.client, &ids[2], "").await.unwrap();
    // The projector applies in log order: the erasure, last, covers the rest.
    assert_eq!(get_user(&client, &ids[2], erased.position).await.status, UserStatus::Erased as i32);

    assert_eq!(list_ids(&client, r#"status = "active""#).await, [ids[0].clone()]);
    assert_eq!(list_ids(&client, r#"status = "deactivated""#).await, [ids[1].clone()]);
    assert_eq!(list_ids(&client, r#"status = "erased""#).await, [ids[2].clone()]);
    assert_eq!(list_ids(&client, "").await, ids);
    assert_eq!(list_ids(&client, r#"status = "deactivated" AND github_username = "zq-list*""#).await, [ids[1].clone()]);
    assert!(list_ids(&client, r#"status = "active" AND github_username = "zq-list-paused*""#).await.is_empty());
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading the log after an erasure
// ---------------------------------------------------------------------------------------------------------------

/// GetUserHistory shows the personal fields while the person's key exists (UserRegistered's `personal` holds the
/// identities and profile, next to `registered_at`); after EraseUser every event is still there, in order, without
/// error, and the events that carried personal fields have none left, only the `erased: true` marker.
#[tokio::test]
async fn the_history_of_an_erased_user_keeps_every_event_with_the_personal_fields_absent() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(731904707, "zq-history-login-7319", Some("Zelda History 7319")).await;
    let registered = app.register(731904707, "").await.unwrap();
    github_answers(
        &app,
        731904707,
        "zq-history-renamed-7319",
        "Zelda Renamed 7319",
        "https://avatars.example.test/zq-history-7319.png",
        1,
    )
    .await;
    let synced = sync(&app, 731904707).await.unwrap();
    assert!(synced.changed);
    deactivate(&app.client, &registered.user_id, "zq history reason 7319", "", 0).await.unwrap();
    reactivate(&app.client, &registered.user_id, "", 0).await.unwrap();

    let before = history(&client, &registered.user_id).await;
    assert_eq!(event_types(&before), ["UserRegistered", "UserProfileUpdated", "UserDeactivated", "UserReactivated"]);
    let registered_data = data(&before[0]);
    assert!(field(registered_data, "registered_at").is_some(), "{registered_data:?}");
    let personal = struct_field(registered_data, "personal").expect("readable before the erasure");
    assert_eq!(string_field(personal, "auth0_id"), Some("github|731904707"));
    assert_eq!(string_field(personal, "github_id"), Some("731904707"));
    assert_eq!(string_field(personal, "github_username"), Some("zq-history-login-7319"));
    assert_eq!(string_field(personal, "display_name"), Some("Zelda History 7319"));
    assert_eq!(string_field(personal, "avatar_url"), Some("https://avatars.githubusercontent.com/u/731904707"));
    assert_eq!(string_field(personal, "github_etag"), Some("\"zq-history-login-7319-etag\""));
    assert!(!marked_erased(registered_data));
    let changes = struct_field(data(&before[1]), "personal").expect("the profile change, readable");
    assert_eq!(string_field(changes, "github_username"), Some("zq-history-renamed-7319"));
    let why = struct_field(data(&before[2]), "personal").expect("the deactivation reason, readable");
    assert_eq!(string_field(why, "reason"), Some("zq history reason 7319"));

    let erased = erase(&app.client, &registered.user_id, "").await.unwrap();
    let after = history(&client, &registered.user_id).await;
    assert_eq!(
        event_types(&after),
        ["UserRegistered", "UserProfileUpdated", "UserDeactivated", "UserReactivated", "UserErased"]
    );
    assert_eq!(after.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(
        after[..4].iter().map(|e| e.position).collect::<Vec<_>>(),
        before.iter().map(|e| e.position).collect::<Vec<_>>(),
        "the same events, where they were"
    );
    assert_eq!(after[4].position, erased.position);
    for event in &after {
        assert!(field(data(event), "personal").is_none(), "{} keeps no personal field: {event:?}", event.event_type);
    }
    for event in after.iter().filter(|e| PERSONAL_EVENT_TYPES.contains(&e.event_type.as_str())) {
        assert!(marked_erased(data(event)), "{} carries the erased marker: {event:?}", event.event_type);
    }
    assert!(field(data(&after[0]), "registered_at").is_some(), "what is not personal stays");
    query.stop().await;
    app.stop().await;
}

/// WatchEvents replayed from the beginning after an erasure delivers the erased user's events, marked
/// `erased: true` and without `personal`, while another user's events still carry their personal fields.
#[tokio::test]
async fn watch_events_replays_an_erased_users_events_without_personal_data_and_others_with_theirs() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(731904808, "zq-watch-erased-7319", Some("Zelda Watched 7319")).await;
    app.github_knows(486215808, "kw-watch-kept-4862", Some("Bertram Watched 4862")).await;
    let victim = app.register(731904808, "").await.unwrap();
    let bystander = app.register(486215808, "").await.unwrap();
    erase(&app.client, &victim.user_id, "").await.unwrap();
    let total = usize::try_from(app.total_events().await).unwrap();
    assert_eq!(total, 3);

    let mut stream = client
        .clone()
        .watch_events(WatchEventsRequest {
            start: Some(watch_events_request::Start::FromBeginning(true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < total {
        let message = tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(watch_events_response::Kind::Event(event)) = message.kind {
            events.push(event);
        }
    }

    let victims: Vec<&Event> = events.iter().filter(|e| e.aggregate_id == victim.user_id).collect();
    assert_eq!(victims.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(), ["UserRegistered", "UserErased"]);
    for event in &victims {
        assert!(field(data(event), "personal").is_none(), "{event:?}");
    }
    assert!(marked_erased(data(victims[0])), "{:?}", victims[0]);

    let kept: Vec<&Event> = events.iter().filter(|e| e.aggregate_id == bystander.user_id).collect();
    assert_eq!(kept.len(), 1);
    let personal = struct_field(data(kept[0]), "personal").expect("the bystander's fields, readable");
    assert_eq!(string_field(personal, "github_username"), Some("kw-watch-kept-4862"));
    assert_eq!(string_field(personal, "auth0_id"), Some("github|486215808"));
    assert!(!marked_erased(data(kept[0])));
    query.stop().await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Time travel
// ---------------------------------------------------------------------------------------------------------------

/// GetUserAsOf rebuilds the user from the store at each point of their history, by position and by time: the
/// registration (version 1, first login), the profile change (version 2, new login), the deactivation (version 3).
/// Before the registration is NOT_FOUND, past the head OUT_OF_RANGE, no point INVALID_ARGUMENT, an unknown user
/// NOT_FOUND. After the erasure every point shows the erased marker and no personal field, with the version of
/// that point.
#[tokio::test]
async fn get_user_as_of_rebuilds_the_user_at_each_point_of_the_log() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    let before_registration = SystemTime::now() - Duration::from_secs(3600);
    app.github_knows(731904909, "zq-asof-login-7319", Some("Zelda AsOf 7319")).await;
    let registered = app.register(731904909, "").await.unwrap();
    let id = registered.user_id.clone();
    github_answers(
        &app,
        731904909,
        "zq-asof-renamed-7319",
        "Zelda AsOf Renamed 7319",
        "https://avatars.example.test/zq-asof-7319.png",
        1,
    )
    .await;
    let synced = sync(&app, 731904909).await.unwrap();
    assert_eq!((synced.changed, synced.version), (true, 2));
    let deactivated = deactivate(&app.client, &id, "zq asof 7319", "", 0).await.unwrap();
    wait_final(&app, deactivated.position).await;
    let (p1, p2, p3) = (registered.position, synced.position, deactivated.position);

    let at_registration = as_of(&client, &id, at_position(p1)).await.unwrap();
    assert_eq!((at_registration.user_id.as_str(), at_registration.version), (id.as_str(), 1));
    assert_eq!(at_registration.status, UserStatus::Active as i32);
    assert_eq!(
        (
            at_registration.auth0_id.as_str(),
            at_registration.github_id.as_str(),
            at_registration.github_username.as_str(),
            at_registration.display_name.as_str()
        ),
        ("github|731904909", "731904909", "zq-asof-login-7319", "Zelda AsOf 7319")
    );
    assert!(!at_registration.erased);

    let at_change = as_of(&client, &id, at_position(p2)).await.unwrap();
    assert_eq!((at_change.version, at_change.status), (2, UserStatus::Active as i32));
    assert_eq!(
        (at_change.github_username.as_str(), at_change.display_name.as_str(), at_change.avatar_url.as_str()),
        ("zq-asof-renamed-7319", "Zelda AsOf Renamed 7319", "https://avatars.example.test/zq-asof-7319.png")
    );

    let at_deactivation = as_of(&client, &id, at_position(p3)).await.unwrap();
    assert_eq!((at_deactivation.version, at_deactivation.status), (3, UserStatus::Deactivated as i32));
    assert_eq!(at_deactivation.github_username, "zq-asof-renamed-7319");

    let now = as_of(&client, &id, at_time(SystemTime::now())).await.unwrap();
    assert_eq!((now.version, now.status), (3, UserStatus::Deactivated as i32), "as of now: the current state");

    let before = as_of(&client, &id, at_position(p1 - 1)).await.unwrap_err();
    assert_eq!(before.code(), Code::NotFound, "before the registration: {before:?}");
    let before = as_of(&client, &id, at_time(before_registration)).await.unwrap_err();
    assert_eq!(before.code(), Code::NotFound, "an hour before the registration: {before:?}");
    let beyond = as_of(&client, &id, at_position(u64::MAX / 2)).await.unwrap_err();
    assert_eq!(beyond.code(), Code::OutOfRange, "{beyond:?}");
    let missing = as_of(&client, &id, None).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument, "no point given: {missing:?}");
    let unknown = as_of(&client, &uuid::Uuid::new_v4().to_string(), at_position(p3)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let malformed = as_of(&client, "not-a-uuid-7319", at_position(p3)).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");

    let erased = erase(&app.client, &id, "").await.unwrap();
    wait_final(&app, erased.position).await;
    let at_erasure = as_of(&client, &id, at_position(erased.position)).await.unwrap();
    assert_eq!((at_erasure.version, at_erasure.status), (4, UserStatus::Erased as i32));
    assert_no_personal_data(&at_erasure);
    let now = as_of(&client, &id, at_time(SystemTime::now())).await.unwrap();
    assert_eq!((now.version, now.status), (4, UserStatus::Erased as i32));
    assert_no_personal_data(&now);
    // The past is still there, but the person's data is gone from it too.
    let at_change = as_of(&client, &id, at_position(p2)).await.unwrap();
    assert_eq!(at_change.version, 2);
    assert_no_personal_data(&at_change);
    let at_registration = as_of(&client, &id, at_position(p1)).await.unwrap();
    assert_eq!(at_registration.version, 1);
    assert_no_personal_data(&at_registration);
    query.stop().await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Rebuild
// ---------------------------------------------------------------------------------------------------------------

/// The refused registrations, as JSON rows in a stable order (for comparing whole read models).
async fn failures_read(app: &CommandApp) -> Vec<serde_json::Value> {
    sqlx::query_scalar("SELECT to_jsonb(f) FROM registration_failures_read f ORDER BY position, audit_id")
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

/// A rebuild after erasures produces the same read models as the live projection that saw the personal data
/// first and scrubbed it later: users (a plain one, one with a profile change, a deactivated one, an erased one
/// with a refused duplicate attempt, one deactivated then erased) and refused registrations compare equal row for
/// row, and no erased person's login is left in either.
#[tokio::test]
async fn a_rebuild_after_erasures_yields_the_same_read_models() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, client) = app.start_query(&[]).await;
    let people = [
        (731905011, "zq-rebuild-plain-7319"),
        (731905022, "zq-rebuild-changed-7319"),
        (731905033, "zq-rebuild-paused-7319"),
        (731905044, "zq-rebuild-erased-7319"),
        (731905055, "zq-rebuild-paused-erased-7319"),
    ];
    let mut ids = Vec::new();
    for (github_id, login) in people {
        let name = format!("Name of {login}");
        app.github_knows(github_id, login, Some(name.as_str())).await;
        ids.push(app.register(github_id, "").await.unwrap().user_id);
    }
    github_answers(
        &app,
        731905022,
        "zq-rebuild-renamed-7319",
        "Zelda Rebuilt 7319",
        "https://avatars.example.test/zq-rebuild-7319.png",
        1,
    )
    .await;
    assert!(sync(&app, 731905022).await.unwrap().changed);
    deactivate(&app.client, &ids[2], "zq rebuild 7319", "", 0).await.unwrap();
    let duplicate = app.register(731905044, "").await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    erase(&app.client, &ids[3], "").await.unwrap();
    deactivate(&app.client, &ids[4], "zq rebuild then erase 7319", "", 0).await.unwrap();
    let last = erase(&app.client, &ids[4], "").await.unwrap();
    assert_eq!(get_user(&client, &ids[4], last.position).await.status, UserStatus::Erased as i32);
    eventually(Duration::from_secs(20), "the refused registration in its read model", || async {
        let failures: i64 =
            sqlx::query_scalar("SELECT count(*) FROM registration_failures_read").fetch_one(&app.db.pool).await?;
        Ok((failures == 1).then_some(()))
    })
    .await
    .unwrap();

    let before = app.users_read().await;
    let failures_before = failures_read(&app).await;
    assert_eq!(before.len(), 5);
    assert_eq!(failures_before.len(), 1);
    let statuses: Vec<&str> = before.iter().filter_map(|u| u["status"].as_str()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "erased").count(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == "deactivated").count(), 1, "{statuses:?}");
    let text = serde_json::to_string(&(&before, &failures_before)).unwrap();
    for gone in ["zq-rebuild-erased-7319", "zq-rebuild-paused-erased-7319", "731905044", "731905055"] {
        assert!(!text.contains(gone), "the live projection scrubbed {gone}: {text}");
    }
    assert!(text.contains("zq-rebuild-renamed-7319"), "the others are intact: {text}");

    let env = app.projector_process_env(&[]);
    let output = tokio::process::Command::new(binary_path("kiroku"))
        .args(["projector", "rebuild"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["generation"], 2);

    assert_eq!(app.users_read().await, before, "users: identical content after the flip");
    assert_eq!(failures_read(&app).await, failures_before, "refused registrations: identical after the flip");
    let user = get_user(&client, &ids[3], 0).await;
    assert_eq!(user.status, UserStatus::Erased as i32);
    assert_no_personal_data(&user);
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

/// GetUserAsOf at a position used to answer at once, even while a transaction still open could commit an event of
/// the user below it: asked again later, the same question got another answer. It now answers once the position
/// is final.
#[tokio::test]
async fn get_user_as_of_a_position_answers_only_once_that_position_is_final() {
    use kiroku_domain::{UserDeactivated, UserEvent};
    use kiroku_event_store::{Append, ExpectedVersion, append_in_transaction};
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(91, "asked-about", None).await;
    app.github_knows(92, "later", None).await;
    let user = app.register(91, "").await.unwrap();
    wait_final(&app, user.position).await;

    // The user's deactivation, appended in a transaction the test keeps open: its position is below what commits
    // next.
    let deactivated =
        UserEvent::UserDeactivated(UserDeactivated { deactivated_at: chrono::Utc::now(), personal: None });
    let append = Append {
        aggregate_id: user.user_id.parse().unwrap(),
        aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
        expected: ExpectedVersion::Exact(kiroku_event_store::Version::from(1u16)),
        events: vec![common::direct::new_event(&deactivated)],
        claims: vec![],
        idempotency: None,
        new_key: None,
        erasure: None,
    };
    let mut open = app.db.pool.begin().await.unwrap();
    append_in_transaction(&mut open, &append).await.unwrap();
    let later = app.register(92, "").await.unwrap();

    let mut asked =
        tonic::Request::new(GetUserAsOfRequest { user_id: user.user_id.clone(), as_of: at_position(later.position) });
    asked.set_timeout(Duration::from_secs(2));
    let early = client.clone().get_user_as_of(asked).await.unwrap_err();
    assert_refused(&early, Code::Unavailable, "POSITION_NOT_FINAL");

    open.commit().await.unwrap();
    let answer = as_of(&client, &user.user_id, at_position(later.position)).await.unwrap();
    assert_eq!((answer.status, answer.version), (UserStatus::Deactivated as i32, 2), "{answer:?}");
    assert_eq!(as_of(&client, &user.user_id, at_position(later.position)).await.unwrap(), answer, "repeatable");
    query.stop().await;
    app.stop().await;
}
