//! Projection lag (commit → visible in `users_read`) at a steady registration load, and rebuild throughput.
//!
//! `cargo bench --bench read_side` (release). Prints one JSON document. The write path is the event store's
//! append with the registration's claims (what RegisterUser commits), the relay and the projector run
//! in-process, over real PostgreSQL and Redis.
//! `BENCH_RATE` registrations per second (default 200), `BENCH_SECONDS` (default 10),
//! `BENCH_REBUILD_EVENTS` extra events before the rebuild (default 20000). Events are sealed as RegisterUser seals
//! them. The rebuild's baseline, in the same run: the same rows inserted raw through the same client.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use fred::prelude::*;
use fred::types::streams::XReadResponse;
use kiroku_event_store::{AppendOutcome, EventStore};
use kiroku_platform::Shutdown;
use kiroku_testkit::{TestDb, TestRedis, percentile};
use kiroku_vault::{MasterKeys, Vault};
use serde_json::json;

#[tokio::main]
async fn main() {
    let rate: u64 = std::env::var("BENCH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let rebuild_events: u64 = std::env::var("BENCH_REBUILD_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    // The services' own log lines, on stderr, when asked for (what a slow figure needs explained).
    let _telemetry = std::env::var_os("RUST_LOG")
        .is_some()
        .then(|| kiroku_platform::init_tracing(&kiroku_platform::config::Environment));
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let master = Arc::new(MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).unwrap());
    let vault = Vault::new(store.clone(), master.clone());
    let (trigger, shutdown) = Shutdown::new();

    let relay_redis = kiroku_platform::connect_redis(&redis.url).await.unwrap();
    let relay = kiroku_relay::Relay::new(store.clone(), relay_redis, kiroku_relay::RelaySettings::new(&redis.prefix));
    tokio::spawn(relay.run(shutdown.clone()));
    let env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", redis.url.clone()),
        ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
        ("KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
        ("KIROKU_MIGRATE", "false".to_owned()),
        ("KIROKU_METRICS_ADDR", "off".to_owned()),
        ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
    ];
    let source = move |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
    let projector =
        kiroku_projector::Application::build(kiroku_projector::config::Settings::from_source(&source).unwrap())
            .await
            .unwrap();
    let projector = tokio::spawn(projector.run_until_stopped(shutdown.clone()));

    // Where the time goes: when each position reached the Redis stream (the relay's share of the lag), seen by a
    // plain XREAD of this client's own.
    let published: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let stream_watcher = {
        let client = kiroku_platform::connect_redis(&redis.url).await.unwrap();
        let key = kiroku_relay::stream::events_key(&redis.prefix);
        let published = published.clone();
        tokio::spawn(async move {
            let mut last = "0-0".to_owned();
            loop {
                let read: Result<XReadResponse<String, String, String, String>, _> =
                    client.xread_map(Some(1000), Some(1000), &key, &last).await;
                let now = Instant::now();
                for (id, _) in read.unwrap_or_default().into_values().flatten() {
                    if let Some(position) = id.split('-').next().and_then(|p| p.parse().ok()) {
                        published.lock().unwrap().insert(position, now);
                    }
                    last = id;
                }
            }
        })
    };

    // Steady load: one registration every 1/rate s; the commit time of each position is noted.
    let committed: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let writer = {
        let (store, committed, vault) = (store.clone(), committed.clone(), vault.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            for n in 0..rate * seconds {
                ticker.tick().await;
                let (store, committed) = (store.clone(), committed.clone());
                let append = common::registration(&vault, 1_000_000 + n);
                tokio::spawn(async move {
                    if let AppendOutcome::Appended(a) = store.append(&append).await.unwrap() {
                        committed.lock().unwrap().insert(a.last_position().get(), Instant::now());
                    }
                });
            }
        })
    };
    // The observer polls the active generation's checkpoint (one indexed read, so that measuring costs the
    // machine little): an event is visible once the checkpoint passes it.
    let mut lags = Vec::new();
    // Commit → on the stream, and on the stream → visible, for the events seen on the stream.
    let (mut relay_lags, mut projector_lags) = (Vec::new(), Vec::new());
    let total = (rate * seconds) as usize;
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    while lags.len() < total && Instant::now() < deadline {
        let checkpoint: i64 = sqlx::query_scalar(
            "SELECT c.position FROM projections p JOIN projection_checkpoints c \
             ON c.projection = p.name AND c.generation = p.active_generation WHERE p.name = 'users'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let checkpoint = u64::try_from(checkpoint).unwrap();
        let now = Instant::now();
        {
            let mut pending = committed.lock().unwrap();
            let visible: Vec<u64> = pending.range(..=checkpoint).map(|(p, _)| *p).collect();
            for position in visible {
                if let Some(at) = pending.remove(&position) {
                    lags.push(now.duration_since(at).as_secs_f64() * 1000.0);
                    if let Some(on_stream) = published.lock().unwrap().remove(&position) {
                        relay_lags.push(on_stream.saturating_duration_since(at).as_secs_f64() * 1000.0);
                        projector_lags.push(now.saturating_duration_since(on_stream).as_secs_f64() * 1000.0);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    writer.await.unwrap();
    stream_watcher.abort();
    for lags in [&mut lags, &mut relay_lags, &mut projector_lags] {
        lags.sort_by(f64::total_cmp);
    }

    // Rebuild: more history, then a full rebuild into a new generation.
    for chunk in 0..rebuild_events / 100 {
        let appends = (0..100).map(|i| {
            let (store, append) = (store.clone(), common::registration(&vault, 5_000_000 + chunk * 100 + i));
            async move {
                store.append(&append).await.unwrap();
            }
        });
        futures::future::join_all(appends).await;
    }
    // As a log at rest is: vacuumed and analysed (autovacuum would otherwise start on the fresh rows mid-measure).
    sqlx::query("VACUUM (ANALYZE) events, data_keys").execute(&db.pool).await.unwrap();
    let events_in_store: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db.pool).await.unwrap();
    let dead_letters = kiroku_projector::dead_letters::DeadLetterStream::new(
        kiroku_platform::connect_redis(&redis.url).await.unwrap(),
        &redis.prefix,
    );
    let rebuilt = kiroku_projector::rebuild::rebuild(
        &db.pool,
        &kiroku_projector::Projection::new(db.pool.clone(), 5, master.clone()),
        &dead_letters,
    )
    .await
    .unwrap();

    let raw = raw_insert(&db.pool).await;
    let rebuild_per_sec = (rebuilt.events as f64 / rebuilt.seconds).round();

    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "benchmark": "read_side",
            "note": "client and server share this machine's cores",
            "projection_lag": {
                "registrations_per_sec": rate,
                "seconds": seconds,
                "measured": lags.len(),
                "lag_ms": { "p50": percentile(&lags, 0.5), "p99": percentile(&lags, 0.99), "max": percentile(&lags, 1.0) },
                "commit_to_stream_ms": {
                    "p50": percentile(&relay_lags, 0.5), "p99": percentile(&relay_lags, 0.99), "max": percentile(&relay_lags, 1.0),
                },
                "stream_to_visible_ms": {
                    "p50": percentile(&projector_lags, 0.5), "p99": percentile(&projector_lags, 0.99),
                    "max": percentile(&projector_lags, 1.0),
                },
            },
            "rebuild": {
                "events_in_store": events_in_store,
                "events_applied": rebuilt.events,
                "seconds": rebuilt.seconds,
                "events_per_sec": rebuild_per_sec,
                "baseline_raw_insert": raw,
                "vs_raw": rebuild_per_sec / raw["rows_per_sec"].as_f64().unwrap_or(f64::NAN),
            },
        }))
        .unwrap()
    );
    trigger.trigger();
    let _ = projector.await;
}

