//! Rebuilds of the read models that finish where they should: a poison event ends nothing early, dead letters
//! reach Redis and go with their generation, a rebuild that lost its lock never flips, a flip under concurrent
//! appends with a parked user ends equal to a fresh rebuild, and a killed rebuild's generation keeps nobody's data.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::CommandApp;
use common::direct::{cli, refuse_rows, register_as, rename};
use fred::prelude::*;
use kiroku::v1::{EraseUserRequest, UserStatus};
use kiroku_event_store::{EventStore, Position};
use kiroku_projector::Projection;
use kiroku_projector::rebuild::{Rebuilt, rebuild};
use kiroku_testkit::{binary_path, eventually};
use uuid::Uuid;

fn projection(app: &CommandApp, max_attempts: u32) -> Projection {
    let master = kiroku_vault::MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).unwrap();
    Projection::new(app.db.pool.clone(), max_attempts, Arc::new(master))
}

/// Registers `count` users straight into the store (a few at a time), from GitHub id `first`; their ids.
async fn register_many(store: &EventStore, first: u64, count: u64) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(50).zip((first..).step_by(50)) {
        let (chunk, base) = chunk;
        futures::future::join_all(chunk.iter().zip(base..).map(|(id, github_id)| register_as(store, *id, github_id)))
            .await;
    }
    ids
}

/// Waits until everything committed so far is final, so that a rebuild reads the whole log (another test's open
/// transaction may hold the horizon back meanwhile).
async fn wait_final(store: &EventStore) {
    let head = store.head().await.unwrap();
    eventually(Duration::from_secs(30), "the log to be final", || async {
        Ok((store.safe_horizon().await? >= head).then_some(()))
    })
    .await
    .unwrap();
}

/// The dead letters in Redis: (generation, position) of each.
async fn dead_letters_in_redis(app: &CommandApp) -> Vec<(String, u64)> {
    let entries: Vec<(String, HashMap<String, String>)> =
        app.redis.client.xrange(app.redis.dead_letters_stream(), "-", "+", None).await.unwrap();
    entries.into_iter().map(|(_, fields)| (fields["generation"].clone(), fields["position"].parse().unwrap())).collect()
}

