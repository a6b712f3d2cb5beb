//! RegisterUser end to end: real gRPC, PostgreSQL and Redis; wiremock for Auth0's JWKS and GitHub.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{AUDIENCE, CommandApp, other_key, reason};
use fred::prelude::*;
use kiroku::v1::RegisterUserRequest;
use kiroku_dev_identity::unix_now;
use kiroku_testkit::eventually;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

#[tokio::test]
async fn registers_a_user_and_records_the_event_with_its_metadata_and_publishes_it() {
    let app = CommandApp::spawn().await;
    app.github_knows(583231, "octocat", Some("The Octocat")).await;

    let response = app.register(583231, "req-1").await.unwrap();
    let user_id: uuid::Uuid = response.user_id.parse().unwrap();
    assert!(response.position > 0);

    let (aggregate_type, event_type, version, position, data, metadata): (
        String,
        String,
        i32,
        i64,
        serde_json::Value,
        serde_json::Value,
    ) = sqlx::query_as(
        "SELECT aggregate_type, event_type, event_version, position, event_data, metadata FROM events \
         WHERE aggregate_id = $1",
    )
    .bind(user_id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((aggregate_type.as_str(), event_type.as_str(), version), ("User", "UserRegistered", 1));
    assert_eq!(position as u64, response.position);
    assert!(data.get("sealed").is_some() && data.get("personal").is_none(), "stored sealed: {data}");
    let data = common::open_payload(&app.db.pool, "UserRegistered", data).await;
    assert_eq!(data["personal"]["auth0_id"], "github|583231");
    assert_eq!(data["personal"]["github_id"], "583231");
    assert_eq!(
        data["personal"],
        json!({
            "auth0_id": "github|583231",
            "github_id": "583231",
            "github_username": "octocat",
            "display_name": "The Octocat",
            "avatar_url": "https://avatars.githubusercontent.com/u/583231",
            "github_etag": "\"octocat-etag\"",
        })
    );
    assert!(data["registered_at"].is_string());
    assert_eq!(metadata["request_id"], "req-1");
    assert_eq!(metadata["correlation_id"], "req-1");
    assert!(metadata["causation_id"].as_str().unwrap().len() == 26, "the command's ULID");
    assert_eq!(metadata["schema_version"], 2, "personal fields under `personal`, sealed");

    // The relay publishes it to the stream under its position.
    let entry: HashMap<String, String> = eventually(Duration::from_secs(20), "the stream entry", || async {
        let entries: Vec<(String, HashMap<String, String>)> =
            app.redis.client.xrange(app.redis.events_stream(), "-", "+", None).await?;
        Ok(entries.into_iter().next().map(|(_, fields)| fields))
    })
    .await
    .unwrap();
    assert_eq!(entry["position"], response.position.to_string());
    assert_eq!(entry["aggregate_id"], response.user_id);
    assert_eq!(entry["event_type"], "UserRegistered");
    app.stop().await;
}

#[tokio::test]
async fn the_display_name_falls_back_to_the_login() {
    let app = CommandApp::spawn().await;
    app.github_knows(7, "nameless", None).await;
    let response = app.register(7, "").await.unwrap();
    let data: serde_json::Value = sqlx::query_scalar("SELECT event_data FROM events WHERE aggregate_id = $1")
        .bind(response.user_id.parse::<uuid::Uuid>().unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let data = common::open_payload(&app.db.pool, "UserRegistered", data).await;
    assert_eq!(data["personal"]["display_name"], "nameless");
    app.stop().await;
}

fn claims(app: &CommandApp, overrides: serde_json::Value) -> serde_json::Value {
    let now = unix_now();
    let mut claims = json!({
        "iss": app.issuer(), "aud": AUDIENCE, "sub": "github|583231", "iat": now, "nbf": now, "exp": now + 3600,
    });
    for (k, v) in overrides.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

fn unsigned(header: serde_json::Value, claims: &serde_json::Value) -> String {
    format!("{}.{}.", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()))
}

#[tokio::test]
async fn every_bad_token_is_unauthenticated_and_writes_nothing() {
    let app = CommandApp::spawn().await;
    app.github_knows(583231, "octocat", None).await;
    let now = unix_now();
    let kid = app.key.kid().to_owned();

    let hs256_with_public_key = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(kid.clone());
        let (n, _) = app.key.public_components();
        jsonwebtoken::encode(&header, &claims(&app, json!({})), &jsonwebtoken::EncodingKey::from_secret(n.as_bytes()))
            .unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            app.key.sign(&claims(&app, json!({ "exp": now - 3600, "nbf": now - 7200 }))).unwrap(),
            "TOKEN_EXPIRED",
        ),
        ("not yet valid", app.key.sign(&claims(&app, json!({ "nbf": now + 3600 }))).unwrap(), "TOKEN_INVALID"),
        (
            "wrong issuer",
            app.key.sign(&claims(&app, json!({ "iss": "https://evil.example/" }))).unwrap(),
            "TOKEN_INVALID",
        ),
        ("wrong audience", app.key.sign(&claims(&app, json!({ "aud": "someone-else" }))).unwrap(), "TOKEN_INVALID"),
        (
            "no audience",
            app.key.sign(&json!({ "iss": app.issuer(), "sub": "github|583231", "exp": now + 60 })).unwrap(),
            "TOKEN_INVALID",
        ),
        ("unknown kid", app.key.sign_as("no-such-kid", &claims(&app, json!({}))).unwrap(), "TOKEN_INVALID"),
        ("another key", other_key().sign_as(&kid, &claims(&app, json!({}))).unwrap(), "TOKEN_INVALID"),
        ("alg none", unsigned(json!({ "alg": "none", "kid": kid }), &claims(&app, json!({}))), "TOKEN_INVALID"),
        ("HS256 keyed with the public key", hs256_with_public_key, "TOKEN_INVALID"),
        ("garbage", "not.a.token".to_owned(), "TOKEN_INVALID"),
        ("one word", "garbage".to_owned(), "TOKEN_INVALID"),
        (
            "a jku pointing elsewhere",
            {
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                header.kid = Some("attacker".to_owned());
                header.jku = Some("http://127.0.0.1:1/jwks.json".to_owned());
                let key = other_key();
                let mut c = claims(&app, json!({}));
                c["kid_hint"] = json!(key.kid());
                key.sign_as("attacker", &c).unwrap()
            },
            "TOKEN_INVALID",
        ),
    ];
    let mut client = app.client.clone();
    for (case, token, expected_reason) in cases {
        let status = client
            .register_user(RegisterUserRequest { auth0_token: token, request_id: String::new() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert_eq!(reason(&status), expected_reason, "{case}");
    }
    let empty = client
        .register_user(RegisterUserRequest { auth0_token: String::new(), request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(empty.get_details_bad_request().unwrap().field_violations[0].field, "auth0_token");
    assert_eq!(app.total_events().await, 0, "nothing written");
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_ten_seconds() {
    let app = CommandApp::spawn().await;
    app.github_knows(1, "one", None).await;
    app.register(1, "").await.unwrap();
    let hits = || async { app.auth0.received_requests().await.unwrap().len() };
    assert_eq!(hits().await, 1, "the first token fetched the JWKS");

    let flood = (0..100).map(|n| {
        let mut client = app.client.clone();
        let token = app.key.sign_as(&format!("bogus-{n}"), &claims(&app, json!({}))).unwrap();
        async move { client.register_user(RegisterUserRequest { auth0_token: token, request_id: String::new() }).await }
    });
    for result in futures::future::join_all(flood).await {
        assert_eq!(result.unwrap_err().code(), Code::Unauthenticated);
    }
    assert_eq!(hits().await, 1, "no refetch within 10 s of the last one");
    app.stop().await;
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart() {
    let app = CommandApp::spawn().await;
    app.github_knows(1, "one", None).await;
    app.github_knows(2, "two", None).await;
    app.register(1, "").await.unwrap();

    // Auth0 rotates: the JWKS now holds only the new key.
    let rotated = other_key();
    app.auth0.reset().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(kiroku_dev_identity::jwks(&[&rotated])))
        .mount(&app.auth0)
        .await;
    let token = rotated.mint(&app.issuer(), AUDIENCE, 2, Duration::from_secs(600)).unwrap();
    // Within 10 s of the last fetch the new kid is unknown; after that, it is fetched once and accepted.
    let registered = eventually(Duration::from_secs(20), "the rotated key to be accepted", || {
        let mut client = app.client.clone();
        let token = token.clone();
        async move {
            match client.register_user(RegisterUserRequest { auth0_token: token, request_id: String::new() }).await {
                Ok(response) => Ok(Some(response.into_inner())),
                Err(status) if status.code() == Code::Unauthenticated => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok(None)
                }
                Err(status) => Err(status.into()),
            }
        }
    })
    .await
    .unwrap();
    assert!(!registered.user_id.is_empty());
    // The old key is gone from the JWKS, so its tokens are refused now.
    assert_eq!(app.register(1, "").await.unwrap_err().code(), Code::Unauthenticated);
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_jwks_is_unavailable() {
    let app = CommandApp::spawn_with(&[("KIROKU_AUTH0_JWKS_URL", "http://127.0.0.1:9/jwks.json")]).await;
    let status = app.register(1, "").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "JWKS_UNAVAILABLE");
    app.stop().await;
}

#[tokio::test]
async fn a_subject_that_is_not_a_github_identity_is_a_failed_precondition() {
    let app = CommandApp::spawn().await;
    let token = app.key.sign(&claims(&app, json!({ "sub": "google-oauth2|12345" }))).unwrap();
    let mut client = app.client.clone();
    let status =
        client.register_user(RegisterUserRequest { auth0_token: token, request_id: String::new() }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "NOT_A_GITHUB_IDENTITY");
    assert_eq!(app.total_events().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn github_failures_map_to_their_codes_and_write_nothing() {
    let app = CommandApp::spawn_with(&[("KIROKU_GITHUB_TIMEOUT_MS", "300")]).await;
    let reset = unix_now() + 90;
    let answers = [
        (404, ResponseTemplate::new(404), Code::FailedPrecondition, "GITHUB_ACCOUNT_NOT_FOUND"),
        (500, ResponseTemplate::new(500), Code::Unavailable, "GITHUB_UNAVAILABLE"),
        (502, ResponseTemplate::new(200).set_delay(Duration::from_secs(3)), Code::Unavailable, "GITHUB_UNAVAILABLE"),
        (
            403,
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str()),
            Code::Unavailable,
            "GITHUB_UNAVAILABLE",
        ),
    ];
    for (id, answer, code, expected_reason) in answers {
        Mock::given(method("GET")).and(path(format!("/user/{id}"))).respond_with(answer).mount(&app.github).await;
        let status = app.register(id, "").await.unwrap_err();
        assert_eq!(status.code(), code, "GitHub answer for {id}: {status:?}");
        assert_eq!(reason(&status), expected_reason);
        if code == Code::Unavailable {
            let retry = status.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
            if id == 403 {
                assert!(retry > Duration::from_secs(60), "from the rate-limit reset: {retry:?}");
            }
        }
    }
    assert_eq!(app.total_events().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_registrations_of_one_identity_make_one_user_and_forty_nine_refusals() {
    let app = CommandApp::spawn().await;
    app.github_knows(583231, "octocat", None).await;
    let attempts = (0..50).map(|_| app.register(583231, ""));
    let results = futures::future::join_all(attempts).await;

    let winners: Vec<String> = results.iter().filter_map(|r| r.as_ref().ok().map(|r| r.user_id.clone())).collect();
    assert_eq!(winners.len(), 1, "exactly one registration succeeds");
    let refusals: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refusals.len(), 49);
    for status in refusals {
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "USER_ALREADY_EXISTS");
        assert_eq!(info.metadata["user_id"], winners[0], "the refusal names the existing user");
    }
    assert_eq!(app.count_events("UserRegistered").await, 1);
    assert_eq!(app.count_events("UserRegistrationFailed").await, 49);
    let audits: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'UserRegistrationAudit'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(audits, 49, "a fresh audit aggregate per refusal");
    let failure: serde_json::Value =
        sqlx::query_scalar("SELECT event_data FROM events WHERE event_type = 'UserRegistrationFailed' LIMIT 1")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(failure["duplicate_user_id"], winners[0]);
    let failure = common::open_payload(&app.db.pool, "UserRegistrationFailed", failure).await;
    assert_eq!(failure["personal"]["auth0_id"], "github|583231");
    assert_eq!(failure["reason"], "DUPLICATE_AUTH0_ID");
    app.stop().await;
}

#[tokio::test]
async fn a_retried_request_id_gets_the_first_answer_and_writes_once() {
    let app = CommandApp::spawn().await;
    app.github_knows(10, "ten", None).await;
    app.github_knows(11, "eleven", None).await;

    let first = app.register(10, "retry-1").await.unwrap();
    let again = app.register(10, "retry-1").await.unwrap();
    assert_eq!(again, first, "same user_id and position");
    assert_eq!(app.count_events("UserRegistered").await, 1);

    // Concurrent repeats of a fresh request id: one writes, the rest wait and replay.
    let repeats = (0..10).map(|_| app.register(11, "retry-2"));
    let results: Vec<_> = futures::future::join_all(repeats).await.into_iter().map(Result::unwrap).collect();
    assert!(results.iter().all(|r| *r == results[0]), "{results:?}");
    assert_eq!(app.count_events("UserRegistered").await, 2);
    assert_eq!(app.count_events("UserRegistrationFailed").await, 0, "a replay is not a refusal");

    // Another caller reusing the request id gets its own answer.
    app.github_knows(12, "twelve", None).await;
    let other = app.register(12, "retry-1").await.unwrap();
    assert_ne!(other.user_id, first.user_id);
    assert_eq!(app.count_events("UserRegistered").await, 3);

    // A refused duplicate retried with its request id is refused the same way, and audited once.
    let refused = app.register(10, "dup-1").await.unwrap_err();
    let refused_again = app.register(10, "dup-1").await.unwrap_err();
    assert_eq!(refused_again.code(), Code::AlreadyExists);
    assert_eq!(
        refused_again.get_details_error_info().unwrap().metadata,
        refused.get_details_error_info().unwrap().metadata
    );
    assert_eq!(app.count_events("UserRegistrationFailed").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_request_id_is_an_invalid_argument_and_writes_nothing() {
    let app = CommandApp::spawn().await;
    for bad in ["x".repeat(129), "tab\tinside".to_owned(), "ünicode".to_owned()] {
        let status = app.register(1, &bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason(&status), "INVALID_ARGUMENT");
        assert_eq!(status.get_details_bad_request().unwrap().field_violations[0].field, "request_id");
    }
    assert_eq!(app.total_events().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_lost_database_is_unavailable_with_retry_info_and_a_retry_with_the_same_request_id_succeeds() {
    let (app, proxy) = CommandApp::spawn_behind_proxy().await;
    app.github_knows(7001, "octo-lost", None).await;
    app.github_knows(7002, "octo-back", None).await;
    app.register(7001, "req-before").await.unwrap();

    // The database goes away: every connection is reset, new ones are refused.
    proxy.cut();
    let lost = app.register(7002, "req-during").await.unwrap_err();
    assert_eq!(lost.code(), Code::Unavailable, "a transient database failure is not INTERNAL: {lost:?}");
    assert_eq!(reason(&lost), "STORE_UNAVAILABLE");
    assert!(lost.get_details_retry_info().is_some(), "callers are told to retry");

    proxy.restore();
    let retried = kiroku_testkit::eventually(Duration::from_secs(20), "the retry to succeed", || async {
        Ok(app.register(7002, "req-during").await.ok())
    })
    .await
    .unwrap();
    assert_eq!(app.register(7002, "req-during").await.unwrap().user_id, retried.user_id, "one user, first answer");
    assert_eq!(app.count_events("UserRegistered").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_registered_identity_asking_again_costs_no_github_call_and_is_told_to_wait_when_it_persists() {
    let app = CommandApp::spawn_with(&[("KIROKU_REFUSALS_PER_MINUTE", "3")]).await;
    Mock::given(method("GET"))
        .and(path("/user/8001"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "id": 8001, "login": "once", "name": null })))
        .expect(1)
        .mount(&app.github)
        .await;
    app.register(8001, "").await.unwrap();
    for _ in 0..3 {
        let again = app.register(8001, "").await.unwrap_err();
        assert_eq!((again.code(), reason(&again)), (Code::AlreadyExists, "USER_ALREADY_EXISTS".to_owned()));
    }
    // GitHub was asked once: whose identity it is was known before the call.
    app.github.verify().await;
    assert_eq!(app.count_events("UserRegistrationFailed").await, 3, "each refusal is recorded");

    let limited = app.register(8001, "").await.unwrap_err();
    assert_eq!((limited.code(), reason(&limited)), (Code::ResourceExhausted, "LIMIT_REACHED".to_owned()));
    assert!(limited.get_details_retry_info().is_some_and(|r| r.retry_delay.is_some()), "told when to retry");
    assert_eq!(app.count_events("UserRegistrationFailed").await, 3, "a limited call records nothing");
    app.stop().await;
}

/// The limit used to be checked before an await and counted after it: 60 concurrent calls of one registered
/// subject all passed the check, and wrote 60 audit events with a limit of 10 a minute.
#[tokio::test]
async fn concurrent_calls_of_one_subject_cannot_pass_its_limit_together() {
    let app = CommandApp::spawn_with(&[("KIROKU_REFUSALS_PER_MINUTE", "10")]).await;
    app.github_knows(8101, "crowded", None).await;
    app.register(8101, "").await.unwrap();
    let calls: Vec<_> = (0..60)
        .map(|_| {
            let (mut client, token) = (app.client.clone(), app.token(8101));
            tokio::spawn(async move {
                client.register_user(RegisterUserRequest { auth0_token: token, request_id: String::new() }).await
            })
        })
        .collect();
    let mut answers: HashMap<String, usize> = HashMap::new();
    for call in calls {
        *answers.entry(reason(&call.await.unwrap().unwrap_err())).or_default() += 1;
    }
    assert_eq!(answers.get("USER_ALREADY_EXISTS"), Some(&10), "{answers:?}");
    assert_eq!(answers.get("LIMIT_REACHED"), Some(&50), "{answers:?}");
    assert_eq!(app.count_events("UserRegistrationFailed").await, 10, "no more audit events than the limit");
    app.stop().await;
}

/// Calls to GitHub share one budget (60 an hour without a token): a subject whose registrations keep failing at
/// GitHub, and one that syncs again and again, are limited like refused registrations.
#[tokio::test]
async fn github_failures_and_syncs_count_toward_the_subjects_limit() {
    let app = CommandApp::spawn_with(&[("KIROKU_REFUSALS_PER_MINUTE", "3")]).await;
    Mock::given(method("GET"))
        .and(path("/user/8201"))
        .respond_with(ResponseTemplate::new(502))
        .expect(3)
        .mount(&app.github)
        .await;
    for _ in 0..3 {
        assert_eq!(reason(&app.register(8201, "").await.unwrap_err()), "GITHUB_UNAVAILABLE");
    }
    assert_eq!(reason(&app.register(8201, "").await.unwrap_err()), "LIMIT_REACHED");
    app.github.verify().await;

    app.github_knows(8202, "syncing", None).await;
    app.register(8202, "").await.unwrap();
    let sync = || {
        let mut client = app.client.clone();
        let token = app.token(8202);
        async move {
            client
                .sync_git_hub_profile(kiroku::v1::SyncGitHubProfileRequest {
                    auth0_token: token,
                    request_id: String::new(),
                    expected_version: 0,
                })
                .await
        }
    };
    for _ in 0..3 {
        sync().await.unwrap();
    }
    let limited = sync().await.unwrap_err();
    assert_eq!((limited.code(), reason(&limited)), (Code::ResourceExhausted, "LIMIT_REACHED".to_owned()));
    app.stop().await;
}

/// GitHub's rate limit is one budget for every caller (60 an hour without a token): once GitHub says it is spent
/// (`x-ratelimit-remaining: 0`), calls are answered UNAVAILABLE with the time left until its reset, without
/// asking GitHub again.
#[tokio::test]
async fn a_spent_github_rate_limit_is_answered_until_its_reset_without_calling_github() {
    let app = CommandApp::spawn().await;
    let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 120;
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex("^/user/"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", reset.to_string())
                .set_body_json(json!({ "id": 8301, "login": "last-one", "name": null })),
        )
        .expect(1)
        .mount(&app.github)
        .await;
    app.register(8301, "").await.unwrap();
    let spent = app.register(8302, "").await.unwrap_err();
    assert_eq!((spent.code(), reason(&spent)), (Code::Unavailable, "GITHUB_UNAVAILABLE".to_owned()), "{spent:?}");
    let wait = spent.get_details_retry_info().and_then(|r| r.retry_delay).unwrap();
    assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120), "until the reset: {wait:?}");
    app.github.verify().await;
    app.stop().await;
}

/// A start-up hashes the claims an older kiroku wrote in clear. One whose keyed hash is held already (the identity
/// registered twice, by versions on either side of keyed hashes) used to fail the start-up on a unique violation,
/// at every restart; it is left as it is (and logged with its two owners), and the rest is hashed.
#[tokio::test]
async fn a_start_up_that_meets_a_clear_claim_whose_hash_is_held_goes_on_and_hashes_the_rest() {
    let app = CommandApp::spawn().await;
    app.github_knows(81, "twice", None).await;
    app.github_knows(82, "once", None).await;
    let hashed = app.register(81, "").await.unwrap();
    let (twice, once) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    // As an older kiroku left them, without the trigger that now refuses claims in clear.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica; \
         INSERT INTO claims (kind, value, owner_id) VALUES ('github_id', '81', '{twice}'), \
         ('github_id', '82', '{once}'), ('auth0_subject', 'github|82', '{once}'); \
         RESET session_replication_role;"
    )))
    .execute(&app.db.pool)
    .await
    .unwrap();

    let (running, mut commands) = app.start_command().await;
    let clear: Vec<String> = sqlx::query_scalar("SELECT value FROM claims WHERE left(value, 3) <> 'h1~' ORDER BY 1")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(clear, ["81"], "the duplicate stays; the rest is hashed");
    // The identities stay taken, by their owners.
    for (github_id, owner) in [(81, hashed.user_id.clone()), (82, once.to_string())] {
        let refused = commands
            .register_user(RegisterUserRequest { auth0_token: app.token(github_id), request_id: String::new() })
            .await
            .unwrap_err();
        assert_eq!(reason(&refused), "USER_ALREADY_EXISTS", "{refused:?}");
        assert_eq!(refused.get_details_error_info().unwrap().metadata["user_id"], owner);
    }
    running.stop().await;
    app.stop().await;
}
