//! Append throughput with 16 concurrent writers, beside a raw INSERT of the same rows in the same run.
//!
//! `cargo bench -p kiroku-event-store --bench append` (release profile). Prints one JSON document.
//! `BENCH_SECONDS` sets each scenario's duration (default 10), `BENCH_WRITERS` the writers (default 16).
//! The scenarios run twice: without a metrics recorder (the `metrics` macros do nothing), then with the
//! Prometheus recorder the services install; each time beside a raw INSERT, so that the table growing between
//! the two passes is measured too.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use kiroku_event_store::{Append, EventMetadata, EventStore, ExpectedVersion, NewEvent};
use kiroku_testkit::TestDb;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_type: "UserRegistered".to_owned(),
        data: json!({ "auth0_id": format!("github|{n}"), "github_id": n.to_string(), "registered_at": "2026-11-27T00:00:00Z" }),
        metadata: EventMetadata {
            request_id: None,
            correlation_id: Uuid::new_v4().to_string(),
            causation_id: Uuid::new_v4().to_string(),
            schema_version: 1,
            caller: None,
            traceparent: None,
        },
        occurred_at: Utc::now(),
    }
}

struct Outcome {
    transactions: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// Runs `writers` tasks doing `one` back to back for `seconds`.
async fn run<F, Fut>(writers: usize, seconds: u64, one: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let one = one.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = (w as u64) << 32;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    one(n).await;
                    latencies.push(t.elapsed());
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Outcome { transactions: latencies.len() as u64, latencies, elapsed }
}

fn report(name: &str, events_per_tx: u64, outcome: &Outcome) -> serde_json::Value {
    let pct = |p: f64| kiroku_testkit::percentile(&outcome.latencies, p).as_secs_f64() * 1000.0;
    let secs = outcome.elapsed.as_secs_f64();
    json!({
        "scenario": name,
        "events_per_transaction": events_per_tx,
        "transactions": outcome.transactions,
        "transactions_per_sec": (outcome.transactions as f64 / secs).round(),
        "events_per_sec": (outcome.transactions as f64 * events_per_tx as f64 / secs).round(),
        "latency_ms": { "p50": pct(0.50), "p99": pct(0.99) },
    })
}

/// The same row shape as `events`, with the same keys but neither the trigger nor the position scheme:
/// what PostgreSQL costs on its own.
async fn raw_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE events_raw (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("CREATE SEQUENCE events_raw_position").execute(pool).await.unwrap();
}

async fn raw_insert(pool: &PgPool, events: &[NewEvent]) {
    let n = events.len();
    let ids: Vec<String> = (0..n).map(|_| ulid::Ulid::new().to_string()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let data: Vec<&serde_json::Value> = events.iter().map(|e| &e.data).collect();
    let metadata: Vec<serde_json::Value> = events.iter().map(|e| serde_json::to_value(&e.metadata).unwrap()).collect();
    let occurred: Vec<_> = events.iter().map(|e| e.occurred_at).collect();
    sqlx::query(
        "INSERT INTO events_raw (id, aggregate_id, aggregate_type, event_type, event_version, event_data, metadata, \
         occurred_at, position) \
         SELECT e.id, $1, 'User', e.t, e.ord::integer, e.d, e.m, e.o, nextval('events_raw_position') \
         FROM unnest($2::varchar[], $3::varchar[], $4::jsonb[], $5::jsonb[], $6::timestamptz[]) \
         WITH ORDINALITY AS e(id, t, d, m, o, ord)",
    )
    .bind(Uuid::new_v4())
    .bind(&ids)
    .bind(&types)
    .bind(&data)
    .bind(&metadata)
    .bind(&occurred)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let writers: usize = std::env::var("BENCH_WRITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let db = TestDb::create().await.unwrap();
    raw_table(&db.pool).await;
    let store = EventStore::new(db.pool.clone());
    let mut results = Vec::new();

    for metrics_on in [false, true] {
        if metrics_on {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            metrics::set_global_recorder(recorder).unwrap();
        }
        let suffix = if metrics_on { "_metrics_on" } else { "" };
        for events_per_tx in [1u64, 10] {
            let s = store.clone();
            let outcome = run(writers, seconds, move |n| {
                let s = s.clone();
                async move {
                    let append = Append {
                        aggregate_id: Uuid::new_v4(),
                        aggregate_type: "User".to_owned(),
                        expected: ExpectedVersion::NoStream,
                        events: (0..events_per_tx).map(|i| event(n * 16 + i)).collect(),
                        claims: vec![],
                        new_key: None,
                        erasure: None,
                        idempotency: None,
                    };
                    s.append(&append).await.unwrap();
                }
            })
            .await;
            results.push(report(&format!("kiroku_append{suffix}"), events_per_tx, &outcome));

            let pool = db.pool.clone();
            let outcome = run(writers, seconds, move |n| {
                let pool = pool.clone();
                async move {
                    let events: Vec<NewEvent> = (0..events_per_tx).map(|i| event(n * 16 + i)).collect();
                    raw_insert(&pool, &events).await;
                }
            })
            .await;
            results.push(report(&format!("raw_insert{suffix}"), events_per_tx, &outcome));
        }
    }

    let doc = json!({
        "benchmark": "append",
        "writers": writers,
        "seconds_per_scenario": seconds,
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap());
}
