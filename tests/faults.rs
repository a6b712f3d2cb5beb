//! The fault suite: the invariants of ARCHITECTURE.md, together, under load, while processes die and servers
//! restart.
//!
//! It owns its servers (a private PostgreSQL cluster and a private Redis, which it crashes) and runs the real
//! binaries: two command processes (so that relay leadership moves), a query process and two projectors.
//! Callers register fresh identities and sync profiles, retrying with the same request id on UNAVAILABLE or a
//! broken connection, as a real caller would; subscribers follow WatchEvents and resume after their last
//! position when a stream breaks. On a schedule drawn from a seeded generator (the seed is printed; set
//! `KIROKU_FAULTS_SEED` to rerun one), processes are SIGKILLed (some restarted with a fail point, to die mid-batch
//! or mid-step), Redis is killed and restarted empty, PostgreSQL is crashed and restarted, the GitHub stand-in goes
//! slow and failing, and the JWKS endpoint goes down. Then everything is brought back, the load stops, and the
//! checks run: every acknowledged command is in the log exactly once and in the read model, no identity has two
//! users, the read model equals a fresh rebuild, every subscriber saw exactly the log, nothing is dead-lettered,
//! and the projection reached the head. A JSON summary is printed.
//!
//! `KIROKU_FAULTS_SECONDS` sets how long the load and the faults last (default 45: the short mode CI runs);
//! `KIROKU_FAULTS_KEEP_LOGS=1` keeps the processes' logs (they are kept anyway when a check fails).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku::v1::{
    RegisterUserRequest, SyncGitHubProfileRequest, WatchEventsRequest, watch_events_request, watch_events_response,
};
use kiroku_dev_identity::SigningKey;
use kiroku_event_store::{EventStore, Position};
use kiroku_testkit::{PrivatePostgres, PrivateRedis, ServiceProcess, free_address, with_caller};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const AUDIENCE: &str = "kiroku-faults";
const API_AUDIENCE: &str = "kiroku-faults-callers";

// ---------------------------------------------------------------------------------------------------------------
// Stand-ins for Auth0's JWKS and GitHub's API, whose failures the suite controls.

const GITHUB_OK: u8 = 0;
const GITHUB_SLOW: u8 = 1;
const GITHUB_FAILING: u8 = 2;

struct Stubs {
    github: AtomicU8,
    jwks_down: AtomicBool,
    jwks: serde_json::Value,
    /// The login revision of each account: SyncGitHubProfile sees a change when it moves.
    revisions: Mutex<HashMap<u64, u32>>,
}

async fn serve_jwks(State(stubs): State<Arc<Stubs>>) -> impl IntoResponse {
    if stubs.jwks_down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({}))).into_response();
    }
    Json(stubs.jwks.clone()).into_response()
}

async fn serve_user(State(stubs): State<Arc<Stubs>>, Path(id): Path<u64>) -> impl IntoResponse {
    match stubs.github.load(Ordering::Relaxed) {
        GITHUB_SLOW => tokio::time::sleep(Duration::from_millis(1500)).await,
        GITHUB_FAILING => return (StatusCode::BAD_GATEWAY, Json(json!({ "message": "bad gateway" }))).into_response(),
        _ => {}
    }
    let revision = stubs.revisions.lock().unwrap().get(&id).copied().unwrap_or(0);
    Json(json!({ "id": id, "login": format!("user{id}-{revision}"), "name": null, "avatar_url": null })).into_response()
}

