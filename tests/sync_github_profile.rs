//! SyncGitHubProfile end to end, and the command server's health, reflection and shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{CommandApp, reason};
use kiroku::v1::SyncGitHubProfileRequest;
use serde_json::json;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

async fn sync(
    app: &CommandApp,
    github_id: u64,
    expected_version: u64,
) -> Result<kiroku::v1::SyncGitHubProfileResponse, tonic::Status> {
    let mut client = app.client.clone();
    client
        .sync_git_hub_profile(SyncGitHubProfileRequest {
            auth0_token: app.token(github_id),
            request_id: String::new(),
            expected_version,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn an_unchanged_profile_writes_nothing_and_a_changed_one_appends_an_update() {
    let app = CommandApp::spawn().await;
    app.github_knows(583231, "octocat", Some("The Octocat")).await;
    let registered = app.register(583231, "").await.unwrap();

    // GitHub answers the conditional request (the ETag stored at registration) with 304.
    Mock::given(method("GET"))
        .and(path("/user/583231"))
        .and(header("If-None-Match", "\"octocat-etag\""))
        .respond_with(ResponseTemplate::new(304))
        .with_priority(1)
        .named("not modified")
        .mount(&app.github)
        .await;
    let unchanged = sync(&app, 583231, 0).await.unwrap();
    assert_eq!(
        (unchanged.user_id.as_str(), unchanged.version, unchanged.position, unchanged.changed),
        (registered.user_id.as_str(), 1, registered.position, false)
    );
    assert_eq!(app.total_events().await, 1);

    // The account is renamed: the full profile comes back and differs in login and avatar only.
    app.github.reset().await;
    Mock::given(method("GET"))
        .and(path("/user/583231"))
        .respond_with(ResponseTemplate::new(200).insert_header("ETag", "\"v2\"").set_body_json(json!({
            "id": 583231, "login": "octodog", "name": "The Octocat", "avatar_url": "https://example.test/new.png",
        })))
        .mount(&app.github)
        .await;
    let changed = sync(&app, 583231, 1).await.unwrap();
    assert!(changed.changed);
    assert_eq!(changed.version, 2);
    assert!(changed.position > registered.position);
    // Stored sealed; opened, only the changed fields (and the new ETag).
    let store = kiroku_event_store::EventStore::new(app.db.pool.clone());
    let user_id: uuid::Uuid = registered.user_id.parse().unwrap();
    let stored = store.read_stream(user_id, kiroku_event_store::Version::from(1u16), 10).await.unwrap();
    assert_eq!((stored.len(), stored[0].event_type.as_str(), stored[0].version.get()), (1, "UserProfileUpdated", 2));
    assert!(stored[0].data.get("sealed").is_some() && stored[0].data.get("personal").is_none(), "{}", stored[0].data);
    let master = kiroku_vault::MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).unwrap();
    let opened = kiroku_vault::Vault::new(store, std::sync::Arc::new(master)).open(stored).await.unwrap();
    assert_eq!(
        opened[0].data["personal"],
        json!({ "github_username": "octodog", "avatar_url": "https://example.test/new.png", "github_etag": "\"v2\"" })
    );

    // The same profile again: no event.
    let again = sync(&app, 583231, 2).await.unwrap();
    assert_eq!((again.changed, again.version, again.position), (false, 2, changed.position));
    assert_eq!(app.total_events().await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_stale_expected_version_is_aborted_and_an_unknown_user_is_not_found() {
    let app = CommandApp::spawn().await;
    app.github_knows(5, "five", None).await;
    app.register(5, "").await.unwrap();

    let stale = sync(&app, 5, 4).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(reason(&stale), "VERSION_CONFLICT");

    app.github_knows(6, "six", None).await;
    let unknown = sync(&app, 6, 0).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(app.total_events().await, 1);
    app.stop().await;
}

#[tokio::test]
async fn the_command_server_serves_health_and_reflection_and_stops_on_request() {
    let app = CommandApp::spawn().await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", app.address)).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "kiroku.v1.CommandService"] {
        let status = health.check(HealthCheckRequest { service: service.to_owned() }).await.unwrap().into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service:?}");
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"kiroku.v1.CommandService".to_owned()), "{names:?}");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("google.rpc.ErrorInfo".to_owned())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().unwrap().message_response.unwrap();
    assert!(
        matches!(response, MessageResponse::FileDescriptorResponse(_)),
        "error details are reflected: {response:?}"
    );

    let started = std::time::Instant::now();
    app.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn health_goes_not_serving_while_postgres_is_unreachable() {
    use sqlx::{Connection, Executor};
    let app = CommandApp::spawn().await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", app.address)).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let status = |health: &mut HealthClient<tonic::transport::Channel>, service: &str| {
        let mut health = health.clone();
        let service = service.to_owned();
        async move { health.check(HealthCheckRequest { service }).await.unwrap().into_inner().status }
    };
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving as i32);

    // The service's database goes away, connections and all.
    let mut admin = sqlx::PgConnection::connect(&kiroku_testkit::admin_database_url()).await.unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE {} WITH (FORCE)", app.db.name))).await.unwrap();
    for service in ["", "kiroku.v1.CommandService"] {
        kiroku_testkit::eventually(Duration::from_secs(20), "NOT_SERVING", || {
            let check = status(&mut health, service);
            async move { Ok((check.await == ServingStatus::NotServing as i32).then_some(())) }
        })
        .await
        .unwrap();
    }
    app.stop().await;
}
