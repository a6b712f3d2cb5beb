//! A request id names one request (AIP-155): a retry gets the first answer whatever happened since, every answer
//! is stored ("no change" and refusals a retry would meet again included), a reuse of the id for a request that
//! asks something else is refused and changes nothing, and an erasure forgets the answers that tied the person to
//! their user.
#![allow(clippy::unwrap_used)]

mod common;

use common::{CommandApp, Commands, reason};
use kiroku::v1::{
    DeactivateUserRequest, DeactivateUserResponse, EraseUserRequest, EraseUserResponse, ReactivateUserRequest,
    ReactivateUserResponse, SyncGitHubProfileRequest, SyncGitHubProfileResponse,
};
use serde_json::json;
use tonic::{Code, Status};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

async fn deactivate(
    client: &Commands,
    user_id: &str,
    why: &str,
    request_id: &str,
) -> Result<DeactivateUserResponse, Status> {
    let request = DeactivateUserRequest {
        user_id: user_id.to_owned(),
        reason: why.to_owned(),
        request_id: request_id.to_owned(),
        expected_version: 0,
    };
    client.clone().deactivate_user(request).await.map(tonic::Response::into_inner)
}

async fn reactivate(
    client: &Commands,
    user_id: &str,
    request_id: &str,
    expected_version: u64,
) -> Result<ReactivateUserResponse, Status> {
    let request =
        ReactivateUserRequest { user_id: user_id.to_owned(), request_id: request_id.to_owned(), expected_version };
    client.clone().reactivate_user(request).await.map(tonic::Response::into_inner)
}

async fn erase(client: &Commands, user_id: &str, request_id: &str) -> Result<EraseUserResponse, Status> {
    let request = EraseUserRequest { user_id: user_id.to_owned(), request_id: request_id.to_owned() };
    client.clone().erase_user(request).await.map(tonic::Response::into_inner)
}

async fn sync(
    app: &CommandApp,
    github_id: u64,
    request_id: &str,
    expected_version: u64,
) -> Result<SyncGitHubProfileResponse, Status> {
    let request = SyncGitHubProfileRequest {
        auth0_token: app.token(github_id),
        request_id: request_id.to_owned(),
        expected_version,
    };
    app.client.clone().sync_git_hub_profile(request).await.map(tonic::Response::into_inner)
}

#[track_caller]
fn assert_reused(result: Result<impl std::fmt::Debug, Status>) {
    let status = result.unwrap_err();
    assert_eq!((status.code(), reason(&status).as_str()), (Code::InvalidArgument, "REQUEST_ID_REUSED"), "{status:?}");
}

#[track_caller]
fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: Code, expected: &str) {
    let status = result.unwrap_err();
    assert_eq!((status.code(), reason(&status).as_str()), (code, expected), "{status:?}");
}

