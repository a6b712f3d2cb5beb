//! RegisterUser throughput and latency at 16 concurrent callers, against the real command service (in-process,
//! over loopback gRPC), PostgreSQL, and the development identity provider standing in for Auth0 and GitHub.
//!
//! `cargo bench --bench register_user` (release profile). Prints one JSON document.
//! `BENCH_CALLS` (default 8000) registrations per phase, `BENCH_CALLERS` (default 16) at once. Three phases in one
//! run: metrics and tracing off (no recorder, no subscriber: the macros and spans do nothing); metrics on (the
//! Prometheus recorder, as `KIROKU_METRICS_ADDR` installs it); then tracing on too (`init_tracing` at `info` with
//! OTLP export to a loopback receiver: every RPC's span exported, and its access-log line written, to stderr).
//! Each phase writes to a log and tables that the ones before it filled. With a traced phase, `stages_ms` breaks one
//! RegisterUser down by span (caller check, token check, ownership lookup, GitHub, append and its statements). `BENCH_PHASES` (default `off,on,traced`)
//! chooses the sequence; `off,off,on,on` shows how much a phase loses to the growing database alone.
//! `BENCH_CONNECTIONS` (default: one per caller, as separate clients have): the HTTP/2 connections the callers
//! share, round-robin. `BENCH_CONNECTIONS=1` multiplexes every caller on one connection: measured here, p99 45–49 ms
//! against 14–17 ms with one each, at about the same throughput.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kiroku::v1::RegisterUserRequest;
use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku_dev_identity::{DEV_API_AUDIENCE, DEV_AUDIENCE, DevAccount, DevIdentityProvider};
use kiroku_platform::Shutdown;
use kiroku_testkit::{CallerChannel, TestDb, TestRedis, with_caller};
use serde_json::json;
use tonic::transport::Channel;

#[tokio::main]
async fn main() {
    let calls: usize = std::env::var("BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8000);
    let callers: usize = std::env::var("BENCH_CALLERS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let connections: usize =
        std::env::var("BENCH_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(callers).max(1);
    let phases: Vec<String> = std::env::var("BENCH_PHASES")
        .unwrap_or_else(|_| "off,on,traced".to_owned())
        .split(',')
        .map(|p| p.trim().to_owned())
        .collect();
    assert!(phases.iter().all(|p| ["off", "on", "traced"].contains(&p.as_str())), "BENCH_PHASES: off, on, traced");
    let first_on = phases.iter().position(|p| p != "off").unwrap_or(phases.len());
    assert!(phases[first_on..].iter().all(|p| p != "off"), "BENCH_PHASES: no off phase after metrics are on");
    let mut metrics_installed = false;
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let identity = DevIdentityProvider::start("127.0.0.1:0".parse().unwrap(), &kiroku::permissions::ALL).await.unwrap();

    let env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", redis.url.clone()),
        ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
        ("KIROKU_AUTH0_ISSUER", identity.issuer().to_owned()),
        ("KIROKU_AUTH0_AUDIENCE", DEV_AUDIENCE.to_owned()),
        ("KIROKU_API_AUDIENCE", DEV_API_AUDIENCE.to_owned()),
        ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
        ("KIROKU_GITHUB_API_URL", identity.github_api_url()),
        ("KIROKU_COMMAND_ADDR", "127.0.0.1:0".to_owned()),
        ("KIROKU_MIGRATE", "false".to_owned()),
        // Off for the first phase; the second installs the recorder itself.
        ("KIROKU_METRICS_ADDR", "off".to_owned()),
    ];
    let source = move |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
    let settings = kiroku_command::config::Settings::from_source(&source).unwrap();
    let app = kiroku_command::Application::build(settings).await.unwrap();
    let address = app.local_addr();
    let (trigger, shutdown) = Shutdown::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown));

    // Tokens are minted before the clock starts: signing is the caller's cost, not kiroku's.
    let tokens: Vec<String> = (0..phases.len() * calls + 1)
        .map(|n| {
            let account = DevAccount { github_id: 10_000_000 + n as u64, login: format!("bench-{n}") };
            identity.mint(&account, Duration::from_secs(3600)).unwrap()
        })
        .collect();
    let caller = identity.mint_caller(&kiroku::permissions::ALL, Duration::from_secs(3600)).unwrap();
    let mut channels = Vec::new();
    for _ in 0..connections {
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        channels.push(with_caller(channel, &caller));
    }
    let channel = channels[0].clone();
    // Warm up: the first call fetches the JWKS.
    CommandServiceClient::new(channel.clone())
        .register_user(RegisterUserRequest { auth0_token: tokens[0].clone(), request_id: String::new() })
        .await
        .unwrap();

    // Phases in order; once on, metrics (and tracing) stay on for the rest of the run.
    let mut results = Vec::new();
    let mut receiver = None;
    let mut telemetry = None;
    for (n, name) in phases.iter().enumerate() {
        if name != "off" && !metrics_installed {
            kiroku_platform::metrics::install().unwrap();
            metrics_installed = true;
        }
        if name == "traced" && telemetry.is_none() {
            let spans = kiroku_testkit::OtlpReceiver::default();
            let otlp = spans.start().await.unwrap();
            let env = [
                // The append's own steps (BEGIN, claims, events, COMMIT) are debug spans: in the breakdown too.
                ("RUST_LOG", "info,kiroku_event_store=debug".to_owned()),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
                ("OTEL_SERVICE_NAME", "kiroku-command".to_owned()),
            ];
            let source = move |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
            telemetry = Some(kiroku_platform::init_tracing(&source));
            receiver = Some(spans);
        }
        let mut result = phase(&channels, &tokens[1 + n * calls..=(n + 1) * calls], callers).await;
        result["phase"] = json!(name);
        results.push(result);
    }
    drop(telemetry);
    let erase = erase_phase(&channel, &db.pool).await;
    let first_off = results.iter().find(|r| r["phase"] == "off").cloned();
    let relative = |name: &str| {
        let last = results.iter().rev().find(|r| r["phase"] == name)?;
        Some(ratio(last, first_off.as_ref()?))
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "benchmark": "register_user",
            "callers": callers,
            "connections": connections,
            "note": "client and server share this machine's cores; phases run in order on one growing database",
            "phases": results,
            "spans_exported": receiver.as_ref().map(kiroku_testkit::OtlpReceiver::len),
            "stages_ms": receiver.as_ref().map(stages),
            "metrics_on_vs_off": relative("on"),
            "metrics_and_tracing_on_vs_off": relative("traced"),
            "erase": erase,
        }))
        .unwrap()
    );
    trigger.trigger();
    let _ = server.await;
}

