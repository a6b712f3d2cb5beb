//! The relay inside `kiroku-command`, run as a real process against real PostgreSQL and Redis.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use kiroku_event_store::{Append, AppendOutcome, EventMetadata, EventStore, ExpectedVersion, NewEvent, Position};
use kiroku_testkit::{ServiceProcess, TestDb, TestRedis, eventually};
use serde_json::json;
use uuid::Uuid;

type Entry = (String, HashMap<String, String>);

fn command_env(db: &TestDb, redis: &TestRedis, extra: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", redis.url.clone()),
        ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
        ("KIROKU_AUTH0_ISSUER", "http://127.0.0.1:9/".to_owned()),
        ("KIROKU_AUTH0_AUDIENCE", "kiroku-tests".to_owned()),
        ("KIROKU_API_AUDIENCE", "kiroku-callers".to_owned()),
        ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
        ("KIROKU_COMMAND_ADDR", "127.0.0.1:0".to_owned()),
        ("KIROKU_MIGRATE", "false".to_owned()),
    ];
    for (key, value) in extra {
        let key: &'static str = Box::leak(key.to_string().into_boxed_str());
        env.push((key, value.to_string()));
    }
    env
}

/// Appends `count` events, a few per aggregate, and returns their positions in append order.
async fn append_events(store: &EventStore, count: usize) -> Vec<Position> {
    let mut positions = Vec::with_capacity(count);
    let mut aggregate = Uuid::new_v4();
    for n in 0..count {
        if n % 3 == 0 {
            aggregate = Uuid::new_v4();
        }
        let append = Append {
            aggregate_id: aggregate,
            aggregate_type: "Thing".to_owned(),
            expected: ExpectedVersion::Any,
            events: vec![NewEvent {
                event_type: "Happened".to_owned(),
                data: json!({ "n": n }),
                metadata: EventMetadata {
                    request_id: None,
                    correlation_id: format!("c{n}"),
                    causation_id: format!("c{n}"),
                    schema_version: 1,
                    caller: None,
                    traceparent: None,
                },
                occurred_at: Utc::now(),
            }],
            claims: vec![],
            new_key: None,
            erasure: None,
            idempotency: None,
        };
        match store.append(&append).await.unwrap() {
            AppendOutcome::Appended(appended) => positions.push(appended.last_position()),
            AppendOutcome::Replayed(_) => unreachable!("no idempotency key"),
        }
    }
    positions
}

async fn stream_entries(redis: &TestRedis) -> Vec<Entry> {
    redis.client.xrange(redis.events_stream(), "-", "+", None).await.unwrap()
}

async fn wait_for_entries(redis: &TestRedis, count: usize) -> Vec<Entry> {
    eventually(Duration::from_secs(30), &format!("{count} stream entries"), || async {
        let entries = stream_entries(redis).await;
        Ok((entries.len() >= count).then_some(entries))
    })
    .await
    .unwrap()
}

fn position_of(entry: &Entry) -> u64 {
    entry.1["position"].parse().unwrap()
}

/// Entries are in strictly increasing position order, each id is `<position>-0`, and each `prev_position`
/// names the entry before it (the first one names `first_prev`).
fn assert_chained(entries: &[Entry], first_prev: u64) {
    let mut previous = first_prev;
    for (id, fields) in entries {
        let position: u64 = fields["position"].parse().unwrap();
        assert_eq!(id, &format!("{position}-0"));
        assert!(position > previous, "positions strictly increase");
        assert_eq!(fields["prev_position"].parse::<u64>().unwrap(), previous, "chain broken at {position}");
        previous = position;
    }
}

