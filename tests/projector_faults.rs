//! The read side where it used to go quietly wrong: a poison event that stalled its aggregate's later events
//! again and again, users listed by an id order that a later commit could slip behind, a lag report blind to a
//! stalled horizon, and a projector that stopped consuming Redis after a restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::Utc;
use common::CommandApp;
use common::direct::{cli, new_event, refuse_rows, register_as, rename};
use fred::prelude::*;
use kiroku::v1::ListUsersRequest;
use kiroku_domain::{Auth0Subject, GitHubId, GitHubProfile, RegisterUser, User, UserCommand};
use kiroku_event_store::{EventStore, Position};
use kiroku_testkit::eventually;
use sqlx::Connection;
use uuid::Uuid;

async fn login_of(app: &CommandApp, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT github_username FROM users_read WHERE id = $1")
        .bind(id)
        .fetch_optional(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_dead_lettered_event_parks_its_aggregate_and_the_rest_flows_without_stalling() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    // A stray read-model row takes the Auth0 id of user 778: its registration cannot apply.
    sqlx::query(
        "INSERT INTO users_read_rows (generation, id, auth0_id, github_id, github_username, display_name, status, \
         created_at, updated_at, version, position, registered_position) \
         VALUES (1, gen_random_uuid(), 'github|778', 'x', 'x', 'x', 'active', now(), now(), 1, 0, 0)",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let poisoned = Uuid::now_v7();
    register_as(&store, poisoned, 778).await;
    // Its later events need the registration before them.
    rename(&store, poisoned, 1, "renamed-once").await;
    rename(&store, poisoned, 2, "renamed-twice").await;
    let others = [Uuid::now_v7(), Uuid::now_v7()];
    for (n, id) in others.iter().enumerate() {
        register_as(&store, *id, 900 + n as u64).await;
    }
    let projector = app.start_projector(&[("KIROKU_PROJECTOR_MAX_ATTEMPTS", "2")]).await;

    // Everyone else is there, and the poisoned user's later events wait without attempts of their own.
    app.wait_for_users(3).await; // the two others and the stray row
    let rows: Vec<(String, i32)> = eventually(Duration::from_secs(20), "one dead letter and two parked", || async {
        let rows: Vec<(String, i32)> =
            sqlx::query_as("SELECT state, attempts FROM projection_failures WHERE aggregate_id = $1 ORDER BY position")
                .bind(poisoned)
                .fetch_all(&app.db.pool)
                .await?;
        Ok((rows.len() == 3 && rows[0].0 == "dead").then_some(rows))
    })
    .await
    .unwrap();
    assert_eq!(rows, [("dead".to_owned(), 2), ("parked".to_owned(), 0), ("parked".to_owned(), 0)]);
    let status = &cli(&app, &["status"]).await[0];
    assert_eq!((status["dead_letters"].as_u64(), status["parked_events"].as_u64()), (Some(1), Some(2)), "{status}");
    assert_eq!(status["parked_aggregates"].as_u64(), Some(1), "{status}");
    let listed = cli(&app, &["dead-letters", "list"]).await;
    assert_eq!(listed.iter().map(|l| l["state"].as_str().unwrap()).collect::<Vec<_>>(), ["dead", "parked", "parked"]);

    // The operator removes the stray row; the replay applies the aggregate's events in order.
    sqlx::query("DELETE FROM users_read_rows WHERE github_id = 'x'").execute(&app.db.pool).await.unwrap();
    let replayed = &cli(&app, &["dead-letters", "replay"]).await[0];
    assert_eq!(replayed["replayed"], 3, "{replayed}");
    assert_eq!(login_of(&app, poisoned).await.as_deref(), Some("renamed-twice"));
    // Unparked: its next event is applied live.
    rename(&store, poisoned, 3, "renamed-thrice").await;
    eventually(Duration::from_secs(20), "the next rename applied live", || async {
        Ok((login_of(&app, poisoned).await.as_deref() == Some("renamed-thrice")).then_some(()))
    })
    .await
    .unwrap();
    assert!(cli(&app, &["dead-letters", "list"]).await.is_empty());
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_registration_whose_row_is_already_there_leaves_it_and_the_rest_of_its_run_applies() {
    // A run of registrations goes in as one insert that fails on a row already there; the step then applies its
    // events one by one, where a registration already applied changes nothing. Nothing is dead-lettered.
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    for (n, id) in ids.iter().enumerate() {
        register_as(&store, *id, 700 + n as u64).await;
    }
    // The middle user's row, as an earlier apply left it.
    sqlx::query(
        "INSERT INTO users_read_rows (generation, id, auth0_id, github_id, github_username, display_name, status, \
         created_at, updated_at, version, position, registered_position) \
         VALUES (1, $1, 'github|701', '701', 'applied-before', 'x', 'active', now(), now(), 1, 0, 0)",
    )
    .bind(ids[1])
    .execute(&app.db.pool)
    .await
    .unwrap();
    let projector = app.start_projector(&[("KIROKU_PROJECTOR_MAX_ATTEMPTS", "1")]).await;
    app.wait_for_users(3).await;
    assert_eq!(login_of(&app, ids[0]).await.as_deref(), Some("user700"));
    assert_eq!(login_of(&app, ids[1]).await.as_deref(), Some("applied-before"));
    assert_eq!(login_of(&app, ids[2]).await.as_deref(), Some("user702"));
    let status = &cli(&app, &["status"]).await[0];
    assert_eq!(status["dead_letters"].as_u64(), Some(0), "{status}");
    assert_eq!(status["lag_events"].as_u64(), Some(0), "{status}");
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_user_committed_later_with_a_smaller_id_is_not_skipped_by_a_clients_cursor() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    let projector = app.start_projector(&[]).await;
    let (query, mut client) = app.start_query(&[]).await;
    let big = |last: u8| Uuid::from_bytes([0xf0, 0, 0, 0, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, last]);
    register_as(&store, big(1), 9101).await;
    register_as(&store, big(2), 9102).await;
    app.wait_for_users(2).await;

    let first = client
        .list_users(ListUsersRequest { page_size: 1, page_token: String::new(), filter: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.users[0].user_id, big(1).to_string());
    // A registration that made its id early (before a slow GitHub call) commits after the client's first page.
    let small = Uuid::from_bytes([0x01, 0, 0, 0, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 1]);
    register_as(&store, small, 9103).await;
    app.wait_for_users(3).await;

    let mut seen = vec![first.users[0].user_id.clone()];
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = client
            .list_users(ListUsersRequest { page_size: 1, page_token: token, filter: String::new() })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.users.into_iter().map(|u| u.user_id));
        token = page.next_page_token;
    }
    assert_eq!(seen, [big(1).to_string(), big(2).to_string(), small.to_string()], "every user, in log order");
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn the_status_shows_a_horizon_held_back_by_an_open_transaction() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    let projector = app.start_projector(&[]).await;
    register_as(&store, Uuid::now_v7(), 9201).await;
    app.wait_for_users(1).await;

    // A transaction that has taken an id and stays open holds every reader back.
    let mut open = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut open).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut open).await.unwrap();
    for github_id in 9202..9205 {
        register_as(&store, Uuid::now_v7(), github_id).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = &cli(&app, &["status"]).await[0];
    assert!(status["undeliverable_events"].as_u64().unwrap() >= 3, "committed but not deliverable: {status}");
    assert!(status["oldest_transaction_seconds"].as_f64().unwrap() >= 1.0, "{status}");

    sqlx::query("ROLLBACK").execute(&mut open).await.unwrap();
    app.wait_for_users(4).await;
    let status = eventually(Duration::from_secs(20), "nothing left behind the horizon", || async {
        let status = cli(&app, &["status"]).await.remove(0);
        Ok((status["undeliverable_events"] == 0 && status["lag_events"] == 0).then_some(status))
    })
    .await
    .unwrap();
    assert!(status["lag_seconds"].is_null(), "{status}");
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_restarted_projector_with_pending_and_trimmed_entries_goes_on_consuming_from_redis() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    let stream = app.redis.events_stream();
    let projector = app.start_projector(&[]).await;
    for github_id in 9301..9304 {
        register_as(&store, Uuid::now_v7(), github_id).await;
    }
    app.wait_for_users(3).await;
    projector.stop().await;

    // While no projector runs, more is published; a consumer that then vanished reads it (pending under its
    // name), and the stream is trimmed under those pending entries.
    for github_id in 9304..9307 {
        register_as(&store, Uuid::now_v7(), github_id).await;
    }
    eventually(Duration::from_secs(20), "six entries", || async {
        Ok((app.redis.client.xlen::<u64, _>(&stream).await? >= 6).then_some(()))
    })
    .await
    .unwrap();
    let _: fred::types::Value =
        app.redis.client.xreadgroup("users", "vanished", Some(100), None, false, &stream, ">").await.unwrap();
    let _: i64 = app.redis.client.xtrim(&stream, ("MAXLEN", 1)).await.unwrap();

    let projector = app.start_projector(&[("KIROKU_PROJECTOR_CLAIM_IDLE_MS", "100")]).await;
    app.wait_for_users(6).await;
    let before = cli(&app, &["status"]).await.remove(0);

    // From now on, what the relay publishes is consumed from the stream, not read from PostgreSQL.
    for github_id in 9307..9312 {
        register_as(&store, Uuid::now_v7(), github_id).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    app.wait_for_users(11).await;
    let after = cli(&app, &["status"]).await.remove(0);
    let from_stream = after["from_stream"].as_u64().unwrap() - before["from_stream"].as_u64().unwrap();
    assert!(from_stream >= 4, "the last five registrations came through Redis, not PostgreSQL: {before} → {after}");
    // Nothing is left pending, the trimmed entries included.
    eventually(Duration::from_secs(20), "no entry pending", || async {
        let groups: Vec<std::collections::HashMap<String, fred::types::Value>> =
            app.redis.client.xinfo_groups(&stream).await?;
        let pending = groups.first().and_then(|g| g.get("pending").and_then(fred::types::Value::as_u64));
        Ok((pending == Some(0)).then_some(()))
    })
    .await
    .unwrap();
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn one_rebuild_at_a_time_and_no_generation_is_left_behind() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    let projector = app.start_projector(&[]).await;
    for github_id in 20_000..20_600u64 {
        register_as(&store, Uuid::now_v7(), github_id).await;
    }
    app.wait_for_users(600).await;
    // What a rebuild killed between its flip and dropping the old generation leaves behind.
    sqlx::query(
        "INSERT INTO users_read_rows (generation, id, auth0_id, github_id, github_username, display_name, status, \
         created_at, updated_at, version, position, registered_position) \
         VALUES (7, gen_random_uuid(), 'github|1', '1', 'stale', 'stale', 'active', now(), now(), 1, 1, 1)",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();

    let projection = kiroku_projector::Projection::new(
        app.db.pool.clone(),
        5,
        kiroku_vault::MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).map(std::sync::Arc::new).unwrap(),
    );
    let dead_letters = app.dead_letter_stream().await;
    let (first, second) = tokio::join!(
        kiroku_projector::rebuild::rebuild(&app.db.pool, &projection, &dead_letters),
        kiroku_projector::rebuild::rebuild(&app.db.pool, &projection, &dead_letters)
    );
    let refused: Vec<String> =
        [&first, &second].iter().filter_map(|r| r.as_ref().err()).map(|e| e.to_string()).collect();
    assert_eq!(refused.len(), 1, "exactly one of two concurrent rebuilds runs: {first:?} {second:?}");
    assert!(refused[0].contains("another rebuild"), "{}", refused[0]);

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users_read").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 600, "the active generation is whole");
    let generations: Vec<i32> =
        sqlx::query_scalar("SELECT DISTINCT generation FROM users_read_rows").fetch_all(&app.db.pool).await.unwrap();
    let active: i32 = sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = 'users'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(generations, [active], "no other generation's rows are left");
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn get_user_with_a_position_above_the_head_is_out_of_range_at_once() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    let projector = app.start_projector(&[]).await;
    let (query, mut client) = app.start_query(&[]).await;
    let id = Uuid::now_v7();
    let position = register_as(&store, id, 9401).await;

    // Read-your-writes still waits for a position the log has.
    let user = client
        .get_user(kiroku::v1::GetUserRequest { user_id: id.to_string(), min_position: position.get() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.user.unwrap().user_id, id.to_string());

    // One the log will never reach (a typo, a token from another deployment) is refused without waiting.
    let started = std::time::Instant::now();
    let far = client
        .get_user(kiroku::v1::GetUserRequest { user_id: id.to_string(), min_position: position.get() + (1 << 40) })
        .await
        .unwrap_err();
    assert_eq!(far.code(), tonic::Code::OutOfRange, "{far:?}");
    assert_eq!(common::reason(&far), "POSITION_OUT_OF_RANGE");
    assert!(started.elapsed() < Duration::from_secs(2), "answered at once, not after a 10 s wait");
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_forged_stream_entry_creates_no_user_and_skips_nothing() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    let projector = app.start_projector(&[]).await;
    let first = register_as(&store, Uuid::now_v7(), 9501).await;
    app.wait_for_users(1).await;

    // Someone with write access to Redis adds an entry that continues the chain: a user that never registered,
    // at a position far ahead of the log.
    let forged_user = Uuid::now_v7();
    let subject: Auth0Subject = "github|9666".parse().unwrap();
    let profile =
        GitHubProfile { id: GitHubId::new(9666), login: "forged".to_owned(), name: None, avatar_url: None, etag: None };
    let command = UserCommand::Register(RegisterUser { subject, profile, now: Utc::now() });
    let mut event = new_event(&User::decide(None, &command).unwrap()[0]);
    event.occurred_at = Utc::now();
    let forged = kiroku_relay::stream::Entry {
        prev_position: first,
        event: kiroku_event_store::RecordedEvent {
            position: Position::new(first.get() + (1 << 30)),
            event_id: ulid::Ulid::new(),
            aggregate_id: forged_user,
            aggregate_type: "User".to_owned(),
            event_type: event.event_type.clone(),
            version: kiroku_event_store::Version::from(1u16),
            data: event.data.clone(),
            metadata: serde_json::to_value(&event.metadata).unwrap(),
            occurred_at: event.occurred_at,
            created_at: event.occurred_at,
        },
    };
    let fields: Vec<(&str, String)> = forged.encode().unwrap().to_vec();
    let _: String = app.redis.client.xadd(app.redis.events_stream(), false, None, forged.id(), fields).await.unwrap();

    // Real registrations after it still arrive, and the forged user never does.
    for github_id in 9502..9505 {
        register_as(&store, Uuid::now_v7(), github_id).await;
    }
    app.wait_for_users(4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(login_of(&app, forged_user).await, None, "a forged entry creates no user");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users_read").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 4);
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn an_erasure_applies_to_a_user_parked_behind_a_dead_letter_and_a_replay_brings_nothing_back() {
    use kiroku::v1::{
        DeactivateUserRequest, EraseUserRequest, GetUserRequest, LookupUserRequest, UserStatus, lookup_user_request,
    };
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    let projector = app.start_projector(&[("KIROKU_PROJECTOR_MAX_ATTEMPTS", "1")]).await;
    app.github_knows(31, "parked", Some("Parked Person")).await;
    let user = app.register(31, "").await.unwrap();
    app.register(31, "").await.unwrap_err(); // a refused attempt, which names the user
    common::get_user(&client, &user.user_id, user.position).await;

    // The read model refuses the user's deactivation: it is dead-lettered, and the user parked behind it.
    refuse_rows(&app, "refuse_deactivation", "UPDATE", "NEW.status = 'deactivated'").await;
    let mut commands = app.client.clone();
    commands
        .deactivate_user(DeactivateUserRequest {
            user_id: user.user_id.clone(),
            reason: "asked".to_owned(),
            request_id: String::new(),
            expected_version: 0,
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the deactivation dead-lettered", || async {
        let dead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection_failures WHERE aggregate_id = $1::uuid AND state = 'dead'",
        )
        .bind(&user.user_id)
        .fetch_one(&app.db.pool)
        .await?;
        Ok((dead == 1).then_some(()))
    })
    .await
    .unwrap();

    // The erasure applies anyway, and the person's data is gone from every read.
    let erased = commands
        .erase_user(EraseUserRequest { user_id: user.user_id.clone(), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let assert_erased = |shown: kiroku::v1::User| {
        assert_eq!(shown.status, UserStatus::Erased as i32, "{shown:?}");
        assert!(shown.erased, "{shown:?}");
        let personal =
            [&shown.auth0_id, &shown.github_id, &shown.github_username, &shown.display_name, &shown.avatar_url];
        assert!(personal.iter().all(|field| field.is_empty()), "no personal field: {shown:?}");
    };
    assert_erased(common::get_user(&client, &user.user_id, erased.position).await);
    let lookup = client
        .clone()
        .lookup_user(LookupUserRequest { key: Some(lookup_user_request::Key::GithubId("31".to_owned())) })
        .await
        .unwrap_err();
    assert_eq!(lookup.code(), tonic::Code::NotFound, "{lookup:?}");
    let listed = client
        .clone()
        .list_users(ListUsersRequest { page_size: 10, page_token: String::new(), filter: String::new() })
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(listed.len(), 1);
    assert_erased(listed[0].clone());
    let attempts: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT auth0_id, github_id FROM registration_failures_read")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, [(None, None)], "the refused attempt keeps no identity");

    // The operator fixes the cause and replays the dead letter: its event opens as erased, and brings nothing back.
    sqlx::query("DROP TRIGGER refuse_deactivation ON users_read_rows").execute(&app.db.pool).await.unwrap();
    let replayed = &cli(&app, &["dead-letters", "replay"]).await[0];
    assert_eq!(replayed["still_failing"], 0, "{replayed}");
    assert!(cli(&app, &["dead-letters", "list"]).await.is_empty());
    let after = client
        .clone()
        .get_user(GetUserRequest { user_id: user.user_id.clone(), min_position: erased.position })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_erased(after);
    query.stop().await;
    projector.stop().await;
    app.stop().await;
}