/// EraseUser of `BENCH_ERASES` (default 300) users registered above, one call at a time: the latency of one
/// erasure (read the user, look for schema-1 rows, destroy the key, release the claims, append), as JSON.
async fn erase_phase(channel: &CallerChannel, pool: &sqlx::PgPool) -> serde_json::Value {
    let count: i64 = std::env::var("BENCH_ERASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let users: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT aggregate_id FROM events WHERE event_type = 'UserRegistered' LIMIT $1")
            .bind(count)
            .fetch_all(pool)
            .await
            .unwrap();
    let mut client = CommandServiceClient::new(channel.clone());
    let mut latencies = Vec::with_capacity(users.len());
    for user in users {
        let t = Instant::now();
        client
            .erase_user(kiroku::v1::EraseUserRequest { user_id: user.to_string(), request_id: String::new() })
            .await
            .unwrap();
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| kiroku_testkit::percentile(&latencies, p).as_secs_f64() * 1000.0;
    json!({ "calls": latencies.len(), "latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0) } })
}

/// Registers one user per token, `callers` at a time; throughput and latency as JSON.
async fn phase(channels: &[CallerChannel], tokens: &[String], callers: usize) -> serde_json::Value {
    let chunks: Vec<Vec<String>> = tokens.chunks(tokens.len().div_ceil(callers)).map(<[String]>::to_vec).collect();
    let started = Instant::now();
    let tasks: Vec<_> = chunks
        .into_iter()
        .enumerate()
        .map(|(n, chunk)| {
            let mut client = CommandServiceClient::new(channels[n % channels.len()].clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(chunk.len());
                for token in chunk {
                    let t = Instant::now();
                    client
                        .register_user(RegisterUserRequest { auth0_token: token, request_id: String::new() })
                        .await
                        .unwrap();
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
    json!({
        "calls": latencies.len(),
        "seconds": elapsed.as_secs_f64(),
        "calls_per_sec": (latencies.len() as f64 / elapsed.as_secs_f64()).round(),
        "latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0) },
    })
}

fn ratio(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    (a["calls_per_sec"].as_f64().unwrap_or(0.0) / b["calls_per_sec"].as_f64().unwrap_or(1.0) * 1000.0).round() / 1000.0
}

/// Where the time of one RegisterUser goes, from the spans the traced phase exported: per span name, how many
/// arrived (the exporter drops what overflows its queue, so a sample) and their p50 and p99 in milliseconds.
fn stages(receiver: &kiroku_testkit::OtlpReceiver) -> serde_json::Value {
    let stages: serde_json::Map<String, serde_json::Value> = receiver
        .durations()
        .into_iter()
        .map(|(name, mut took)| {
            took.sort_unstable();
            let ms = |p: f64| kiroku_testkit::percentile(&took, p) as f64 / 1e6;
            (name, json!({ "spans": took.len(), "p50": ms(0.5), "p99": ms(0.99) }))
        })
        .collect();
    serde_json::Value::Object(stages)
}