#[tokio::test]
async fn events_appended_while_the_relay_is_stopped_reach_redis_in_order_once_it_starts() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let before = append_events(&store, 1_200).await;

    let _command = ServiceProcess::spawn("kiroku-command", &command_env(&db, &redis, &[])).unwrap();
    let entries = wait_for_entries(&redis, before.len()).await;
    assert_eq!(entries.iter().map(position_of).collect::<Vec<_>>(), before.iter().map(|p| p.get()).collect::<Vec<_>>());
    assert_chained(&entries, 0);

    let (_, first) = &entries[0];
    let stored = store.read_all_after(Position::ZERO, 1).await.unwrap().remove(0);
    assert_eq!(first["event_id"], stored.event_id.to_string());
    assert_eq!(first["aggregate_id"], stored.aggregate_id.to_string());
    assert_eq!(first["aggregate_type"], "Thing");
    assert_eq!(first["event_type"], "Happened");
    assert_eq!(first["version"], "1");
    let payload: serde_json::Value = serde_json::from_str(&first["payload"]).unwrap();
    assert_eq!(payload["data"], json!({ "n": 0 }));
    assert_eq!(payload["metadata"]["correlation_id"], "c0");
    assert!(payload["occurred_at"].as_str().unwrap().ends_with('Z'));

    // Live: appended while it runs, published promptly (woken by NOTIFY).
    let live = append_events(&store, 5).await;
    let entries = wait_for_entries(&redis, before.len() + live.len()).await;
    assert_eq!(entries.len(), before.len() + live.len(), "nothing published twice");
    assert_chained(&entries, 0);
}

#[tokio::test]
async fn a_relay_killed_mid_batch_loses_nothing_and_publishes_nothing_out_of_order() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let positions = append_events(&store, 250).await;
    let checkpoint = format!("relay:{}", redis.events_stream());

    // Two chunks of 100 reach Redis, then the process dies before its checkpoint.
    let mut crashing = ServiceProcess::spawn(
        "kiroku-command",
        &command_env(&db, &redis, &[("KIROKU_FAILPOINT", "relay.after_chunk:2")]),
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), crashing.child.wait()).await.unwrap().unwrap();
    assert!(!status.success(), "the fail point aborts the process");
    let entries = stream_entries(&redis).await;
    assert_eq!(entries.len(), 200);
    assert_chained(&entries, 0);
    assert_eq!(store.load_checkpoint(&checkpoint).await.unwrap(), Position::ZERO);

    // Again, dying after the whole batch is in Redis but before the checkpoint.
    let mut crashing = ServiceProcess::spawn(
        "kiroku-command",
        &command_env(&db, &redis, &[("KIROKU_FAILPOINT", "relay.before_checkpoint:1")]),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), crashing.child.wait()).await.unwrap().unwrap();
    assert_eq!(stream_entries(&redis).await.len(), 250);
    assert_eq!(store.load_checkpoint(&checkpoint).await.unwrap(), Position::ZERO);

    // Restarted for good: the batch is published again, the stream keeps one entry per event.
    let _relay = ServiceProcess::spawn("kiroku-command", &command_env(&db, &redis, &[])).unwrap();
    eventually(Duration::from_secs(30), "the checkpoint to catch up", || async {
        Ok((store.load_checkpoint(&checkpoint).await? == *positions.last().unwrap()).then_some(()))
    })
    .await
    .unwrap();
    let more = append_events(&store, 10).await;
    let entries = wait_for_entries(&redis, 260).await;
    assert_eq!(entries.len(), 260, "nothing duplicated");
    assert_eq!(
        entries.iter().map(position_of).collect::<Vec<_>>(),
        positions.iter().chain(&more).map(|p| p.get()).collect::<Vec<_>>()
    );
    assert_chained(&entries, 0);
}

