//! Metrics, scraped from the real processes' `GET /metrics`: the counters and gauges move with real calls (an
//! RPC error, a dead letter, a horizon held back by an open transaction), and every query of the Grafana
//! dashboard names a metric the services export.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku::v1::{
    GetUserRequest, RegisterUserRequest, WatchEventsRequest, watch_events_request, watch_events_response,
};
use kiroku_dev_identity::SigningKey;
use kiroku_testkit::{
    CallerChannel, ServiceProcess, TestDb, TestRedis, binary_path, connect_caller, eventually, free_address, metric,
    scrape,
};
use serde_json::json;
use tonic::Code;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const USER_AUDIENCE: &str = "kiroku-tests";
const API_AUDIENCE: &str = "kiroku-callers";

/// The three services as processes, with their stand-ins for Auth0 and GitHub.
struct System {
    db: TestDb,
    redis: TestRedis,
    issuer: String,
    key: SigningKey,
    github: MockServer,
    _auth0: MockServer,
    _processes: Vec<ServiceProcess>,
    commands: CommandServiceClient<CallerChannel>,
    queries: QueryServiceClient<CallerChannel>,
    /// `GET /metrics` of the command, query and projector processes.
    command_metrics: SocketAddr,
    query_metrics: SocketAddr,
    projector_metrics: SocketAddr,
}

impl System {
    async fn start() -> System {
        let db = TestDb::create().await.unwrap();
        let redis = TestRedis::acquire().await.unwrap();
        let key = SigningKey::generate().unwrap();
        let auth0 = MockServer::start().await;
        Mock::given(path("/.well-known/jwks.json"))
            .respond_with(ResponseTemplate::new(200).set_body_json(kiroku_dev_identity::jwks(&[&key])))
            .mount(&auth0)
            .await;
        let github = MockServer::start().await;
        let issuer = format!("{}/", auth0.uri());
        let (command_addr, query_addr) = (free_address(), free_address());
        let (command_metrics, query_metrics, projector_metrics) = (free_address(), free_address(), free_address());
        let env = |metrics: SocketAddr| {
            vec![
                ("DATABASE_URL", db.url.clone()),
                ("REDIS_URL", redis.url.clone()),
                ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
                ("KIROKU_MIGRATE", "false".to_owned()),
                ("KIROKU_AUTH0_ISSUER", issuer.clone()),
                ("KIROKU_AUTH0_AUDIENCE", USER_AUDIENCE.to_owned()),
                ("KIROKU_API_AUDIENCE", API_AUDIENCE.to_owned()),
                ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
                ("KIROKU_GITHUB_API_URL", github.uri()),
                ("KIROKU_COMMAND_ADDR", command_addr.to_string()),
                ("KIROKU_QUERY_ADDR", query_addr.to_string()),
                ("KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
                ("KIROKU_PROJECTOR_MAX_ATTEMPTS", "2".to_owned()),
                ("KIROKU_METRICS_ADDR", metrics.to_string()),
            ]
        };
        let names = ["kiroku-command", "kiroku-query", "kiroku-projector"];
        let mut processes: Vec<ServiceProcess> = names
            .iter()
            .zip([command_metrics, query_metrics, projector_metrics])
            .map(|(name, metrics)| ServiceProcess::spawn(name, &env(metrics)).unwrap())
            .collect();
        for address in [command_metrics, query_metrics, projector_metrics] {
            let served = eventually(Duration::from_secs(30), "metrics to be served", || async {
                Ok(scrape(address).await.ok())
            })
            .await;
            if let Err(error) = served {
                // Which process is gone, and how (its log went to this test's stderr): a port taken in between
                // shows here as an exit, not as a silent timeout.
                let exited: Vec<String> = names
                    .iter()
                    .zip(&mut processes)
                    .filter_map(|(name, p)| p.child.try_wait().ok().flatten().map(|status| format!("{name}: {status}")))
                    .collect();
                panic!("{error:#} at {address}; exited: {exited:?}");
            }
        }
        let caller = key.mint_caller(&issuer, API_AUDIENCE, "tests", &kiroku::permissions::ALL, HOUR).unwrap();
        let commands = CommandServiceClient::new(connect_caller(command_addr, &caller).await.unwrap());
        let queries = QueryServiceClient::new(connect_caller(query_addr, &caller).await.unwrap());
        System {
            db,
            redis,
            issuer,
            key,
            github,
            _auth0: auth0,
            _processes: processes,
            commands,
            queries,
            command_metrics,
            query_metrics,
            projector_metrics,
        }
    }

    /// RegisterUser for GitHub account `github_id`, which GitHub knows.
    async fn register(&self, github_id: u64, request_id: &str) -> Result<String, tonic::Status> {
        Mock::given(method("GET"))
            .and(path(format!("/user/{github_id}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": github_id, "login": format!("user{github_id}"), "name": null,
                "avatar_url": format!("https://avatars.githubusercontent.com/u/{github_id}"),
            })))
            .mount(&self.github)
            .await;
        let token = self.key.mint(&self.issuer, USER_AUDIENCE, github_id, HOUR).unwrap();
        let request = RegisterUserRequest { auth0_token: token, request_id: request_id.to_owned() };
        self.commands.clone().register_user(request).await.map(|r| r.into_inner().user_id)
    }

