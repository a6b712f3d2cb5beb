//! The read side end to end: projector and QueryService over real PostgreSQL and Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{CommandApp, reason};
use fred::prelude::*;
use kiroku::v1::{
    GetUserHistoryRequest, GetUserRequest, ListRegistrationFailuresRequest, ListUsersRequest, LookupUserRequest,
    SyncGitHubProfileRequest, UserStatus, lookup_user_request,
};
use kiroku_testkit::{ServiceProcess, binary_path, eventually};
use serde_json::json;
use tonic::Code;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

async fn register_many(app: &CommandApp, first: u64, count: u64) -> Vec<String> {
    for id in first..first + count {
        app.github_knows(id, &format!("user{id}"), None).await;
    }
    let mut ids = Vec::new();
    for chunk in (first..first + count).collect::<Vec<_>>().chunks(8) {
        let results = futures::future::join_all(chunk.iter().map(|id| app.register(*id, ""))).await;
        ids.extend(results.into_iter().map(|r| r.unwrap().user_id));
    }
    ids
}

#[tokio::test]
async fn a_registered_user_is_readable_at_once_with_min_position_and_by_every_key() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, mut client) = app.start_query(&[]).await;
    app.github_knows(583231, "Octocat", Some("The Octocat")).await;
    let registered = app.register(583231, "").await.unwrap();

    let user = client
        .get_user(GetUserRequest { user_id: registered.user_id.clone(), min_position: registered.position })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.user_id, registered.user_id);
    assert_eq!((user.auth0_id.as_str(), user.github_id.as_str()), ("github|583231", "583231"));
    assert_eq!((user.github_username.as_str(), user.display_name.as_str()), ("Octocat", "The Octocat"));
    assert_eq!(user.status, UserStatus::Active as i32);
    assert_eq!(user.version, 1);
    assert!(user.created_at.is_some() && user.updated_at.is_some());

    for key in [
        lookup_user_request::Key::Auth0Id("github|583231".into()),
        lookup_user_request::Key::GithubId("583231".into()),
        lookup_user_request::Key::GithubUsername("octocat".into()),
    ] {
        let found = client.lookup_user(LookupUserRequest { key: Some(key.clone()) }).await.unwrap().into_inner();
        assert_eq!(found.user.unwrap().user_id, registered.user_id, "{key:?}");
    }
    let missing = client
        .lookup_user(LookupUserRequest { key: Some(lookup_user_request::Key::GithubId("1".into())) })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(client.lookup_user(LookupUserRequest { key: None }).await.unwrap_err().code(), Code::InvalidArgument);

    // Ids: malformed → INVALID_ARGUMENT, well-formed but unknown → NOT_FOUND.
    let bad = client.get_user(GetUserRequest { user_id: "nope".into(), min_position: 0 }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let unknown = client
        .get_user(GetUserRequest { user_id: uuid::Uuid::new_v4().to_string(), min_position: 0 })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // History comes from the event store.
    let history = client
        .get_user_history(GetUserHistoryRequest {
            user_id: registered.user_id.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.events.len(), 1);
    let event = &history.events[0];
    assert_eq!((event.event_type.as_str(), event.version, event.position), ("UserRegistered", 1, registered.position));
    let data = event.data.as_ref().unwrap();
    let Some(prost_types::value::Kind::StructValue(personal)) =
        data.fields.get("personal").and_then(|v| v.kind.as_ref())
    else {
        panic!("{data:?}")
    };
    assert!(personal.fields.contains_key("auth0_id") && !data.fields.contains_key("sealed"), "{data:?}");
    assert!(event.metadata.as_ref().unwrap().fields.contains_key("correlation_id"));

    // The projector answers health probes (compose runs `kiroku health` against it).
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", projector.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let serving = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn without_min_position_a_user_appears_eventually_and_a_far_position_is_projection_behind() {
    let app = CommandApp::spawn().await;
    let (query, mut client) = app.start_query(&[]).await;
    app.github_knows(5, "five", None).await;
    let registered = app.register(5, "").await.unwrap();

    // No projector yet: the read model cannot reach the position within the caller's deadline.
    let mut request =
        tonic::Request::new(GetUserRequest { user_id: registered.user_id.clone(), min_position: registered.position });
    request.set_timeout(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let behind = client.get_user(request).await.unwrap_err();
    assert_eq!(behind.code(), Code::Unavailable, "{behind:?}");
    assert_eq!(reason(&behind), "PROJECTION_BEHIND");
    assert!(started.elapsed() < Duration::from_secs(3), "answered before the caller's deadline");

    let projector = app.start_projector(&[]).await;
    let user = eventually(Duration::from_secs(20), "the user in the read model", || {
        let mut client = client.clone();
        let user_id = registered.user_id.clone();
        async move {
            match client.get_user(GetUserRequest { user_id, min_position: 0 }).await {
                Ok(response) => Ok(response.into_inner().user),
                Err(status) if status.code() == Code::NotFound => Ok(None),
                Err(status) => Err(status.into()),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(user.github_username, "five");
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn list_users_pages_cover_every_user_once_in_a_stable_order_and_filters_apply() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, mut client) = app.start_query(&[]).await;
    let mut ids = register_many(&app, 1000, 240).await;
    for id in 5000..5010u64 {
        app.github_knows(id, &format!("octo{id}"), None).await;
        ids.push(app.register(id, "").await.unwrap().user_id);
    }
    app.wait_for_users(250).await;
    // Registration order is log order: the positions of the UserRegistered events (ids are made before the
    // GitHub call, so they need not follow it).
    let expected: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id::text FROM events WHERE event_type = 'UserRegistered' ORDER BY position",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let mut sorted = ids.clone();
    sorted.sort();
    let mut registered = expected.clone();
    registered.sort();
    assert_eq!(registered, sorted);

    for page_size in [1, 7, 100] {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_users(ListUsersRequest { page_size, page_token: token.clone(), filter: String::new() })
                .await
                .unwrap()
                .into_inner();
            assert!(page.users.len() <= page_size as usize);
            seen.extend(page.users.into_iter().map(|u| u.user_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, expected, "page size {page_size}: every user once, in registration order");
    }

    let filter = r#"status = "active" AND github_username = "octo*""#.to_owned();
    let page = client
        .list_users(ListUsersRequest { page_size: 0, page_token: String::new(), filter: filter.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.users.len(), 10);
    assert!(page.users.iter().all(|u| u.github_username.starts_with("octo")));
    let first = client
        .list_users(ListUsersRequest { page_size: 3, page_token: String::new(), filter: filter.clone() })
        .await
        .unwrap()
        .into_inner();
    let reused = client
        .list_users(ListUsersRequest { page_size: 3, page_token: first.next_page_token, filter: String::new() })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument, "a token reused with another filter");
    let bad = client
        .list_users(ListUsersRequest { page_size: 3, page_token: String::new(), filter: "name = \"x\"".into() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(reason(&bad), "INVALID_ARGUMENT");
    let all = client
        .list_users(ListUsersRequest { page_size: 5000, page_token: String::new(), filter: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.users.len(), 250, "page_size above 1000 is clamped, not refused");

    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn two_projectors_in_one_group_apply_every_users_events_in_version_order() {
    let app = CommandApp::spawn().await;
    let first = app.start_projector(&[("KIROKU_PROJECTOR_CONSUMER", "one")]).await;
    let second = app.start_projector(&[("KIROKU_PROJECTOR_CONSUMER", "two")]).await;
    let users = 30u64;
    register_many(&app, 100, users).await;
    for round in 1..=3 {
        app.github.reset().await;
        for id in 100..100 + users {
            Mock::given(method("GET"))
                .and(path(format!("/user/{id}")))
                .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                    "id": id, "login": format!("user{id}-round{round}"), "name": null, "avatar_url": null,
                })))
                .mount(&app.github)
                .await;
        }
        let syncs = (100..100 + users).map(|id| {
            let mut client = app.client.clone();
            let token = app.token(id);
            async move {
                client
                    .sync_git_hub_profile(SyncGitHubProfileRequest {
                        auth0_token: token,
                        request_id: String::new(),
                        expected_version: 0,
                    })
                    .await
                    .unwrap()
            }
        });
        futures::future::join_all(syncs).await;
    }
    eventually(Duration::from_secs(60), "every user at version 4", || async {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM users_read WHERE version = 4").fetch_one(&app.db.pool).await?;
        Ok((done == users as i64).then_some(()))
    })
    .await
    .unwrap();
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT github_username, version FROM users_read ORDER BY github_username")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), users as usize, "no user missing or doubled");
    assert!(rows.iter().all(|(login, version)| login.ends_with("-round3") && *version == 4), "{rows:?}");
    first.stop().await;
    second.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_projector_killed_mid_batch_and_restarted_leaves_every_user_present_once() {
    let app = CommandApp::spawn().await;
    let mut crashing = ServiceProcess::spawn(
        "kiroku-projector",
        &app.projector_process_env(&[("KIROKU_FAILPOINT", "projector.before_commit:2")]),
    )
    .unwrap();
    register_many(&app, 1, 20).await;
    let status = tokio::time::timeout(Duration::from_secs(30), crashing.child.wait()).await.unwrap().unwrap();
    assert!(!status.success(), "killed by the fail point");
    // It died holding an applied but uncommitted batch: the read model is behind the log.
    let behind: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE position > (SELECT c.position FROM projections p \
         JOIN projection_checkpoints c ON c.projection = p.name AND c.generation = p.active_generation)",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(behind > 0, "the killed batch was not committed");
    register_many(&app, 21, 20).await;

    let _projector = ServiceProcess::spawn(
        "kiroku-projector",
        &app.projector_process_env(&[("KIROKU_PROJECTOR_CLAIM_IDLE_MS", "500")]),
    )
    .unwrap();
    app.wait_for_users(40).await;
    let (count, distinct): (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT github_id) FROM users_read")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!((count, distinct), (40, 40));
    // What the dead process had read but not acknowledged is taken over (XAUTOCLAIM) and acknowledged.
    let stream = app.redis.events_stream();
    eventually(Duration::from_secs(30), "no entry left pending", || async {
        let groups: Vec<std::collections::HashMap<String, fred::types::Value>> =
            app.redis.client.xinfo_groups(&stream).await?;
        let pending = groups.first().and_then(|g| g.get("pending").and_then(fred::types::Value::as_u64));
        Ok((pending == Some(0)).then_some(()))
    })
    .await
    .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn the_projector_recovers_from_the_store_when_redis_is_flushed() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    register_many(&app, 1, 10).await;
    app.wait_for_users(10).await;

    // Redis comes back empty: stream and consumer group are gone.
    let _: () = app.redis.client.custom(fred::cmd!("FLUSHDB"), Vec::<String>::new()).await.unwrap();
    register_many(&app, 11, 10).await;
    app.wait_for_users(20).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users_read").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 20);
    // The consumer group was re-created and everything delivered since has been acknowledged.
    let stream = app.redis.events_stream();
    eventually(Duration::from_secs(20), "the re-created group to have nothing pending", || async {
        // Until the relay's next publish re-creates the stream, XINFO answers "no such key": not yet.
        let groups: Vec<std::collections::HashMap<String, fred::types::Value>> =
            app.redis.client.xinfo_groups(&stream).await.unwrap_or_default();
        let users =
            groups.iter().find(|g| g.get("name").and_then(fred::types::Value::as_string).as_deref() == Some("users"));
        Ok(users.and_then(|g| g.get("pending").and_then(fred::types::Value::as_u64)).filter(|p| *p == 0).map(|_| ()))
    })
    .await
    .unwrap();
    let entries: Vec<(String, std::collections::HashMap<String, String>)> =
        app.redis.client.xrange(&stream, "-", "+", None).await.unwrap();
    assert_eq!(entries.len(), 10, "the new entries reached the re-created group");
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_the_rest_proceeds_and_the_cli_replays_it() {
    let app = CommandApp::spawn().await;
    // A read-model row that should not be there blocks user 777's row (its auth0_id is taken).
    sqlx::query(
        "INSERT INTO users_read_rows (generation, id, auth0_id, github_id, github_username, display_name, status, \
         created_at, updated_at, version, position, registered_position) \
         VALUES (1, gen_random_uuid(), 'github|777', 'x', 'x', 'x', 'active', now(), now(), 1, 0, 0)",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let projector = app.start_projector(&[("KIROKU_PROJECTOR_MAX_ATTEMPTS", "2")]).await;
    app.github_knows(777, "poisoned", None).await;
    let poisoned = app.register(777, "").await.unwrap();
    register_many(&app, 1, 5).await;
    app.wait_for_users(6).await; // five real users and the stray row

    let dead_key = app.redis.dead_letters_stream();
    let dead: Vec<(String, std::collections::HashMap<String, String>)> =
        eventually(Duration::from_secs(20), "a dead letter", || async {
            let entries: Vec<(String, std::collections::HashMap<String, String>)> =
                app.redis.client.xrange(&dead_key, "-", "+", None).await?;
            Ok((!entries.is_empty()).then_some(entries))
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["position"], poisoned.position.to_string());
    assert!(dead[0].1["error"].contains("users_read_rows_auth0_key"), "{:?}", dead[0].1);

    let env = app.projector_process_env(&[]);
    let cli = |args: &'static [&'static str]| {
        let env = env.clone();
        async move {
            let output = tokio::process::Command::new(binary_path("kiroku"))
                .args(args)
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let listed = cli(&["projector", "dead-letters", "list"]).await;
    assert!(listed.contains(&format!("\"position\":{}", poisoned.position)), "{listed}");

    // The operator removes the stray row and replays.
    sqlx::query("DELETE FROM users_read_rows WHERE github_id = 'x'").execute(&app.db.pool).await.unwrap();
    let replayed = cli(&["projector", "dead-letters", "replay"]).await;
    assert!(replayed.contains("\"replayed\":1"), "{replayed}");
    let login: String = sqlx::query_scalar("SELECT github_username FROM users_read WHERE id = $1::uuid")
        .bind(&poisoned.user_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(login, "poisoned");
    let left: Vec<(String, std::collections::HashMap<String, String>)> =
        app.redis.client.xrange(&dead_key, "-", "+", None).await.unwrap();
    assert!(left.is_empty());
    assert!(cli(&["projector", "dead-letters", "list"]).await.trim().is_empty());
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_rebuild_yields_identical_users_read_while_queries_keep_answering() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, client) = app.start_query(&[]).await;
    let ids = register_many(&app, 1, 60).await;
    app.register(1, "").await.unwrap_err(); // a refusal, for the failures read model
    app.wait_for_users(60).await;
    eventually(Duration::from_secs(20), "the projection to catch up", || async {
        let failures: i64 =
            sqlx::query_scalar("SELECT count(*) FROM registration_failures_read").fetch_one(&app.db.pool).await?;
        Ok((failures == 1).then_some(()))
    })
    .await
    .unwrap();
    let before = app.users_read().await;

    // Queries go on while the rebuild runs; every one of them must succeed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, mut client, ids) = (stop.clone(), client.clone(), ids.clone());
        tokio::spawn(async move {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = ids[answered % ids.len()].clone();
                client.get_user(GetUserRequest { user_id: id, min_position: 0 }).await.unwrap();
                let page = client
                    .list_users(ListUsersRequest { page_size: 100, page_token: String::new(), filter: String::new() })
                    .await
                    .unwrap();
                assert_eq!(page.into_inner().users.len(), 60);
                answered += 1;
            }
            answered
        })
    };
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);

    assert_eq!(app.users_read().await, before, "identical content after the flip");
    let generations: Vec<i32> =
        sqlx::query_scalar("SELECT DISTINCT generation FROM users_read_rows").fetch_all(&app.db.pool).await.unwrap();
    assert_eq!(generations, [2], "the old generation is cleaned up");
    let mut client = client;
    let failures = client
        .list_registration_failures(ListRegistrationFailuresRequest { page_size: 10, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failures.failures.len(), 1);
    assert_eq!(failures.failures[0].reason, "DUPLICATE_AUTH0_ID");

    // The live projector carries on in the new generation.
    app.github_knows(999, "after-rebuild", None).await;
    let late = app.register(999, "").await.unwrap();
    let user = client
        .get_user(GetUserRequest { user_id: late.user_id, min_position: late.position })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.github_username, "after-rebuild");
    let seen: HashSet<String> = app.users_read().await.iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(seen.len(), 61);
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

/// GitHub recycles logins: a user renames away from one, another account takes it and registers while the first
/// user's row still shows it (they have not synced). LookupUser by login used to answer whichever row came first;
/// it answers the user who took the login last, and nobody once no user holds it.
#[tokio::test]
async fn a_recycled_login_finds_the_user_who_holds_it_now_and_nobody_once_it_is_gone() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, client) = app.start_query(&[]).await;
    let profile = |id: u64, login: &str, priority: u8| {
        Mock::given(method("GET"))
            .and(path(format!("/user/{id}")))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("ETag", format!("\"{login}\""))
                    .set_body_json(json!({ "id": id, "login": login, "name": null, "avatar_url": null })),
            )
            .with_priority(priority)
    };
    let sync = |github_id: u64| {
        let (mut commands, token) = (app.client.clone(), app.token(github_id));
        async move {
            let request =
                SyncGitHubProfileRequest { auth0_token: token, request_id: String::new(), expected_version: 0 };
            commands.sync_git_hub_profile(request).await.unwrap().into_inner()
        }
    };
    let by_login = |login: &str| {
        let (mut client, login) = (client.clone(), login.to_owned());
        async move {
            let key = Some(lookup_user_request::Key::GithubUsername(login));
            client.lookup_user(LookupUserRequest { key }).await.map(|r| r.into_inner().user.unwrap().user_id)
        }
    };
    // Ids in this order: the later registration gets the smaller id, so that neither id order nor insertion order
    // could pass for "who took the login last".
    profile(9001, "Recycled", 5).mount(&app.github).await;
    let first = app.register(9001, "").await.unwrap();
    // The first account renames on GitHub (kiroku does not know yet); another takes the login and registers.
    profile(9001, "first-renamed", 1).mount(&app.github).await;
    profile(9002, "recycled", 5).mount(&app.github).await;
    let second = app.register(9002, "").await.unwrap();
    common::get_user(&client, &second.user_id, second.position).await;
    for asked in ["recycled", "RECYCLED", "Recycled"] {
        assert_eq!(by_login(asked).await.unwrap(), second.user_id, "{asked}");
    }
    // The first user syncs: still the second holds it.
    let synced = sync(9001).await;
    common::get_user(&client, &first.user_id, synced.position).await;
    assert_eq!(by_login("recycled").await.unwrap(), second.user_id);
    assert_eq!(by_login("first-renamed").await.unwrap(), first.user_id);
    // The second renames too: nobody holds it now.
    profile(9002, "second-renamed", 1).mount(&app.github).await;
    let synced = sync(9002).await;
    common::get_user(&client, &second.user_id, synced.position).await;
    assert_eq!(by_login("recycled").await.unwrap_err().code(), Code::NotFound);
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

/// GitHub logins are case-insensitive: LookupUser by login and ListUsers' filter on it compare them the same way
/// (PostgreSQL's `lower` on both sides; the filter used Rust's lower-casing, which differs from a database's for
/// letters outside ASCII).
#[tokio::test]
async fn lookup_by_login_and_the_login_filter_agree_on_case() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(9101, "OctoCat", None).await;
    app.github_knows(9102, "ÄrgerLich", None).await;
    // Rust lower-cases a word's last Σ to ς; PostgreSQL's `lower` (character by character) to σ.
    app.github_knows(9103, "ΟΔΟΣ", None).await;
    app.register(9101, "").await.unwrap();
    app.register(9102, "").await.unwrap();
    let last = app.register(9103, "").await.unwrap();
    common::get_user(&client, &last.user_id, last.position).await;
    for asked in ["octocat", "OCTOCAT", "OctoCat", "ärgerlich", "ÄRGERLICH", "ÄrgerLich", "ΟΔΟΣ", "οδοσ", "οδος"]
    {
        let looked_up = client
            .clone()
            .lookup_user(LookupUserRequest { key: Some(lookup_user_request::Key::GithubUsername(asked.to_owned())) })
            .await
            .ok()
            .map(|r| r.into_inner().user.unwrap().user_id);
        let filter = format!("github_username = \"{asked}\"");
        let listed = client
            .clone()
            .list_users(ListUsersRequest { page_size: 10, page_token: String::new(), filter })
            .await
            .unwrap()
            .into_inner()
            .users;
        assert_eq!(looked_up, listed.first().map(|u| u.user_id.clone()), "{asked}: lookup and filter disagree");
        assert!(listed.len() <= 1, "{asked}");
    }
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_history_page_token_of_an_id_that_is_no_users_is_not_found() {
    use base64::Engine;
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(9201, "paged", None).await;
    let user = app.register(9201, "").await.unwrap();
    let history = |user_id: String, page_token: String| {
        let mut client = client.clone();
        async move { client.get_user_history(GetUserHistoryRequest { user_id, page_size: 1, page_token }).await }
    };
    // Tokens are the client's to send; one for an unknown id is as unknown as its first page.
    let nobody = uuid::Uuid::new_v4().to_string();
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!({ "k": "history", "f": nobody, "a": 1 })).unwrap());
    let refused = history(nobody.clone(), forged).await.unwrap_err();
    assert_eq!((refused.code(), reason(&refused).as_str()), (Code::NotFound, "NOT_FOUND"), "{refused:?}");
    // A user's page past their last event is an empty page.
    let past = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!({ "k": "history", "f": user.user_id, "a": 5 })).unwrap());
    let page = history(user.user_id.clone(), past).await.unwrap().into_inner();
    assert!(page.events.is_empty() && page.next_page_token.is_empty());
    query.stop().await;
    app.stop().await;
}