async fn active_generation(app: &CommandApp) -> i32 {
    sqlx::query_scalar("SELECT active_generation FROM projections WHERE name = 'users'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

async fn generations(app: &CommandApp) -> Vec<i32> {
    sqlx::query_scalar("SELECT DISTINCT generation FROM users_read_rows ORDER BY 1")
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_poison_event_in_a_rebuild_is_dead_lettered_to_redis_and_the_fill_goes_on_to_the_end_of_the_log() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    // More than one batch of a rebuild (2,000 events), the poison in the first.
    let ids = register_many(&store, 30_000, 2_500).await;
    let poison = ids[10];
    // The new generation refuses the poisoned user's row.
    refuse_rows(&app, "refuse_poison", "INSERT", "NEW.generation = 2 AND NEW.github_username = 'user30010'").await;
    wait_final(&store).await;

    let dead_letters = app.dead_letter_stream().await;
    let rebuilt: Rebuilt = rebuild(&app.db.pool, &projection(&app, 1), &dead_letters).await.unwrap();
    // A failed batch used to report "no more events": the fill ended after it, and the rest of the log was
    // applied inside the flip, which holds the projections row (live steps wait) and an xid.
    assert_eq!(rebuilt.flip_events, 0, "the fill reached the end of the log: {rebuilt:?}");
    assert_eq!(rebuilt.events, 2_499, "everyone but the poisoned user: {rebuilt:?}");
    assert!(rebuilt.batched >= 500, "the batches without a failure went in as multi-row inserts: {rebuilt:?}");
    let poisoned_at: i64 = sqlx::query_scalar("SELECT position FROM events WHERE aggregate_id = $1")
        .bind(poison)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(dead_letters_in_redis(&app).await, [("2".to_owned(), poisoned_at as u64)], "published like a live one");

    // The next rebuild replaces that generation, and its dead letters go with it.
    sqlx::query("DROP TRIGGER refuse_poison ON users_read_rows").execute(&app.db.pool).await.unwrap();
    let again = rebuild(&app.db.pool, &projection(&app, 1), &dead_letters).await.unwrap();
    assert_eq!((again.generation, again.events), (3, 2_500));
    assert_eq!(again.batched, 2_500, "nothing parked: every event went in by a run's insert");
    assert!(dead_letters_in_redis(&app).await.is_empty(), "the replaced generation's dead letters are gone");
    let failures: i64 =
        sqlx::query_scalar("SELECT count(*) FROM projection_failures").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(failures, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_rebuild_that_loses_its_lock_stops_before_it_flips() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    register_many(&store, 40_000, 300).await;
    wait_final(&store).await;
    // The rebuild's first insert waits for a lock the test holds, long enough to lose its own meanwhile.
    sqlx::raw_sql(
        "CREATE FUNCTION wait_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_advisory_lock(4711); PERFORM pg_advisory_unlock(4711); RETURN NEW; END $$; \
         CREATE TRIGGER wait_for_the_test BEFORE INSERT ON users_read_rows FOR EACH ROW \
         WHEN (NEW.generation = 2) EXECUTE FUNCTION wait_for_the_test();",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let mut gate = app.db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4711)").execute(&mut *gate).await.unwrap();

    let dead_letters = app.dead_letter_stream().await;
    let projection = projection(&app, 5);
    let pool = app.db.pool.clone();
    let rebuilding = tokio::spawn(async move { rebuild(&pool, &projection, &dead_letters).await });
    eventually(Duration::from_secs(20), "the rebuild's insert to wait", || async {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = 4711 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        .fetch_one(&app.db.pool)
        .await?;
        Ok(waiting.then_some(()))
    })
    .await
    .unwrap();
    // The connection that holds the rebuild's leader lock dies: another rebuild could take over now.
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l, (SELECT hashtextextended('rebuild:users', 0) AS h) k \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND l.classid::bigint = (k.h >> 32) & 4294967295 AND l.objid::bigint = k.h & 4294967295",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(terminated, [true], "the rebuild's lock was found");
    sqlx::query("SELECT pg_advisory_unlock(4711)").execute(&mut *gate).await.unwrap();

    let outcome = rebuilding.await.unwrap();
    let error = outcome.expect_err("a rebuild without its lock must not flip");
    assert!(format!("{error:#}").contains("lost its lock"), "{error:#}");
    assert_eq!(active_generation(&app).await, 1, "no flip");
    app.stop().await;
}

#[tokio::test]
async fn a_rebuild_under_concurrent_appends_with_a_parked_user_flips_to_what_a_fresh_rebuild_gives() {
    let app = CommandApp::spawn().await;
    let store = EventStore::new(app.db.pool.clone());
    // A user whose first rename no generation of the read model takes: dead-lettered, the next one parked.
    refuse_rows(&app, "refuse_rename", "UPDATE", "NEW.github_username = 'poisoned'").await;
    let parked = Uuid::now_v7();
    register_as(&store, parked, 50_000).await;
    rename(&store, parked, 1, "poisoned").await;
    rename(&store, parked, 2, "parked").await;
    // Three batches of a rebuild, two hand-offs of its read-ahead.
    register_many(&store, 50_001, 4_500).await;
    let projector = app.start_projector(&[("KIROKU_PROJECTOR_MAX_ATTEMPTS", "1")]).await;
    app.wait_for_users(4_501).await;

    // Writers go on appending while the rebuild fills and flips.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (store, writing) = (store.clone(), writing.clone());
        tokio::spawn(async move {
            let mut github_id = 60_000;
            let mut written = 0;
            while writing.load(Ordering::Relaxed) {
                register_many(&store, github_id, 20).await;
                github_id += 20;
                written += 20;
            }
            written
        })
    };
    let dead_letters = app.dead_letter_stream().await;
    let rebuilt = rebuild(&app.db.pool, &projection(&app, 1), &dead_letters).await.unwrap();
    writing.store(false, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 0, "appends ran during the rebuild");
    assert!(rebuilt.batched > 0 && rebuilt.events > 4_500, "{rebuilt:?}");
    assert_eq!(active_generation(&app).await, 2);

    // The live projector goes on in the new generation; the parked user stays parked there.
    app.wait_for_users(4_501 + written).await;
    wait_final(&store).await;
    let head = store.head().await.unwrap();
    eventually(Duration::from_secs(30), "the projection at the head", || async {
        let checkpoint: Position = sqlx::query_scalar(
            "SELECT c.position FROM projections p JOIN projection_checkpoints c \
             ON c.projection = p.name AND c.generation = p.active_generation",
        )
        .fetch_one(&app.db.pool)
        .await?;
        Ok((checkpoint >= head).then_some(()))
    })
    .await
    .unwrap();
    let states: Vec<String> = sqlx::query_scalar(
        "SELECT state FROM projection_failures WHERE generation = 2 AND aggregate_id = $1 ORDER BY position",
    )
    .bind(parked)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(states, ["dead", "parked"]);
    let live = app.users_read().await;
    projector.stop().await;
    let fresh = rebuild(&app.db.pool, &projection(&app, 1), &dead_letters).await.unwrap();
    assert_eq!(fresh.generation, 3);
    let rebuilt_again = app.users_read().await;
    assert_eq!(live.len(), rebuilt_again.len());
    assert!(live == rebuilt_again, "the flipped generation, kept live, equals a fresh rebuild row for row");
    app.stop().await;
}

#[tokio::test]
async fn an_erasure_scrubs_the_generation_a_killed_rebuild_left_and_the_next_projector_drops_it() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    let projector = app.start_projector(&[]).await;
    app.github_knows(71, "copied", Some("Copied Person")).await;
    app.github_knows(72, "other", None).await;
    let user = app.register(71, "").await.unwrap();
    app.register(71, "").await.unwrap_err(); // a refused attempt, which names the user
    app.register(72, "").await.unwrap();
    app.wait_for_users(2).await;

    // A rebuild dies after its first step: its generation holds a copy of everyone.
    let mut env = app.projector_process_env(&[]);
    env.push(("KIROKU_FAILPOINT", "rebuild.after_step:1".to_owned()));
    let output = tokio::process::Command::new(binary_path("kiroku"))
        .args(["projector", "rebuild"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success(), "the fail point killed it: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(generations(&app).await, [1, 2], "the killed rebuild left its generation");
    let copied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM users_read_rows WHERE generation = 2 AND id = $1::uuid AND github_username = 'copied'",
    )
    .bind(&user.user_id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(copied, 1, "the rebuild had copied the user");

    let erased = app
        .client
        .clone()
        .erase_user(EraseUserRequest { user_id: user.user_id.clone(), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let shown = common::get_user(&client, &user.user_id, erased.position).await;
    assert_eq!(shown.status, UserStatus::Erased as i32);
    // No row of any generation holds the person's data: not their row, not their refused attempt's.
    let (rows, attempts): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM users_read_rows WHERE id = $1::uuid AND (auth0_id IS NOT NULL \
                 OR github_id IS NOT NULL OR github_username IS NOT NULL OR display_name IS NOT NULL \
                 OR avatar_url IS NOT NULL)), \
                (SELECT count(*) FROM registration_failures_rows WHERE duplicate_user_id = $1::uuid \
                 AND (auth0_id IS NOT NULL OR github_id IS NOT NULL))",
    )
    .bind(&user.user_id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((rows, attempts), (0, 0), "no generation keeps the person's data");

    // A projector that starts drops the generation that no rebuild owns.
    projector.stop().await;
    let projector = app.start_projector(&[]).await;
    eventually(Duration::from_secs(20), "the abandoned generation dropped", || async {
        Ok((generations(&app).await == [1]).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(cli(&app, &["status"]).await[0]["generation"], 1);
    projector.stop().await;
    query.stop().await;
    app.stop().await;
}