    /// Waits until `check` holds for the metrics at `address`; returns the text it held on.
    async fn until(&self, address: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
        let last = std::sync::Mutex::new(String::new());
        let found = eventually(Duration::from_secs(30), what, || async {
            let text = scrape(address).await?;
            let held = check(&text);
            *last.lock().unwrap() = text.clone();
            Ok(held.then_some(text))
        })
        .await;
        found.unwrap_or_else(|error| panic!("{error:#}\n{}", last.lock().unwrap()))
    }

    /// `kiroku projector status`, as JSON.
    async fn projector_status(&self) -> serde_json::Value {
        let output = tokio::process::Command::new(binary_path("kiroku"))
            .args(["projector", "status"])
            .env_clear()
            .env("DATABASE_URL", &self.db.url)
            .env("REDIS_URL", &self.redis.url)
            .env("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY)
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(-1.0)
}

#[tokio::test]
async fn counters_move_with_real_calls_and_the_dashboard_names_only_exported_metrics() {
    let system = System::start().await;
    let user_id = system.register(501, "req-metrics-1").await.unwrap();
    let again = system.register(501, "req-metrics-2").await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let missing = GetUserRequest { user_id: uuid::Uuid::now_v7().to_string(), min_position: 0 };
    assert_eq!(system.queries.clone().get_user(missing).await.unwrap_err().code(), Code::NotFound);
    let request =
        WatchEventsRequest { start: Some(watch_events_request::Start::FromBeginning(true)), ..Default::default() };
    let mut stream = system.queries.clone().watch_events(request).await.unwrap().into_inner();
    while !matches!(stream.message().await.unwrap().unwrap().kind, Some(watch_events_response::Kind::CaughtUp(_))) {}

    let rpc = |method: &'static str, code: &'static str| {
        move |text: &str, service: &str| {
            value(text, "kiroku_grpc_server_handled_total", &[("service", service), ("method", method), ("code", code)])
        }
    };
    let command = system
        .until(system.command_metrics, "the command's counters", |text| {
            let service = "kiroku.v1.CommandService";
            rpc("RegisterUser", "OK")(text, service) == 1.0
                && rpc("RegisterUser", "ALREADY_EXISTS")(text, service) == 1.0
                && value(text, "kiroku_event_store_events_appended_total", &[]) >= 1.0
                && value(text, "kiroku_dependency_requests_total", &[("dependency", "github"), ("outcome", "ok")])
                    == 1.0
                && value(text, "kiroku_dependency_requests_total", &[("dependency", "jwks"), ("outcome", "ok")]) >= 1.0
                && value(text, "kiroku_relay_leader", &[]) == 1.0
                && value(text, "kiroku_relay_events_published_total", &[]) >= 1.0
        })
        .await;
    // The refused duplicate never reached GitHub (the identity's owner is asked first).
    assert_eq!(value(&command, "kiroku_dependency_requests_total", &[("dependency", "github")]), 1.0, "{command}");
    assert!(value(&command, "kiroku_grpc_server_handling_seconds_count", &[("method", "RegisterUser")]) >= 2.0);
    let query = system
        .until(system.query_metrics, "the query's counters", |text| {
            rpc("GetUser", "NOT_FOUND")(text, "kiroku.v1.QueryService") == 1.0
                && value(text, "kiroku_watch_streams", &[("phase", "live")]) == 1.0
                && value(text, "kiroku_watch_events_delivered_total", &[("mode", "replay")]) >= 1.0
        })
        .await;
    let projector = system
        .until(system.projector_metrics, "the projector's gauges", |text| {
            value(text, "kiroku_projector_events_applied_total", &[]) >= 1.0
                // The registration went in by a run's multi-row insert, not by the event-by-event fallback.
                && value(text, "kiroku_projector_events_batched_total", &[]) >= 1.0
                && value(text, "kiroku_projector_checkpoint_position", &[("projection", "users")]) > 0.0
                && value(text, "kiroku_event_store_head_position", &[]) > 0.0
                && value(text, "kiroku_projector_lag_events", &[]) == 0.0
                && value(text, "kiroku_postgres_pool_connections", &[("state", "idle")]) >= 0.0
        })
        .await;
    drop(stream);
    // A stream that ends leaves the gauge.
    system
        .until(system.query_metrics, "the closed stream to leave the gauge", |text| {
            value(text, "kiroku_watch_streams", &[("phase", "live")]) == 0.0
        })
        .await;

    // Labels are bounded: no user id, anywhere.
    for text in [&command, &query, &projector] {
        assert!(!text.contains(&user_id), "a user id in a label:\n{text}");
    }

    // Every query of the dashboard names only metrics that the services export.
    let exported: BTreeSet<String> = [&command, &query, &projector]
        .iter()
        .flat_map(|text| text.lines())
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards/kiroku.json"))
            .unwrap(),
    )
    .unwrap();
    let mut named = BTreeSet::new();
    let mut graphs = 0;
    for panel in dashboard["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        graphs += 1;
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "a panel without a query: {}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "a query that names no kiroku metric: {expr}");
            for name in names {
                assert!(exported.contains(&name), "{expr} names {name}, which no service exports:\n{exported:#?}");
                named.insert(name);
            }
        }
    }
    assert!(graphs >= 12 && named.len() >= 25, "{graphs} panels naming {named:?}");
}