#[tokio::test]
async fn after_redis_comes_back_empty_new_entries_reveal_the_gap_through_prev_position() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let _relay = ServiceProcess::spawn("kiroku-command", &command_env(&db, &redis, &[])).unwrap();

    let before = append_events(&store, 10).await;
    wait_for_entries(&redis, 10).await;
    let _: () = redis.client.custom(fred::cmd!("FLUSHDB"), Vec::<String>::new()).await.unwrap();

    let after = append_events(&store, 5).await;
    let entries = wait_for_entries(&redis, 5).await;
    assert_eq!(entries.iter().map(position_of).collect::<Vec<_>>(), after.iter().map(|p| p.get()).collect::<Vec<_>>());
    // The first entry after the flush points at an entry the stream no longer holds: a consumer that saw
    // fewer than all ten earlier events knows it must read the gap from PostgreSQL.
    assert_chained(&entries, before.last().unwrap().get());
}

#[tokio::test]
async fn one_relay_leads_at_a_time_and_another_takes_over_when_it_dies() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let store = EventStore::new(db.pool.clone());

    let mut first = ServiceProcess::spawn("kiroku-command", &command_env(&db, &redis, &[])).unwrap();
    let early = append_events(&store, 20).await;
    wait_for_entries(&redis, 20).await;
    let _second = ServiceProcess::spawn("kiroku-command", &command_env(&db, &redis, &[])).unwrap();
    let middle = append_events(&store, 20).await;
    wait_for_entries(&redis, 40).await;

    first.kill().await;
    let late = append_events(&store, 20).await;
    let entries = wait_for_entries(&redis, 60).await;
    assert_eq!(entries.len(), 60);
    assert_eq!(
        entries.iter().map(position_of).collect::<Vec<_>>(),
        early.iter().chain(&middle).chain(&late).map(|p| p.get()).collect::<Vec<_>>()
    );
    assert_chained(&entries, 0);
}

#[tokio::test]
async fn a_stream_trimmed_to_nothing_while_a_batch_awaits_its_checkpoint_does_not_wedge_the_relay() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let positions = append_events(&store, 120).await;

    // Published, then killed before the checkpoint: the next leader must publish the batch again.
    let mut crashing = ServiceProcess::spawn(
        "kiroku-command",
        &command_env(&db, &redis, &[("KIROKU_FAILPOINT", "relay.before_checkpoint:1")]),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), crashing.child.wait()).await.unwrap().unwrap();
    assert_eq!(stream_entries(&redis).await.len(), 120);
    // Meanwhile an operator empties the stream (the key and its last id stay).
    let _: i64 = redis.client.xtrim(redis.events_stream(), ("MAXLEN", 0)).await.unwrap();
    assert!(stream_entries(&redis).await.is_empty());

    let _relay = ServiceProcess::spawn("kiroku-command", &command_env(&db, &redis, &[])).unwrap();
    let checkpoint = format!("relay:{}", redis.events_stream());
    eventually(Duration::from_secs(30), "the checkpoint to pass the republished batch", || async {
        Ok((store.load_checkpoint(&checkpoint).await? == *positions.last().unwrap()).then_some(()))
    })
    .await
    .unwrap();
    let more = append_events(&store, 5).await;
    let entries = wait_for_entries(&redis, 5).await;
    assert_eq!(entries.iter().map(position_of).collect::<Vec<_>>(), more.iter().map(|p| p.get()).collect::<Vec<_>>());
    assert_chained(&entries, positions.last().unwrap().get());
}

#[tokio::test]
async fn two_deployments_sharing_a_database_each_get_a_relay_for_their_stream() {
    let db = TestDb::create().await.unwrap();
    let first = TestRedis::acquire().await.unwrap();
    let second = TestRedis::acquire().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let _one = ServiceProcess::spawn("kiroku-command", &command_env(&db, &first, &[])).unwrap();
    let _two = ServiceProcess::spawn("kiroku-command", &command_env(&db, &second, &[])).unwrap();
    let positions = append_events(&store, 30).await;
    for redis in [&first, &second] {
        let entries = wait_for_entries(redis, 30).await;
        assert_eq!(
            entries.iter().map(position_of).collect::<Vec<_>>(),
            positions.iter().map(|p| p.get()).collect::<Vec<_>>()
        );
    }
}
