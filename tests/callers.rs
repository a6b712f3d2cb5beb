//! Callers: every `kiroku.v1` RPC needs a caller token (`authorization: Bearer`) for the API audience, holding
//! the RPC's permission; health and reflection stay open; the caller is recorded in the events it causes.
#![allow(clippy::unwrap_used)]

mod common;

use common::{API_AUDIENCE, CommandApp, reason};
use kiroku::permissions::{READ, REGISTER, WATCH};
use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku::v1::{ListUsersRequest, RegisterUserRequest, WatchEventsRequest};
use kiroku_dev_identity::unix_now;
use kiroku_testkit::with_caller;
use serde_json::json;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

async fn channel(address: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap()
}

fn register_request(app: &CommandApp, github_id: u64) -> RegisterUserRequest {
    RegisterUserRequest { auth0_token: app.token(github_id), request_id: String::new() }
}

#[tokio::test]
async fn a_call_without_a_valid_caller_token_is_unauthenticated_and_writes_nothing() {
    let app = CommandApp::spawn().await;
    app.github_knows(6001, "someone", None).await;
    let now = unix_now();
    let claims = |audience: &str, exp: u64| {
        json!({
            "iss": app.issuer(), "aud": audience, "sub": "svc@clients", "azp": "svc", "gty": "client-credentials",
            "permissions": ["kiroku:register"], "iat": now - 600, "exp": exp,
        })
    };
    // What a signed-in user can get from a tenant without RBAC on the API: the API's audience, any scope, but a
    // user's grant (no `gty: client-credentials`).
    let user_for_the_api = |grant: Option<&str>| {
        let mut claims = json!({
            "iss": app.issuer(), "aud": API_AUDIENCE, "sub": "github|6001", "azp": "spa-client",
            "scope": "openid kiroku:register kiroku:read kiroku:admin", "iat": now, "exp": now + 600,
        });
        if let Some(grant) = grant {
            claims["gty"] = json!(grant);
        }
        app.key.sign(&claims).unwrap()
    };
    let refusals = [
        ("no token", None),
        ("not a JWT", Some("garbage".to_owned())),
        // The end user's token is not a caller's: its audience is the user audience.
        ("a user token", Some(app.token(6001))),
        ("a token for another API", Some(app.key.sign(&claims("https://elsewhere/api", now + 600)).unwrap())),
        ("an expired token", Some(app.key.sign(&claims(API_AUDIENCE, now - 120)).unwrap())),
        ("a token of another key", Some(common::other_key().sign(&claims(API_AUDIENCE, now + 600)).unwrap())),
        ("an end user's token for the API", Some(user_for_the_api(None))),
        ("an end user's refreshed token for the API", Some(user_for_the_api(Some("refresh_token")))),
    ];
    for (what, token) in refusals {
        let channel = channel(app.address).await;
        let status = match token {
            None => CommandServiceClient::new(channel).register_user(register_request(&app, 6001)).await,
            Some(token) => {
                CommandServiceClient::new(with_caller(channel, &token))
                    .register_user(register_request(&app, 6001))
                    .await
            }
        }
        .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert_eq!(reason(&status), "CALLER_UNAUTHENTICATED", "{what}");
    }
    assert_eq!(app.total_events().await, 0, "nothing was written");
    // With a caller token, the same call registers.
    app.register(6001, "").await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn each_rpc_needs_its_permission_from_permissions_or_scope() {
    let app = CommandApp::spawn().await;
    let (query, _) = app.start_query(&[]).await;
    app.github_knows(6101, "permitted", None).await;
    let commands =
        |token: String| async move { CommandServiceClient::new(with_caller(channel(app.address).await, &token)) };
    let queries =
        |token: String| async move { QueryServiceClient::new(with_caller(channel(query.address).await, &token)) };

    // A reader may not register; the refusal names the permission.
    let refused =
        commands(app.caller_token(&[READ, WATCH])).await.register_user(register_request(&app, 6101)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let info = refused.get_details_error_info().unwrap();
    assert_eq!((info.reason.as_str(), info.metadata["permission"].as_str()), ("PERMISSION_MISSING", REGISTER));
    // A registrar may not read or watch.
    let mut registrar = queries(app.caller_token(&[REGISTER])).await;
    let refused = registrar.list_users(ListUsersRequest::default()).await.unwrap_err();
    assert_eq!(
        (refused.code(), refused.get_details_error_info().unwrap().metadata["permission"].clone()),
        (Code::PermissionDenied, READ.to_owned())
    );
    let refused = registrar.watch_events(WatchEventsRequest::default()).await.unwrap_err();
    assert_eq!(refused.get_details_error_info().unwrap().metadata["permission"], WATCH);

    // Permissions may come as Auth0 RBAC's array or as a space-separated scope.
    let now = unix_now();
    let scoped = app
        .key
        .sign(&json!({
            "iss": app.issuer(), "aud": [API_AUDIENCE, "https://other/api"], "sub": "svc@clients", "azp": "svc",
            "gty": "client-credentials", "scope": "kiroku:read kiroku:register", "iat": now, "exp": now + 600,
        }))
        .unwrap();
    let registered = commands(scoped.clone()).await.register_user(register_request(&app, 6101)).await.unwrap();
    assert!(!registered.into_inner().user_id.is_empty());
    queries(scoped).await.list_users(ListUsersRequest::default()).await.unwrap();
    query.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn health_and_reflection_stay_open_and_the_caller_is_recorded_in_the_events() {
    let app = CommandApp::spawn().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(app.address).await);
    let serving = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(serving.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    app.github_knows(6201, "recorded", None).await;
    let token = common::caller_token(&app.key, &app.issuer(), &[REGISTER]);
    let registered = CommandServiceClient::new(with_caller(channel(app.address).await, &token))
        .register_user(register_request(&app, 6201))
        .await
        .unwrap()
        .into_inner();
    let metadata: serde_json::Value = sqlx::query_scalar("SELECT metadata FROM events WHERE aggregate_id = $1::uuid")
        .bind(&registered.user_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(metadata["caller"], json!({ "sub": "tests@clients", "azp": "tests" }));
    // The end user's token is still checked as before, whatever the caller: a caller's token in its place fails.
    let refused = CommandServiceClient::new(with_caller(channel(app.address).await, &token))
        .register_user(RegisterUserRequest { auth0_token: token.clone(), request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!((refused.code(), reason(&refused)), (Code::Unauthenticated, "TOKEN_INVALID".to_owned()));
    app.stop().await;
}

#[tokio::test]
async fn past_a_cap_a_call_is_resource_exhausted_with_retry_info_never_a_stall() {
    let app = CommandApp::spawn().await;
    let (query, client) =
        app.start_query(&[("KIROKU_WATCH_MAX_STREAMS_PER_CALLER", "2"), ("KIROKU_MAX_IN_FLIGHT", "1")]).await;

    // WatchEvents: two streams per caller, the third refused until one ends.
    let first = client.clone().watch_events(WatchEventsRequest::default()).await.unwrap().into_inner();
    let _second = client.clone().watch_events(WatchEventsRequest::default()).await.unwrap().into_inner();
    let third = client.clone().watch_events(WatchEventsRequest::default()).await.unwrap_err();
    assert_eq!((third.code(), reason(&third)), (Code::ResourceExhausted, "LIMIT_REACHED".to_owned()));
    assert!(third.get_details_retry_info().is_some());
    drop(first);
    kiroku_testkit::eventually(std::time::Duration::from_secs(10), "the ended stream's place back", || async {
        Ok(client.clone().watch_events(WatchEventsRequest::default()).await.ok().map(|_| ()))
    })
    .await
    .unwrap();

    // Calls in flight: one GetUser waits for a position no projector will reach; another call meanwhile is shed.
    app.github_knows(6301, "waiting", None).await;
    let registered = app.register(6301, "").await.unwrap();
    let waiting = {
        let mut client = client.clone();
        let mut request = tonic::Request::new(kiroku::v1::GetUserRequest {
            user_id: registered.user_id.clone(),
            min_position: registered.position,
        });
        request.set_timeout(std::time::Duration::from_secs(3));
        tokio::spawn(async move { client.get_user(request).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let shed = client.clone().list_users(ListUsersRequest::default()).await.unwrap_err();
    assert_eq!((shed.code(), reason(&shed)), (Code::ResourceExhausted, "LIMIT_REACHED".to_owned()));
    assert!(shed.get_details_retry_info().is_some());
    // A call without a valid caller is refused before it can take a place: at the limit it is still told why.
    let stranger = QueryServiceClient::new(channel(query.address).await)
        .list_users(ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!((stranger.code(), reason(&stranger)), (Code::Unauthenticated, "CALLER_UNAUTHENTICATED".to_owned()));
    let waited = waiting.await.unwrap().unwrap_err();
    assert_eq!(reason(&waited), "PROJECTION_BEHIND");
    client.clone().list_users(ListUsersRequest::default()).await.unwrap();
    query.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn one_caller_cannot_take_every_place_in_flight() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[("KIROKU_MAX_IN_FLIGHT_PER_CALLER", "1")]).await;
    app.github_knows(6401, "waiting", None).await;
    let registered = app.register(6401, "").await.unwrap();
    // The caller's one place: a GetUser that waits for a position no projector will reach.
    let waiting = {
        let mut client = client.clone();
        let mut request = tonic::Request::new(kiroku::v1::GetUserRequest {
            user_id: registered.user_id.clone(),
            min_position: registered.position,
        });
        request.set_timeout(std::time::Duration::from_secs(3));
        tokio::spawn(async move { client.get_user(request).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let shed = client.clone().list_users(ListUsersRequest::default()).await.unwrap_err();
    assert_eq!((shed.code(), reason(&shed)), (Code::ResourceExhausted, "LIMIT_REACHED".to_owned()), "{shed:?}");
    assert!(shed.message().contains("this caller"), "{shed:?}");
    // Another caller still gets in.
    let other = app.key.mint_caller(&app.issuer(), API_AUDIENCE, "other-service", &[READ], Duration::from_secs(600));
    QueryServiceClient::new(with_caller(channel(query.address).await, &other.unwrap()))
        .list_users(ListUsersRequest::default())
        .await
        .unwrap();
    assert_eq!(reason(&waiting.await.unwrap().unwrap_err()), "PROJECTION_BEHIND");
    // The place is given back when the call ends.
    client.clone().list_users(ListUsersRequest::default()).await.unwrap();
    query.stop().await;
    app.stop().await;
}