/// The `kiroku_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("kiroku_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        // A label value like service=~"kiroku.v1.*" has a dot, not an underscore: only metric names match.
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn a_held_horizon_and_a_dead_letter_show_in_the_projector_metrics_and_its_status() {
    let system = System::start().await;
    system.register(601, "req-stall-0").await.unwrap();
    system
        .until(system.projector_metrics, "the first user projected", |text| {
            value(text, "kiroku_projector_events_applied_total", &[]) >= 1.0
                && value(text, "kiroku_projector_lag_events", &[]) == 0.0
        })
        .await;

    // A transaction with an id, left open: everything committed after it waits above the horizon.
    let mut holder = system.db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *holder).await.unwrap();
    system.register(602, "req-stall-1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled = system
        .until(system.projector_metrics, "the stall in the metrics", |text| {
            value(text, "kiroku_horizon_undeliverable_events", &[]) >= 1.0
                && value(text, "kiroku_horizon_oldest_transaction_seconds", &[]) >= 1.0
        })
        .await;
    let status = system.projector_status().await;
    assert_eq!(
        status["undeliverable_events"].as_f64(),
        Some(value(&stalled, "kiroku_horizon_undeliverable_events", &[])),
        "{status}"
    );
    assert!(status["oldest_transaction_seconds"].as_f64().unwrap() >= 1.0, "{status}");
    holder.rollback().await.unwrap();
    system
        .until(system.projector_metrics, "the stall to clear", |text| {
            value(text, "kiroku_horizon_undeliverable_events", &[]) == 0.0
                && value(text, "kiroku_projector_lag_events", &[]) == 0.0
                && value(text, "kiroku_projector_events_applied_total", &[]) >= 2.0
        })
        .await;

    // A stray read-model row takes the Auth0 id of GitHub account 603: its registration cannot apply.
    sqlx::query(
        "INSERT INTO users_read_rows (generation, id, auth0_id, github_id, github_username, display_name, status, \
         created_at, updated_at, version, position, registered_position) \
         VALUES (1, gen_random_uuid(), 'github|603', 'x', 'x', 'x', 'active', now(), now(), 1, 0, 0)",
    )
    .execute(&system.db.pool)
    .await
    .unwrap();
    system.register(603, "req-dead-1").await.unwrap();
    system
        .until(system.projector_metrics, "the dead letter in the metrics", |text| {
            value(text, "kiroku_projector_dead_lettered_total", &[]) == 1.0
                && value(text, "kiroku_projector_dead_letters", &[]) == 1.0
                && value(text, "kiroku_projector_parked_aggregates", &[]) == 1.0
        })
        .await;
    assert_eq!(system.projector_status().await["dead_letters"].as_u64(), Some(1));
}