async fn events_of(app: &CommandApp, user_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1::uuid")
        .bind(user_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_request_id_reused_for_another_request_is_invalid_argument_and_changes_nothing() {
    let app = CommandApp::spawn().await;
    for id in [1, 2] {
        app.github_knows(id, &format!("user{id}"), None).await;
    }
    let a = app.register(1, "").await.unwrap();
    let b = app.register(2, "").await.unwrap();

    // EraseUser(B, r) after EraseUser(A, r) used to answer OK with A's position and leave B as they were.
    let erased = erase(&app.client, &a.user_id, "erase-1").await.unwrap();
    let before = app.total_events().await;
    assert_reused(erase(&app.client, &b.user_id, "erase-1").await);
    assert_eq!(app.total_events().await, before, "nothing written");
    assert_eq!(events_of(&app, &b.user_id).await, 1, "B is neither erased nor changed");
    assert_eq!(erase(&app.client, &a.user_id, "erase-1").await.unwrap().position, erased.position, "the retry");

    // The same user, but another reason: another request.
    let deactivated = deactivate(&app.client, &b.user_id, "spam", "deactivate-1").await.unwrap();
    assert_reused(deactivate(&app.client, &b.user_id, "fraud", "deactivate-1").await);
    assert_eq!(deactivate(&app.client, &b.user_id, "spam", "deactivate-1").await.unwrap(), deactivated);
    // Another expected version.
    let reactivated = reactivate(&app.client, &b.user_id, "reactivate-1", 2).await.unwrap();
    assert_reused(reactivate(&app.client, &b.user_id, "reactivate-1", 0).await);
    assert_eq!(reactivate(&app.client, &b.user_id, "reactivate-1", 2).await.unwrap(), reactivated);
    // A request id of one RPC is free in another (one namespace per RPC).
    deactivate(&app.client, &b.user_id, "again", "reactivate-1").await.unwrap();
    reactivate(&app.client, &b.user_id, "erase-1", 0).await.unwrap();

    let synced = sync(&app, 2, "sync-1", 0).await.unwrap();
    assert_reused(sync(&app, 2, "sync-1", synced.version).await);
    assert_eq!(sync(&app, 2, "sync-1", 0).await.unwrap(), synced);
    assert_eq!(events_of(&app, &b.user_id).await, 5, "registered, deactivated, reactivated, deactivated, reactivated");
    app.stop().await;
}

#[tokio::test]
async fn every_answer_is_stored_no_change_and_final_refusals_included() {
    let app = CommandApp::spawn().await;
    app.github_knows(3, "before", None).await;
    let user = app.register(3, "").await.unwrap();

    // "No change", then the profile changes on GitHub: the retry gets the first answer and writes nothing.
    let unchanged = sync(&app, 3, "sync-1", 0).await.unwrap();
    assert!(!unchanged.changed, "{unchanged:?}");
    Mock::given(method("GET"))
        .and(path("/user/3"))
        .respond_with(ResponseTemplate::new(200).insert_header("ETag", "\"after-etag\"").set_body_json(json!({
            "id": 3, "login": "after", "name": null, "avatar_url": null,
        })))
        .with_priority(1)
        .mount(&app.github)
        .await;
    assert_eq!(sync(&app, 3, "sync-1", 0).await.unwrap(), unchanged, "the retry of a request that changed nothing");
    assert_eq!(app.count_events("UserProfileUpdated").await, 0);
    assert!(sync(&app, 3, "sync-2", 0).await.unwrap().changed, "a new request sees the change");

    // A refusal decided from the log is the request's answer too, whatever happens next.
    deactivate(&app.client, &user.user_id, "first", "deactivate-1").await.unwrap();
    let twice = deactivate(&app.client, &user.user_id, "second", "deactivate-2").await;
    assert_refused(twice, Code::FailedPrecondition, "INVALID_USER_STATE");
    reactivate(&app.client, &user.user_id, "reactivate-1", 0).await.unwrap();
    let before = app.total_events().await;
    let retried = deactivate(&app.client, &user.user_id, "second", "deactivate-2").await;
    assert_refused(retried, Code::FailedPrecondition, "INVALID_USER_STATE");
    assert_eq!(app.total_events().await, before, "the retry of a refused request writes nothing");
    // An explicit version that does not match is final too: the version never goes back.
    let stale = reactivate(&app.client, &user.user_id, "reactivate-2", 1).await;
    assert_refused(stale, Code::Aborted, "VERSION_CONFLICT");
    deactivate(&app.client, &user.user_id, "third", "deactivate-3").await.unwrap();
    let retried = reactivate(&app.client, &user.user_id, "reactivate-2", 1).await;
    assert_refused(retried, Code::Aborted, "VERSION_CONFLICT");
    // An unknown user is final as well.
    let nobody = uuid::Uuid::new_v4().to_string();
    assert_refused(erase(&app.client, &nobody, "erase-1").await, Code::NotFound, "USER_NOT_FOUND");
    assert_refused(erase(&app.client, &nobody, "erase-1").await, Code::NotFound, "USER_NOT_FOUND");
    app.stop().await;
}

#[tokio::test]
async fn an_erasure_forgets_the_answers_that_tied_the_person_to_their_user() {
    let app = CommandApp::spawn().await;
    app.github_knows(4, "forgotten", None).await;
    let first = app.register(4, "register-1").await.unwrap();
    let refused = app.register(4, "register-2").await.unwrap_err();
    assert_eq!(reason(&refused), "USER_ALREADY_EXISTS");
    sync(&app, 4, "sync-1", 0).await.unwrap();
    deactivate(&app.client, &first.user_id, "asked to", "deactivate-1").await.unwrap();
    erase(&app.client, &first.user_id, "erase-1").await.unwrap();

    // The records keyed by the person (a keyed hash of their subject) that named the user are gone; those of the
    // calling service (an administrator's requests) stay, so that its retries still get their answers.
    let records: Vec<String> = sqlx::query_scalar(
        "SELECT split_part(caller, ':', 1) FROM idempotency_records WHERE outcome ->> 'user_id' = $1 ORDER BY 1",
    )
    .bind(&first.user_id)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(records, ["DeactivateUser", "EraseUser"]);
    assert!(erase(&app.client, &first.user_id, "erase-1").await.is_ok(), "the erasure's retry is answered");

    // The person registers again with the request id of their first registration: a new user, not the old answer.
    let again = app.register(4, "register-1").await.unwrap();
    assert_ne!(again.user_id, first.user_id);
    app.stop().await;
}

/// Answers are kept 48 hours, then pruned however many came in: the relay used to prune ten thousand a minute at
/// most (and none while it had a backlog), so that a busy day's records outgrew it.
#[tokio::test]
async fn old_answers_are_pruned_however_many_there_are() {
    let app = CommandApp::spawn().await;
    app.github_knows(5, "fresh", None).await;
    app.register(5, "fresh").await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_records (caller, request_id, outcome, aggregate_id, version, position, created_at) \
         SELECT 'RegisterUser:old', 'r' || n, '{}'::jsonb, gen_random_uuid(), 1, n, now() - interval '3 days' \
         FROM generate_series(1, 25000) AS n",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    // Another command service: its first round runs as it starts.
    let (running, _) = app.start_command().await;
    kiroku_testkit::eventually(std::time::Duration::from_secs(30), "the old answers pruned", || async {
        let old: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_records WHERE caller = 'RegisterUser:old'")
            .fetch_one(&app.db.pool)
            .await?;
        Ok((old == 0).then_some(()))
    })
    .await
    .unwrap();
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_records").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(kept, 1, "the fresh answer is kept");
    running.stop().await;
    app.stop().await;
}
