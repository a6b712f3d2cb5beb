//! The event store where event stores lose data in practice: racing appends that resolve "any version" late, a
//! log whose positions would go backwards after a restore, and callers that give up in the middle of an append.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chrono::Utc;
use kiroku_event_store::{
    Append, AppendError, AppendOutcome, Claim, EventMetadata, EventStore, ExpectedVersion, IdempotencyKey,
    IdempotencyRecord, NewEvent,
};
use kiroku_testkit::{TestDb, eventually};
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

fn event(n: u64) -> NewEvent {
    NewEvent {
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
    }
}

fn append(aggregate_id: Uuid, expected: ExpectedVersion, n: u64) -> Append {
    Append {
        aggregate_id,
        aggregate_type: "Thing".to_owned(),
        expected,
        events: vec![event(n)],
        claims: vec![],
        new_key: None,
        erasure: None,
        idempotency: None,
    }
}

fn key(request_id: &str) -> Option<IdempotencyRecord> {
    Some(IdempotencyRecord {
        key: IdempotencyKey { caller: "tests".to_owned(), request_id: request_id.to_owned() },
        outcome: json!({}),
    })
}

/// Backends of this test's database that wait for a lock.
async fn lock_waiters(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_append_at_any_version_never_gives_a_later_version_a_lower_position() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let aggregate = Uuid::new_v4();
    let claim = Claim { kind: "thing".to_owned(), value: "contested".to_owned() };

    // Someone holds the claim in an open transaction, so that our append, which has already taken its transaction
    // id (its idempotency key is written first), waits on it.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("INSERT INTO claims (kind, value, owner_id) VALUES ($1, $2, $3)")
        .bind(&claim.kind)
        .bind(&claim.value)
        .bind(Uuid::new_v4())
        .execute(&mut holder)
        .await
        .unwrap();
    let waiting = {
        let store = store.clone();
        let append =
            Append { claims: vec![claim], idempotency: key("slow"), ..append(aggregate, ExpectedVersion::Any, 1) };
        tokio::spawn(async move { store.append(&append).await })
    };
    eventually(Duration::from_secs(10), "the append to wait on the claim", || async {
        Ok((lock_waiters(&db).await > 0).then_some(()))
    })
    .await
    .unwrap();

    // Meanwhile another writer appends to the same aggregate, with a later transaction id, and commits.
    let other = match store.append(&append(aggregate, ExpectedVersion::Any, 2)).await.unwrap() {
        AppendOutcome::Appended(appended) => appended,
        replayed => panic!("{replayed:?}"),
    };
    assert_eq!(other.version.get(), 1);
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    // The waiting append either conflicts or lands after, in version order and in position order alike.
    match waiting.await.unwrap() {
        Err(AppendError::Conflict { .. }) => {}
        Ok(AppendOutcome::Appended(late)) => {
            assert_eq!(late.version.get(), 2);
            assert!(
                late.positions[0] > other.positions[0],
                "version 2 at position {} is below version 1 at {}: readers would apply them out of order",
                late.positions[0],
                other.positions[0]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn appends_are_refused_when_positions_would_go_backwards() {
    let db = TestDb::create().await.unwrap();
    // A log restored from another cluster whose transaction ids ran far ahead of this one's.
    let next: i64 = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let restored = (next + 1_000_000) << 16;
    sqlx::query(
        "INSERT INTO events (id, aggregate_id, aggregate_type, event_type, event_version, event_data, occurred_at, \
         position) VALUES ($1, $2, 'Thing', 'Restored', 1, '{}', now(), $3)",
    )
    .bind(ulid::Ulid::new().to_string())
    .bind(Uuid::new_v4())
    .bind(restored)
    .execute(&db.pool)
    .await
    .unwrap();

    let store = EventStore::new(db.pool.clone());
    let refused = store.append(&append(Uuid::new_v4(), ExpectedVersion::NoStream, 1)).await;
    match refused {
        Err(error @ AppendError::PositionsBehind { .. }) => {
            let message = error.to_string();
            assert!(message.contains(&restored.to_string()), "the message names the head: {message}");
        }
        other => panic!("an append below the head must be refused, got {other:?}"),
    }
    let with_claims = Append {
        claims: vec![Claim { kind: "thing".to_owned(), value: "x".to_owned() }],
        ..append(Uuid::new_v4(), ExpectedVersion::NoStream, 2)
    };
    assert!(matches!(store.append(&with_claims).await, Err(AppendError::PositionsBehind { .. })));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 1, "nothing was written");
}

#[tokio::test]
async fn a_caller_that_gives_up_mid_append_never_leaves_a_transaction_open_on_a_pooled_connection() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    // Checked from a connection of its own: the store's may be the ones in question.
    let fresh = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.url).await.unwrap();
    // A connection goes back to the pool a moment after it is dropped (and an append that is allowed to finish
    // on its own finishes a moment later): give it two seconds to be clean.
    let left_open = || async {
        let mut open = 0;
        for _ in 0..100 {
            open = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state = 'idle in transaction'",
            )
            .fetch_one(&fresh)
            .await
            .unwrap();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        open
    };
    // Appends with a key (a transaction of several statements), abandoned after 1, 2, 3, … polls: at every
    // step of the transaction, BEGIN and COMMIT included, as a cancelled RPC drops them.
    let mut acknowledged = Vec::new();
    for n in 0..240u64 {
        let append = Append {
            claims: vec![Claim { kind: "thing".to_owned(), value: format!("v{n}") }],
            new_key: None,
            erasure: None,
            idempotency: key(&format!("r{n}")),
            ..append(Uuid::new_v4(), ExpectedVersion::NoStream, n)
        };
        let mut pending = Box::pin(store.append(&append));
        for _ in 0..(n % 40) {
            if futures::poll!(pending.as_mut()).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(pending);
        assert_eq!(left_open().await, 0, "after abandoning append {n}, a pooled connection is idle in a transaction");
        // A plain append right after, acknowledged: it must be committed, whatever connection it got.
        match store.append(&append_plain(n)).await.unwrap() {
            AppendOutcome::Appended(appended) => acknowledged.push(appended.last_position().get() as i64),
            replayed => panic!("{replayed:?}"),
        }
    }
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE position = ANY($1)")
        .bind(&acknowledged)
        .fetch_one(&fresh)
        .await
        .unwrap();
    assert_eq!(committed as usize, acknowledged.len(), "acknowledged appends are committed");
}

fn append_plain(n: u64) -> Append {
    append(Uuid::new_v4(), ExpectedVersion::NoStream, 10_000 + n)
}

#[tokio::test]
async fn a_horizon_read_before_a_crash_is_never_passed_by_positions_given_out_after_it() {
    // A cluster of our own: this test crashes it.
    let postgres = kiroku_testkit::PrivatePostgres::start().unwrap();
    let admin = sqlx::PgPool::connect(&postgres.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE hazards").execute(&admin).await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&postgres.url("hazards")).await.unwrap();
    kiroku_event_store::migrate(&pool).await.unwrap();
    let store = EventStore::new(pool.clone());
    let first = match store.append(&append(Uuid::new_v4(), ExpectedVersion::NoStream, 1)).await.unwrap() {
        AppendOutcome::Appended(appended) => appended.last_position(),
        replayed => panic!("{replayed:?}"),
    };

    // The WAL writer pauses, and a transaction takes an id and rolls back: its abort record, the only trace of
    // that id, waits in the WAL buffers.
    let walwriter: i32 = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'")
        .fetch_one(&admin)
        .await
        .unwrap();
    let signal = |name: &str| {
        let status =
            std::process::Command::new("kill").arg(format!("-{name}")).arg(walwriter.to_string()).status().unwrap();
        assert!(status.success(), "kill -{name} {walwriter}");
    };
    signal("STOP");
    let mut rolled_back = sqlx::PgConnection::connect(&postgres.url("hazards")).await.unwrap();
    sqlx::query("BEGIN").execute(&mut rolled_back).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut rolled_back).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut rolled_back).await.unwrap();
    // A reader now sees a horizon above that id.
    let passed = store.read_batch(first, 100).await.unwrap().through;
    let horizon = store.safe_horizon().await.unwrap();

    // The cluster crashes (its WAL writer killed outright: PostgreSQL restarts every process and recovers) before
    // the abort record reached the disk, so recovery hands the id out again.
    signal("KILL");
    drop(rolled_back);
    let pool = eventually(Duration::from_secs(60), "PostgreSQL back after recovery", || async {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&postgres.url("hazards")).await;
        Ok(match pool {
            Ok(pool) if sqlx::query("SELECT 1").execute(&pool).await.is_ok() => Some(pool),
            _ => None,
        })
    })
    .await
    .unwrap();
    let store = EventStore::new(pool);
    let next = match store.append(&append(Uuid::new_v4(), ExpectedVersion::NoStream, 2)).await.unwrap() {
        AppendOutcome::Appended(appended) => appended.last_position(),
        replayed => panic!("{replayed:?}"),
    };
    assert!(
        next > passed,
        "an event at {next} lands at or below {passed}, which a follower had passed before the crash"
    );
    assert!(next > horizon, "an event at {next} lands at or below the safe horizon {horizon} read before the crash");
}