async fn start_stubs(key: &SigningKey) -> (Arc<Stubs>, String) {
    let stubs = Arc::new(Stubs {
        github: AtomicU8::new(GITHUB_OK),
        jwks_down: AtomicBool::new(false),
        jwks: kiroku_dev_identity::jwks(&[key]),
        revisions: Mutex::default(),
    });
    let app = Router::new()
        .route("/.well-known/jwks.json", get(serve_jwks))
        .route("/user/{id}", get(serve_user))
        .with_state(stubs.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (stubs, uri)
}

// ---------------------------------------------------------------------------------------------------------------
// The processes, each on a fixed address so that a restart comes back where its clients look.

struct Proc {
    binary: &'static str,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    process: Option<ServiceProcess>,
    /// Deliberately down (between a kill and its planned restart): the supervisor leaves it alone.
    held: bool,
}

impl Proc {
    fn start(&mut self, failpoint: Option<String>) {
        let mut env = self.env.clone();
        if let Some(failpoint) = failpoint {
            env.push(("KIROKU_FAILPOINT", failpoint));
        }
        self.process = Some(ServiceProcess::spawn_logging_to(self.binary, &env, &self.log).unwrap());
        self.held = false;
    }

    async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await;
        }
    }

    fn exited(&mut self) -> bool {
        self.process.as_mut().is_none_or(|p| p.child.try_wait().ok().flatten().is_some())
    }
}

struct Cluster {
    procs: Vec<Proc>,
    command: [SocketAddr; 2],
    query: SocketAddr,
    projector_health: [SocketAddr; 2],
}

const COMMAND_A: usize = 0;
const COMMAND_B: usize = 1;
const QUERY: usize = 2;
const PROJECTOR_A: usize = 3;
const PROJECTOR_B: usize = 4;