/// The baseline of the rebuild, in the same run: the rows the rebuild wrote, read back to this client and inserted
/// raw into a twin of `users_read_rows` (same columns and indexes), 2,000 per statement, each its own transaction.
async fn raw_insert(pool: &sqlx::PgPool) -> serde_json::Value {
    type Row = (uuid::Uuid, Option<String>, Option<String>, Option<String>, Option<String>, chrono::DateTime<Utc>, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, auth0_id, github_id, github_username, display_name, created_at, position FROM users_read",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    sqlx::query("CREATE TABLE bench_raw_users (LIKE users_read_rows INCLUDING ALL)").execute(pool).await.unwrap();
    let started = Instant::now();
    for chunk in rows.chunks(2000) {
        let column = |f: fn(&Row) -> Option<String>| chunk.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO bench_raw_users (generation, id, auth0_id, github_id, github_username, display_name, \
             status, created_at, updated_at, version, position, registered_position) \
             SELECT 1, r.id, r.a, r.g, r.l, r.d, 'active', r.at, r.at, 1, r.p, r.p \
             FROM unnest($1::uuid[], $2::varchar[], $3::varchar[], $4::varchar[], $5::varchar[], \
                         $6::timestamptz[], $7::bigint[]) AS r(id, a, g, l, d, at, p)",
        )
        .bind(chunk.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(column(|r| r.1.clone()))
        .bind(column(|r| r.2.clone()))
        .bind(column(|r| r.3.clone()))
        .bind(column(|r| r.4.clone()))
        .bind(chunk.iter().map(|r| r.5).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.6).collect::<Vec<_>>())
        .execute(pool)
        .await
        .unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    json!({ "rows": rows.len(), "seconds": seconds, "rows_per_sec": (rows.len() as f64 / seconds).round() })
}
