//! GetUser throughput and latency at 16 concurrent callers, against the real query service (in-process, over
//! loopback gRPC) and PostgreSQL, with every call carrying a caller token (verified, like in production, against
//! the development identity provider's JWKS).
//!
//! `cargo bench --bench get_user` (release profile). Prints one JSON document.
//! `BENCH_USERS` (default 10000) users in the read model, `BENCH_CALLS` (default 20000) lookups in all,
//! `BENCH_CALLERS` (default 16) at once.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kiroku::v1::GetUserRequest;
use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku_dev_identity::{DEV_API_AUDIENCE, DevIdentityProvider};
use kiroku_platform::Shutdown;
use kiroku_testkit::{TestDb, TestRedis, with_caller};
use serde_json::json;
use tonic::transport::Channel;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let (users, calls, callers) =
        (setting("BENCH_USERS", 10_000), setting("BENCH_CALLS", 20_000), setting("BENCH_CALLERS", 16));
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let identity = DevIdentityProvider::start("127.0.0.1:0".parse().unwrap(), &kiroku::permissions::ALL).await.unwrap();

    // The read model's rows, written directly: this measures reading them, not projecting them.
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO users_read_rows (generation, id, auth0_id, github_id, github_username, display_name, status, \
         created_at, updated_at, version, position, registered_position) \
         SELECT 1, gen_random_uuid(), 'github|' || n, n::text, 'user' || n, 'User ' || n, 'active', now(), now(), \
         1, n, n FROM generate_series(1, $1::int) AS n RETURNING id",
    )
    .bind(i32::try_from(users).unwrap())
    .fetch_all(&db.pool)
    .await
    .unwrap();

    let env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", redis.url.clone()),
        ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
        ("KIROKU_AUTH0_ISSUER", identity.issuer().to_owned()),
        ("KIROKU_API_AUDIENCE", DEV_API_AUDIENCE.to_owned()),
        ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
        ("KIROKU_QUERY_ADDR", "127.0.0.1:0".to_owned()),
        ("KIROKU_MIGRATE", "false".to_owned()),
        ("KIROKU_METRICS_ADDR", "off".to_owned()),
    ];
    let source = move |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
    let app =
        kiroku_query::Application::build(kiroku_query::config::Settings::from_source(&source).unwrap()).await.unwrap();
    let address = app.local_addr();
    let (trigger, shutdown) = Shutdown::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown));

    let caller = identity.mint_caller(&kiroku::permissions::ALL, Duration::from_secs(3600)).unwrap();
    let channel =
        with_caller(Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap(), &caller);
    // Warm up: the first call fetches the JWKS.
    QueryServiceClient::new(channel.clone())
        .get_user(GetUserRequest { user_id: ids[0].to_string(), min_position: 0 })
        .await
        .unwrap();

    let per_caller = calls.div_ceil(callers);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let mut client = QueryServiceClient::new(channel.clone());
            // Each caller walks the users from its own offset: no two ask for the same row at the same time.
            let wanted: Vec<String> =
                (0..per_caller).map(|i| ids[(c * per_caller + i * 7919) % ids.len()].to_string()).collect();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(wanted.len());
                for user_id in wanted {
                    let t = Instant::now();
                    client.get_user(GetUserRequest { user_id, min_position: 0 }).await.unwrap();
                    latencies.push(t.elapsed());
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
    let pct = |p: f64| kiroku_testkit::percentile(&latencies, p).as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "benchmark": "get_user",
            "users": users,
            "callers": callers,
            "calls": latencies.len(),
            "seconds": elapsed.as_secs_f64(),
            "calls_per_sec": (latencies.len() as f64 / elapsed.as_secs_f64()).round(),
            "latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0) },
        }))
        .unwrap()
    );
    trigger.trigger();
    let _ = server.await;
}