fn cluster(database_url: &str, redis_url: &str, stubs_uri: &str, logs: &std::path::Path) -> Cluster {
    let command = [free_address(), free_address()];
    let query = free_address();
    let projector_health = [free_address(), free_address()];
    let common = |extra: Vec<(&'static str, String)>| {
        let mut env = vec![
            ("DATABASE_URL", database_url.to_owned()),
            ("REDIS_URL", redis_url.to_owned()),
            ("KIROKU_MIGRATE", "false".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        env.extend(extra);
        env
    };
    let command_env = |address: SocketAddr| {
        common(vec![
            ("KIROKU_COMMAND_ADDR", address.to_string()),
            ("KIROKU_AUTH0_ISSUER", format!("{stubs_uri}/")),
            ("KIROKU_AUTH0_AUDIENCE", AUDIENCE.to_owned()),
            ("KIROKU_API_AUDIENCE", API_AUDIENCE.to_owned()),
            ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
            ("KIROKU_GITHUB_API_URL", stubs_uri.to_owned()),
            ("KIROKU_GITHUB_TIMEOUT_MS", "500".to_owned()),
            // Callers retry through GitHub outages and sync the few first users again and again: the per-subject
            // limit (tested on its own) would turn those into refusals.
            ("KIROKU_REFUSALS_PER_MINUTE", "1000000".to_owned()),
            // Small batches, so that a fail point can stop the relay in the middle of one.
            ("KIROKU_RELAY_BATCH_SIZE", "50".to_owned()),
        ])
    };
    let projector_env = |address: SocketAddr| {
        common(vec![
            ("KIROKU_PROJECTOR_HEALTH_ADDR", address.to_string()),
            ("KIROKU_PROJECTOR_CLAIM_IDLE_MS", "1000".to_owned()),
        ])
    };
    let proc = |binary, env, name: &str| Proc {
        binary,
        env,
        log: logs.join(format!("{name}.log")),
        process: None,
        held: false,
    };
    Cluster {
        procs: vec![
            proc("kiroku-command", command_env(command[0]), "command-a"),
            proc("kiroku-command", command_env(command[1]), "command-b"),
            proc(
                "kiroku-query",
                common(vec![
                    ("KIROKU_QUERY_ADDR", query.to_string()),
                    ("KIROKU_AUTH0_ISSUER", format!("{stubs_uri}/")),
                    ("KIROKU_API_AUDIENCE", API_AUDIENCE.to_owned()),
                    ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
                ]),
                "query",
            ),
            proc("kiroku-projector", projector_env(projector_health[0]), "projector-a"),
            proc("kiroku-projector", projector_env(projector_health[1]), "projector-b"),
        ],
        command,
        query,
        projector_health,
    }
}

fn channel(address: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// The callers' token: every permission, for the whole run.
fn caller_token(key: &SigningKey, issuer: &str) -> String {
    key.mint_caller(issuer, API_AUDIENCE, "faults", &kiroku::permissions::ALL, Duration::from_secs(6 * 3600)).unwrap()
}

async fn serving(address: SocketAddr) -> Option<ServingStatus> {
    let mut health = HealthClient::new(channel(address));
    let response = health.check(HealthCheckRequest { service: String::new() }).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

// ---------------------------------------------------------------------------------------------------------------
// What the load observed.

#[derive(Default)]
struct Ledger {
    /// Acknowledged registrations: GitHub id → user id.
    registered: Mutex<BTreeMap<u64, String>>,
    /// Acknowledged syncs that wrote an event: (user id, request id, position).
    synced: Mutex<Vec<(String, String, u64)>>,
    retried: AtomicU64,
    duplicated: AtomicU64,
    /// Definitive answers that should never happen (INTERNAL, and the like), by code.
    unexpected: Mutex<BTreeMap<String, u64>>,
    /// Retryable answers, by code and reason.
    transient: Mutex<BTreeMap<String, u64>>,
}

impl Ledger {
    fn note_transient(&self, status: &tonic::Status) {
        use tonic_types::StatusExt;
        let reason = status.get_details_error_info().map(|i| i.reason).unwrap_or_default();
        *self.transient.lock().unwrap().entry(format!("{:?}:{reason}", status.code())).or_default() += 1;
    }

    fn note_unexpected(&self, status: &tonic::Status) {
        *self.unexpected.lock().unwrap().entry(format!("{:?}: {}", status.code(), status.message())).or_default() += 1;
    }
}

/// Retried with the same request id: the outcome of the first attempt is unknown, or the service is briefly away.
fn retryable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
}

async fn registrar(
    id: usize,
    commands: [SocketAddr; 2],
    key: SigningKey,
    issuer: String,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    next_identity: Arc<AtomicU64>,
) {
    let caller = caller_token(&key, &issuer);
    let clients = commands.map(|a| CommandServiceClient::new(with_caller(channel(a), &caller)));
    let mut attempt = id;
    while !stop.load(Ordering::Relaxed) {
        let github_id = next_identity.fetch_add(1, Ordering::Relaxed);
        let token = key.mint(&issuer, AUDIENCE, github_id, Duration::from_secs(3600)).unwrap();
        let request_id = uuid::Uuid::new_v4().to_string();
        loop {
            attempt += 1;
            let mut client = clients[attempt % 2].clone();
            let request = RegisterUserRequest { auth0_token: token.clone(), request_id: request_id.clone() };
            match client.register_user(request).await {
                Ok(response) => {
                    let user_id = response.into_inner().user_id;
                    if ledger.registered.lock().unwrap().insert(github_id, user_id).is_some() {
                        ledger.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                // A fresh identity with one request id can only be refused as a duplicate if it was registered
                // twice.
                Err(status) if status.code() == Code::AlreadyExists => {
                    ledger.duplicated.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(status) if retryable(&status) => {
                    ledger.note_transient(&status);
                    ledger.retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => {
                    ledger.note_unexpected(&status);
                    break;
                }
            }
        }
    }
}

async fn syncer(
    id: usize,
    commands: [SocketAddr; 2],
    key: SigningKey,
    issuer: String,
    stubs: Arc<Stubs>,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let caller = caller_token(&key, &issuer);
    let clients = commands.map(|a| CommandServiceClient::new(with_caller(channel(a), &caller)));
    let mut attempt = id;
    let mut rng = StdRng::seed_from_u64(id as u64);
    while !stop.load(Ordering::Relaxed) {
        // One syncer per residue class of GitHub ids: two never race for one user.
        let candidates: Vec<(u64, String)> = ledger
            .registered
            .lock()
            .unwrap()
            .iter()
            .filter(|(github_id, _)| **github_id % 2 == id as u64)
            .map(|(g, u)| (*g, u.clone()))
            .collect();
        let Some((github_id, user_id)) = candidates.choose(&mut rng).cloned() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        *stubs.revisions.lock().unwrap().entry(github_id).or_default() += 1;
        let token = key.mint(&issuer, AUDIENCE, github_id, Duration::from_secs(3600)).unwrap();
        let request_id = uuid::Uuid::new_v4().to_string();
        loop {
            attempt += 1;
            let mut client = clients[attempt % 2].clone();
            let request = SyncGitHubProfileRequest {
                auth0_token: token.clone(),
                request_id: request_id.clone(),
                expected_version: 0,
            };
            match client.sync_git_hub_profile(request).await {
                Ok(response) => {
                    let synced = response.into_inner();
                    if synced.changed {
                        ledger.synced.lock().unwrap().push((user_id.clone(), request_id.clone(), synced.position));
                    }
                    break;
                }
                Err(status) if retryable(&status) => {
                    ledger.note_transient(&status);
                    ledger.retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => {
                    ledger.note_unexpected(&status);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one subscriber received, its reconnections joined.
#[derive(Default)]
struct Watched {
    positions: Vec<u64>,
    reconnections: u64,
}

async fn watcher(query: SocketAddr, caller: String, watched: Arc<Mutex<Watched>>, stop: Arc<AtomicBool>) {
    let channel = Endpoint::from_shared(format!("http://{query}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    let client = QueryServiceClient::new(with_caller(channel, &caller));
    // Everything at or below it has been received (events, or progress marks that cover the rest).
    let mut resume: Option<u64> = None;
    while !stop.load(Ordering::Relaxed) {
        let start = match resume {
            None => watch_events_request::Start::FromBeginning(true),
            Some(position) => watch_events_request::Start::AfterPosition(position),
        };
        let request = WatchEventsRequest { start: Some(start), ..Default::default() };
        let mut stream = match client.clone().watch_events(request).await {
            Ok(response) => response.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = tokio::time::sleep(Duration::from_millis(200)), if stop.load(Ordering::Relaxed) => return,
            };
            match message {
                Ok(Some(message)) => match message.kind {
                    Some(watch_events_response::Kind::Event(event)) => {
                        watched.lock().unwrap().positions.push(event.position);
                        resume = Some(event.position);
                    }
                    Some(watch_events_response::Kind::Progress(p)) => {
                        resume = Some(p.position.max(resume.unwrap_or(0)))
                    }
                    Some(watch_events_response::Kind::CaughtUp(c)) => {
                        resume = Some(c.position.max(resume.unwrap_or(0)))
                    }
                    None => {}
                },
                // The stream broke (the query process died, or shut down): resume after what was received.
                Ok(None) | Err(_) => break,
            }
        }
        watched.lock().unwrap().reconnections += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The faults.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Fault {
    KillCommand,
    KillRelayMidBatch,
    KillQuery,
    KillProjector,
    KillProjectorMidStep,
    RedisRestartedEmpty,
    PostgresCrash,
    GitHubSlow,
    GitHubFailing,
    JwksDown,
}

const FAULTS: [Fault; 10] = [
    Fault::KillCommand,
    Fault::KillRelayMidBatch,
    Fault::KillQuery,
    Fault::KillProjector,
    Fault::KillProjectorMidStep,
    Fault::RedisRestartedEmpty,
    Fault::PostgresCrash,
    Fault::GitHubSlow,
    Fault::GitHubFailing,
    Fault::JwksDown,
];

struct Faults {
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    postgres: Arc<PrivatePostgres>,
    redis: Arc<tokio::sync::Mutex<PrivateRedis>>,
    stubs: Arc<Stubs>,
    injected: BTreeMap<Fault, u64>,
    /// The health probes said NOT_SERVING while Redis was down (query and projector), and SERVING after.
    redis_health_checked: bool,
}

impl Faults {
    async fn inject(&mut self, fault: Fault, rng: &mut StdRng) {
        *self.injected.entry(fault).or_default() += 1;
        let pause = Duration::from_millis(rng.gen_range(300..1500));
        match fault {
            Fault::KillCommand | Fault::KillQuery | Fault::KillProjector => {
                let index = match fault {
                    Fault::KillCommand => [COMMAND_A, COMMAND_B][rng.gen_range(0..2)],
                    Fault::KillQuery => QUERY,
                    _ => [PROJECTOR_A, PROJECTOR_B][rng.gen_range(0..2)],
                };
                self.kill_and_restart(index, pause, None).await;
            }
            Fault::KillRelayMidBatch => {
                // Restarted with a fail point: it aborts after publishing a chunk, before its checkpoint.
                let index = [COMMAND_A, COMMAND_B][rng.gen_range(0..2)];
                let failpoint = format!("relay.after_chunk:{}", rng.gen_range(1..4));
                self.kill_and_restart(index, pause, Some(failpoint)).await;
            }
            Fault::KillProjectorMidStep => {
                let index = [PROJECTOR_A, PROJECTOR_B][rng.gen_range(0..2)];
                let failpoint = format!("projector.before_commit:{}", rng.gen_range(1..4));
                self.kill_and_restart(index, pause, Some(failpoint)).await;
            }
            Fault::RedisRestartedEmpty => {
                self.redis.lock().await.kill();
                if !self.redis_health_checked {
                    self.redis_health_checked = self.health_is(ServingStatus::NotServing).await;
                }
                tokio::time::sleep(pause).await;
                self.redis.lock().await.start_again().unwrap();
                if self.redis_health_checked {
                    assert!(self.health_is(ServingStatus::Serving).await, "health back to SERVING after Redis");
                }
            }
            Fault::PostgresCrash => {
                self.postgres.crash().unwrap();
                tokio::time::sleep(pause).await;
                self.postgres.start_again().unwrap();
            }
            Fault::GitHubSlow | Fault::GitHubFailing => {
                let mode = if fault == Fault::GitHubSlow { GITHUB_SLOW } else { GITHUB_FAILING };
                self.stubs.github.store(mode, Ordering::Relaxed);
                tokio::time::sleep(pause * 2).await;
                self.stubs.github.store(GITHUB_OK, Ordering::Relaxed);
            }
            Fault::JwksDown => {
                // With a command process restarted meanwhile: its key cache is empty, so it needs the JWKS.
                self.stubs.jwks_down.store(true, Ordering::Relaxed);
                let index = [COMMAND_A, COMMAND_B][rng.gen_range(0..2)];
                self.kill_and_restart(index, pause, None).await;
                tokio::time::sleep(pause).await;
                self.stubs.jwks_down.store(false, Ordering::Relaxed);
            }
        }
    }

    async fn kill_and_restart(&self, index: usize, pause: Duration, failpoint: Option<String>) {
        {
            let mut cluster = self.cluster.lock().await;
            cluster.procs[index].held = true;
            cluster.procs[index].kill().await;
        }
        tokio::time::sleep(pause).await;
        self.cluster.lock().await.procs[index].start(failpoint);
    }

    /// Whether the query service and a projector report `status` within a few seconds.
    async fn health_is(&self, status: ServingStatus) -> bool {
        let (query, projector) = {
            let cluster = self.cluster.lock().await;
            (cluster.query, cluster.projector_health[0])
        };
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if serving(query).await == Some(status) && serving(projector).await == Some(status) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// Restarts processes that died by themselves (a fail point) and are not held down.
async fn supervise(cluster: Arc<tokio::sync::Mutex<Cluster>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut cluster = cluster.lock().await;
        for proc in &mut cluster.procs {
            if !proc.held && proc.exited() {
                proc.start(None);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn active_checkpoint(pool: &PgPool) -> Option<Position> {
    sqlx::query_scalar(
        "SELECT c.position FROM projections p JOIN projection_checkpoints c \
         ON c.projection = p.name AND c.generation = p.active_generation WHERE p.name = 'users'",
    )
    .fetch_one(pool)
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invariants_hold_together_under_load_while_processes_die_and_servers_restart() {
    let seed: u64 = std::env::var("KIROKU_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    let seconds: u64 = std::env::var("KIROKU_FAULTS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(45);
    eprintln!("fault suite: seed {seed}, {seconds} s (rerun with KIROKU_FAULTS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let postgres = Arc::new(PrivatePostgres::start().unwrap());
    let admin = PgPool::connect(&postgres.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE kiroku").execute(&admin).await.unwrap();
    let database_url = postgres.url("kiroku");
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&database_url).await.unwrap();
    kiroku_event_store::migrate(&pool).await.unwrap();
    let redis = Arc::new(tokio::sync::Mutex::new(PrivateRedis::start().unwrap()));
    let redis_url = redis.lock().await.url(0);
    let key = SigningKey::generate().unwrap();
    let (stubs, stubs_uri) = start_stubs(&key).await;
    let issuer = format!("{stubs_uri}/");
    let logs = std::env::temp_dir().join(format!("kiroku-faults-{seed}"));
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("fault suite: process logs in {}", logs.display());

    let cluster = Arc::new(tokio::sync::Mutex::new(cluster(&database_url, &redis_url, &stubs_uri, &logs)));
    let (commands, query) = {
        let mut cluster = cluster.lock().await;
        for proc in &mut cluster.procs {
            proc.start(None);
        }
        (cluster.command, cluster.query)
    };
    for address in [commands[0], commands[1], query] {
        eventually("the services to serve", Duration::from_secs(60), || async move {
            (serving(address).await == Some(ServingStatus::Serving)).then_some(())
        })
        .await;
    }

    // The load.
    let ledger = Arc::new(Ledger::default());
    let stop_load = Arc::new(AtomicBool::new(false));
    let next_identity = Arc::new(AtomicU64::new(1_000_000));
    let mut load = Vec::new();
    for id in 0..4 {
        load.push(tokio::spawn(registrar(
            id,
            commands,
            key.clone(),
            issuer.clone(),
            ledger.clone(),
            stop_load.clone(),
            next_identity.clone(),
        )));
    }
    for id in 0..2 {
        load.push(tokio::spawn(syncer(
            id,
            commands,
            key.clone(),
            issuer.clone(),
            stubs.clone(),
            ledger.clone(),
            stop_load.clone(),
        )));
    }
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watched: Vec<Arc<Mutex<Watched>>> = (0..3).map(|_| Arc::default()).collect();
    let watchers: Vec<_> = watched
        .iter()
        .map(|w| tokio::spawn(watcher(query, caller_token(&key, &issuer), w.clone(), stop_watching.clone())))
        .collect();
    let stop_supervising = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(supervise(cluster.clone(), stop_supervising.clone()));

    // The faults: every kind once in a random order, then at random, until the time is up.
    let mut faults = Faults {
        cluster: cluster.clone(),
        postgres: postgres.clone(),
        redis: redis.clone(),
        stubs: stubs.clone(),
        injected: BTreeMap::new(),
        redis_health_checked: false,
    };
    let started = Instant::now();
    let mut schedule = FAULTS.to_vec();
    schedule.shuffle(&mut rng);
    while started.elapsed() < Duration::from_secs(seconds) {
        let fault = if schedule.is_empty() { FAULTS[rng.gen_range(0..FAULTS.len())] } else { schedule.remove(0) };
        faults.inject(fault, &mut rng).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2500))).await;
    }

    // Quiescence: everything back, the load finishes what it started, the projection and the subscribers reach
    // the head.
    stubs.github.store(GITHUB_OK, Ordering::Relaxed);
    stubs.jwks_down.store(false, Ordering::Relaxed);
    stop_load.store(true, Ordering::Relaxed);
    for task in load {
        tokio::time::timeout(Duration::from_secs(120), task).await.expect("callers finish once faults stop").unwrap();
    }
    let store = EventStore::new(pool.clone());
    let head = eventually("the log to be final", Duration::from_secs(60), || async {
        let head = store.head().await.ok()?;
        (store.safe_horizon().await.ok()? >= head).then_some(head)
    })
    .await;
    eventually("the projection to reach the head", Duration::from_secs(120), || async {
        (active_checkpoint(&pool).await? >= head).then_some(())
    })
    .await;
    for w in &watched {
        eventually("every subscriber to reach the head", Duration::from_secs(120), || async {
            (w.lock().unwrap().positions.last().copied() >= Some(head.get())).then_some(())
        })
        .await;
    }
    stop_watching.store(true, Ordering::Relaxed);
    for task in watchers {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    stop_supervising.store(true, Ordering::Relaxed);
    let _ = supervisor.await;

    // The checks.
    let registered = ledger.registered.lock().unwrap().clone();
    let synced = ledger.synced.lock().unwrap().clone();
    assert!(!registered.is_empty(), "the load registered someone");
    assert_eq!(ledger.duplicated.load(Ordering::Relaxed), 0, "no registration was acknowledged twice");
    assert!(
        ledger.unexpected.lock().unwrap().is_empty(),
        "unexpected answers: {:?}",
        ledger.unexpected.lock().unwrap()
    );

    // Every acknowledged registration: its user once in the log, once in the read model.
    let in_log: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT aggregate_id::text, count(*) FROM events WHERE event_type = 'UserRegistered' GROUP BY aggregate_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let in_read_model: HashSet<String> =
        sqlx::query_scalar("SELECT id::text FROM users_read").fetch_all(&pool).await.unwrap().into_iter().collect();
    let mut lost = 0;
    for user_id in registered.values() {
        match in_log.get(user_id) {
            Some(1) => {}
            Some(n) => panic!("user {user_id} was registered {n} times in the log"),
            None => lost += 1,
        }
        assert!(in_read_model.contains(user_id), "acknowledged user {user_id} is not in users_read");
    }
    assert_eq!(lost, 0, "acknowledged registrations missing from the log");
    // No identity has two users, in the log or in the read model.
    // (Identities are sealed in the log: opened first.)
    let registered: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT event_data FROM events WHERE event_type = 'UserRegistered'")
            .fetch_all(&pool)
            .await
            .unwrap();
    let registered = common::open_payloads(&pool, "UserRegistered", registered).await;
    let subjects: Vec<&str> = registered.iter().filter_map(|data| data["personal"]["auth0_id"].as_str()).collect();
    assert_eq!(subjects.len(), registered.len(), "every registration opens");
    let distinct: std::collections::HashSet<&str> = subjects.iter().copied().collect();
    assert_eq!(distinct.len(), subjects.len(), "an identity has two users");
    let read_doubled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT github_id FROM users_read GROUP BY 1 HAVING count(*) > 1) d")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(read_doubled, 0);
    // Every acknowledged sync that changed something is in the log once, where its answer said.
    for (user_id, request_id, position) in &synced {
        let (at_position, with_request): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE position = $3), count(*) FILTER (WHERE metadata->>'request_id' = $2) \
             FROM events WHERE aggregate_id = $1::uuid AND event_type = 'UserProfileUpdated'",
        )
        .bind(user_id)
        .bind(request_id)
        .bind(*position as i64)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((at_position, with_request), (1, 1), "sync {request_id} of {user_id} at {position}");
    }

    // Every subscriber received exactly the log, in position order.
    let mut log = Vec::new();
    let mut after = Position::ZERO;
    loop {
        let batch = store.read_batch(after, 5000).await.unwrap();
        log.extend(batch.events.iter().map(|e| e.position.get()));
        if !batch.full {
            break;
        }
        after = batch.through;
    }
    let mut deliveries = 0;
    let mut reconnections = 0;
    for (n, w) in watched.iter().enumerate() {
        let w = w.lock().unwrap();
        if w.positions != log {
            let seen: HashSet<u64> = w.positions.iter().copied().collect();
            let missing: Vec<u64> = log.iter().copied().filter(|p| !seen.contains(p)).take(20).collect();
            let mut counted = HashSet::new();
            let doubled: Vec<u64> = w.positions.iter().copied().filter(|p| !counted.insert(*p)).take(20).collect();
            panic!(
                "subscriber {n} did not see exactly the log: {} delivered, {} in the log, missing {missing:?}, \
                 delivered twice {doubled:?}",
                w.positions.len(),
                log.len()
            );
        }
        deliveries += w.positions.len();
        reconnections += w.reconnections;
    }

    // Nothing dead-lettered or parked; the read model equals a fresh rebuild, row for row.
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_failures").fetch_one(&pool).await.unwrap();
    assert_eq!(failures, 0, "no dead letter, no parked aggregate, no failing event");
    let (from_stream, from_store): (i64, i64) = sqlx::query_as(
        "SELECT c.from_stream, c.from_store FROM projections p JOIN projection_checkpoints c \
         ON c.projection = p.name AND c.generation = p.active_generation WHERE p.name = 'users'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let snapshot = |pool: PgPool| async move {
        sqlx::query_scalar::<_, serde_json::Value>("SELECT to_jsonb(u) FROM users_read u ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let live = snapshot(pool.clone()).await;
    {
        let mut cluster = cluster.lock().await;
        for index in [PROJECTOR_A, PROJECTOR_B] {
            cluster.procs[index].kill().await;
        }
    }
    let projection = kiroku_projector::Projection::new(
        pool.clone(),
        5,
        kiroku_vault::MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).map(std::sync::Arc::new).unwrap(),
    );
    let dead_letters = kiroku_projector::dead_letters::DeadLetterStream::new(
        kiroku_testkit::connect(&redis_url).await.unwrap(),
        "kiroku",
    );
    kiroku_projector::rebuild::rebuild(&pool, &projection, &dead_letters).await.unwrap();
    let rebuilt = snapshot(pool.clone()).await;
    assert_eq!(live.len(), rebuilt.len(), "users_read has the rows a rebuild produces");
    assert!(live == rebuilt, "users_read equals what a fresh rebuild produces, row for row");
    assert!(
        faults.redis_health_checked || !faults.injected.contains_key(&Fault::RedisRestartedEmpty),
        "with Redis down, query and projector health said NOT_SERVING"
    );

    let summary = json!({
        "seed": seed,
        "seconds": seconds,
        "faults": faults.injected.iter().map(|(k, v)| (format!("{k:?}"), *v)).collect::<BTreeMap<_, _>>(),
        "redis_loss_health_checked": faults.redis_health_checked,
        "register": {
            "acknowledged": registered.len(),
            "lost": lost,
            "duplicated": ledger.duplicated.load(Ordering::Relaxed),
        },
        "sync": { "acknowledged_changes": synced.len() },
        "calls_retried": ledger.retried.load(Ordering::Relaxed),
        "retryable_answers": ledger.transient.lock().unwrap().clone(),
        "events_in_log": log.len(),
        "watch": { "subscribers": watched.len(), "reconnections": reconnections, "deliveries_checked": deliveries },
        "projector": { "events_from_redis": from_stream, "events_from_postgres": from_store },
    });
    println!("{summary}");
    eprintln!("fault suite summary: {summary}");
    // The processes' logs stay when a check failed (the panic skips this), or when asked to.
    if std::env::var_os("KIROKU_FAULTS_KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&logs);
    }
}
