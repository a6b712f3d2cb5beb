//! WatchEvents: end-to-end latency (commit → delivered) with 100 live subscribers at a steady write load,
//! catch-up throughput for one subscriber, and the server's memory per idle subscriber.
//!
//! `cargo build --release --workspace --bins && cargo bench --bench watch`. The query server runs as its own process
//! (`target/release/kiroku-query`) so that its memory can be read from /proc. Prints one JSON document.
//! `BENCH_SUBSCRIBERS` (default 100), `BENCH_RATE` events/s (default 200), `BENCH_SECONDS` (default 10),
//! `BENCH_IDLE_SUBSCRIBERS` (default 1000), `BENCH_HISTORY` events added before the catch-up (default 20000).
//! Events are sealed as RegisterUser seals them, so delivering one opens it. The catch-up's baseline, in the same
//! run: the same log read by the bench itself with the event store's `read_batch` (what a replay reads per step).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku::v1::{WatchEventsRequest, watch_events_request, watch_events_response};
use kiroku_dev_identity::{DEV_API_AUDIENCE, DevIdentityProvider};
use kiroku_event_store::{AppendOutcome, EventStore};
use kiroku_testkit::{CallerChannel, ServiceProcess, TestDb, TestRedis, percentile, with_caller};
use kiroku_vault::{MasterKeys, Vault};
use serde_json::json;
use tonic::transport::Channel;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn connect(address: &str) -> Channel {
    for _ in 0..100 {
        if let Ok(channel) = Channel::from_shared(format!("http://{address}")).unwrap().connect().await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("kiroku-query did not come up on {address}");
}

#[tokio::main]
async fn main() {
    let subscribers: usize = std::env::var("BENCH_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let rate: u64 = std::env::var("BENCH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let idle: usize = std::env::var("BENCH_IDLE_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let history: u64 = std::env::var("BENCH_HISTORY").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let store = EventStore::new(db.pool.clone());
    let master = Arc::new(MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).unwrap());
    let vault = Vault::new(store.clone(), master);
    let address = "127.0.0.1:50952";
    // The tenant whose keys sign the callers' tokens.
    let identity = DevIdentityProvider::start("127.0.0.1:0".parse().unwrap(), &kiroku::permissions::ALL).await.unwrap();
    let caller = identity.mint_caller(&kiroku::permissions::ALL, Duration::from_secs(3600)).unwrap();
    let server = ServiceProcess::spawn(
        "kiroku-query",
        &[
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", redis.url.clone()),
            ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
            ("KIROKU_QUERY_ADDR", address.to_owned()),
            ("KIROKU_MIGRATE", "false".to_owned()),
            ("KIROKU_METRICS_ADDR", "off".to_owned()),
            ("KIROKU_AUTH0_ISSUER", identity.issuer().to_owned()),
            ("KIROKU_API_AUDIENCE", DEV_API_AUDIENCE.to_owned()),
            ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
            // Every subscriber here is one caller: lift the per-caller cap (100) above what the benchmark opens.
            ("KIROKU_WATCH_MAX_STREAMS_PER_CALLER", (subscribers + idle + 10).to_string()),
        ],
    )
    .unwrap();
    let pid = server.child.id().unwrap();
    let channels: Vec<CallerChannel> = futures::future::join_all((0..4).map(|_| connect(address)))
        .await
        .into_iter()
        .map(|c| with_caller(c, &caller))
        .collect();

    // 1. Latency with live subscribers under a steady write load.
    let committed: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let total = (rate * seconds) as usize;
    let mut readers = Vec::new();
    for s in 0..subscribers {
        let mut client = QueryServiceClient::new(channels[s % channels.len()].clone());
        let mut stream = client.watch_events(WatchEventsRequest::default()).await.unwrap().into_inner();
        let (committed, latencies) = (committed.clone(), latencies.clone());
        readers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < total {
                let Ok(Some(message)) = stream.message().await else { break };
                if let Some(watch_events_response::Kind::Event(event)) = message.kind {
                    let now = Instant::now();
                    seen += 1;
                    // The commit time is noted right after the append returns; wait for it if we are faster.
                    let at = loop {
                        if let Some(at) = committed.lock().unwrap().get(&event.position).copied() {
                            break at;
                        }
                        tokio::task::yield_now().await;
                    };
                    latencies.lock().unwrap().push(now.saturating_duration_since(at).as_secs_f64() * 1000.0);
                }
            }
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    for n in 0..total as u64 {
        ticker.tick().await;
        let (store, committed) = (store.clone(), committed.clone());
        let append = common::registration(&vault, n);
        tokio::spawn(async move {
            // The position is known only when the append returns; a delivery can beat this insert, so the
            // reader waits for it above. Both stamps are taken on this machine's monotonic clock.
            if let AppendOutcome::Appended(a) = store.append(&append).await.unwrap() {
                committed.lock().unwrap().insert(a.last_position().get(), Instant::now());
            }
        });
    }
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(60), reader).await;
    }
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);

    // 2. Catch-up throughput: one subscriber from the beginning, more history first.
    for chunk in 0..history / 100 {
        let appends = (0..100).map(|i| {
            let (store, append) = (store.clone(), common::registration(&vault, 1_000_000 + chunk * 100 + i));
            async move {
                store.append(&append).await.unwrap();
            }
        });
        futures::future::join_all(appends).await;
    }
    // As a log at rest is: vacuumed and analysed (autovacuum would otherwise start on the fresh rows mid-measure).
    sqlx::query("VACUUM (ANALYZE) events, data_keys").execute(&db.pool).await.unwrap();
    let mut client = QueryServiceClient::new(channels[0].clone());
    let started = Instant::now();
    let mut stream = client
        .watch_events(WatchEventsRequest {
            start: Some(watch_events_request::Start::FromBeginning(true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut replayed = 0u64;
    while let Ok(Some(message)) = stream.message().await {
        match message.kind {
            Some(watch_events_response::Kind::Event(_)) => replayed += 1,
            Some(watch_events_response::Kind::CaughtUp(_)) => break,
            _ => {}
        }
    }
    let catch_up_secs = started.elapsed().as_secs_f64();
    drop(stream);
    // The catch-up's baseline, in the same run: the same log read by this process with the event store's own
    // batch read (500 events a statement, as the replay reads them), decoded but neither opened nor sent.
    let started = Instant::now();
    let (mut read, mut after) = (0u64, kiroku_event_store::Position::ZERO);
    loop {
        let batch = store.read_batch(after, 500).await.unwrap();
        read += batch.events.len() as u64;
        after = batch.through;
        if !batch.full {
            break;
        }
    }
    let read_secs = started.elapsed().as_secs_f64();

    // 3. Memory per idle subscriber, read from the server process.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);
    // RSS is read twice: after the first half of the subscribers and after all of them. The first half can reuse
    // heap that the catch-up freed and the allocator kept, so the whole delta varies with what the catch-up left
    // (6.2 and 9.4 KB per subscriber in two runs of the same server); the second half's is the marginal cost.
    let mut idle_streams = Vec::new();
    let mut half = before;
    for s in 0..idle {
        if s == idle / 2 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            half = rss_kib(pid);
        }
        let mut client = QueryServiceClient::new(channels[s % channels.len()].clone());
        let mut stream = client.watch_events(WatchEventsRequest::default()).await.unwrap().into_inner();
        stream.message().await.unwrap(); // CaughtUp: the subscriber exists server-side
        idle_streams.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);

    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "benchmark": "watch",
            "live": {
                "subscribers": subscribers,
                "events_per_sec": rate,
                "seconds": seconds,
                "deliveries": latencies.len(),
                "latency_ms": { "p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": percentile(&latencies, 1.0) },
            },
            "catch_up": {
                "events": replayed,
                "seconds": catch_up_secs,
                "events_per_sec": (replayed as f64 / catch_up_secs).round(),
                "baseline_read_batch": { "events": read, "seconds": read_secs, "events_per_sec": (read as f64 / read_secs).round() },
                "vs_read_batch": (replayed as f64 / catch_up_secs) / (read as f64 / read_secs),
            },
            "idle_subscribers": {
                "count": idle,
                "rss_before_kib": before,
                "rss_after_kib": after,
                "rss_half_kib": half,
                "bytes_per_subscriber": ((after.saturating_sub(before)) * 1024) as f64 / idle as f64,
                "marginal_bytes_per_subscriber":
                    ((after.saturating_sub(half)) * 1024) as f64 / (idle - idle / 2).max(1) as f64,
            },
        }))
        .unwrap()
    );
    drop(idle_streams);
}
