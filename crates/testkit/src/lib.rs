//! Per-test isolation over the real servers: every test gets its own PostgreSQL database (migrated, dropped when
//! the test ends, even by panic) and its own Redis database (leased from 1..=15, flushed before use, never
//! `FLUSHALL`), plus a unique key prefix.
//!
//! Servers: `KIROKU_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, used only to
//! create and drop databases) and `KIROKU_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgPool};
use ulid::Ulid;

mod otlp;
mod servers;

pub use otlp::{OtlpReceiver, Span as OtlpSpan};
pub use servers::{PrivatePostgres, PrivateRedis};

/// The server that test databases are created on.
/// The master key of every test (`KIROKU_MASTER_KEY`): 32 bytes, base64. Spawned services get it by default.
pub const TEST_MASTER_KEY: &str = "a2lyb2t1LXRlc3QtbWFzdGVyLWtleS0zMi1ieXRlcyE=";

pub fn admin_database_url() -> String {
    std::env::var("KIROKU_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn redis_base_url() -> String {
    std::env::var("KIROKU_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn with_database(url: &str, database: &str) -> String {
    match url.rfind('/') {
        Some(slash) if slash > "postgres://".len() => format!("{}/{database}", &url[..slash]),
        _ => format!("{url}/{database}"),
    }
}

const TEST_DB_PREFIX: &str = "kiroku_test_";

/// A migrated database of its own, dropped when this value is.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A fresh database with every migration applied.
    pub async fn create() -> Result<TestDb> {
        let db = TestDb::create_empty().await?;
        kiroku_event_store::migrate(&db.pool).await.context("migrate test database")?;
        Ok(db)
    }

    /// A fresh database without any table.
    pub async fn create_empty() -> Result<TestDb> {
        let admin_url = admin_database_url();
        let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
        drop_stale_databases(&mut admin).await;
        let name = format!("{TEST_DB_PREFIX}{}", Ulid::new().to_string().to_lowercase());
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.context("create test database")?;
        let url = with_database(&admin_url, &name);
        // The tests' own connections need no TLS on loopback (the services decide for themselves).
        let options = url.parse::<sqlx::postgres::PgConnectOptions>()?.ssl_mode(sqlx::postgres::PgSslMode::Disable);
        let pool = PgPoolOptions::new().max_connections(40).connect_with(options).await?;
        Ok(TestDb { name, url, pool })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on itself: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_database_url()).await {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Drops test databases left by runs that were killed, judged by the time in their ULID (older than two hours).
async fn drop_stale_databases(admin: &mut sqlx::PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>("SELECT datname FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{TEST_DB_PREFIX}%"))
        .fetch_all(&mut *admin)
        .await
    else {
        return;
    };
    let now = std::time::SystemTime::now();
    for name in names {
        let Ok(ulid) = Ulid::from_string(&name[TEST_DB_PREFIX.len()..].to_uppercase()) else {
            continue;
        };
        let stale = now.duration_since(ulid.datetime()).map(|age| age > Duration::from_secs(7200)).unwrap_or(false);
        if stale {
            let _ = admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
        }
    }
}

/// A Redis database leased for one test, and a key prefix of its own.
pub struct TestRedis {
    pub db: u8,
    pub url: String,
    pub prefix: String,
    pub client: Client,
    lease_token: String,
}

const LEASE_TTL: Duration = Duration::from_secs(900);

fn lease_key(db: u8) -> String {
    format!("kiroku-test:lease:{db}")
}

impl TestRedis {
    /// Leases one of the databases 1..=15 (database 0 holds only the leases), waiting while all are taken.
    pub async fn acquire() -> Result<TestRedis> {
        let base = redis_base_url();
        let leases = connect(&format!("{base}/0")).await?;
        let token = Ulid::new().to_string();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            for db in 1..=15u8 {
                let won: Option<String> = leases
                    .set(
                        lease_key(db),
                        token.as_str(),
                        Some(Expiration::PX(LEASE_TTL.as_millis() as i64)),
                        Some(SetOptions::NX),
                        false,
                    )
                    .await?;
                if won.is_some() {
                    let url = format!("{base}/{db}");
                    let client = connect(&url).await?;
                    let _: () = client.custom(fred::cmd!("FLUSHDB"), Vec::<String>::new()).await?;
                    leases.quit().await?;
                    return Ok(TestRedis {
                        db,
                        url,
                        prefix: format!("kt{}", &token[16..].to_lowercase()),
                        client,
                        lease_token: token,
                    });
                }
            }
            if Instant::now() > deadline {
                bail!("no Redis database free for ten minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn events_stream(&self) -> String {
        kiroku_relay::stream::events_key(&self.prefix)
    }

    pub fn dead_letters_stream(&self) -> String {
        kiroku_relay::stream::dead_letters_key(&self.prefix)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let key = lease_key(self.db);
        let token = self.lease_token.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                if let Ok(leases) = connect(&format!("{}/0", redis_base_url())).await {
                    let held: Option<String> = leases.get(&key).await.unwrap_or(None);
                    if held.as_deref() == Some(token.as_str()) {
                        let _: Result<i64, _> = leases.del(&key).await;
                    }
                    let _ = leases.quit().await;
                }
            });
        })
        .join();
    }
}

/// A connected fred client for a Redis URL.
pub async fn connect(url: &str) -> Result<Client> {
    let client = Builder::from_config(Config::from_url(url)?).build()?;
    client.init().await.context("connect to Redis")?;
    Ok(client)
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The path of one of the workspace's binaries, next to the running test executable (`target/<profile>/`).
/// The README's test command builds them before the tests run.
pub fn binary_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/debug/deps/<test>-<hash> → target/debug/<name>
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Which output of a child the test reads.
enum Pipe {
    None,
    Stdout,
    Stderr,
    File(std::path::PathBuf),
}

/// A child process of one of kiroku's binaries, killed (SIGKILL) when dropped.
pub struct ServiceProcess {
    pub child: tokio::process::Child,
}

impl ServiceProcess {
    /// Starts `name` with exactly the given environment (plus PATH and a quiet RUST_LOG).
    pub fn spawn(name: &str, env: &[(&str, String)]) -> Result<ServiceProcess> {
        Self::start(name, &[], env, Pipe::None)
    }

    /// Like [`ServiceProcess::spawn`], with arguments, and standard output piped to the test.
    pub fn spawn_piped(name: &str, args: &[&str], env: &[(&str, String)]) -> Result<ServiceProcess> {
        Self::start(name, args, env, Pipe::Stdout)
    }

    /// Like [`ServiceProcess::spawn`], with standard error (the log) piped to the test, which must read it.
    pub fn spawn_logged(name: &str, env: &[(&str, String)]) -> Result<ServiceProcess> {
        Self::start(name, &[], env, Pipe::Stderr)
    }

    /// Like [`ServiceProcess::spawn`], with standard error (the log) appended to a file.
    pub fn spawn_logging_to(name: &str, env: &[(&str, String)], log: &std::path::Path) -> Result<ServiceProcess> {
        Self::start(name, &[], env, Pipe::File(log.to_owned()))
    }

    fn start(name: &str, args: &[&str], env: &[(&str, String)], pipe: Pipe) -> Result<ServiceProcess> {
        let mut command = tokio::process::Command::new(binary_path(name));
        command.args(args);
        match pipe {
            Pipe::None => {}
            Pipe::Stdout => {
                command.stdout(std::process::Stdio::piped());
            }
            Pipe::Stderr => {
                command.stderr(std::process::Stdio::piped());
            }
            Pipe::File(path) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                command.stdout(std::process::Stdio::null()).stderr(file);
            }
        }
        command.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        command.env("RUST_LOG", std::env::var("KIROKU_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()));
        // Metrics on a port of their own, never the fixed default that concurrent tests would fight over; a test
        // that scrapes sets its own address.
        command.env("KIROKU_METRICS_ADDR", "127.0.0.1:0");
        command.env("KIROKU_MASTER_KEY", TEST_MASTER_KEY);
        for (key, value) in env {
            command.env(key, value);
        }
        command.kill_on_drop(true).stdin(std::process::Stdio::null());
        Ok(ServiceProcess { child: command.spawn().with_context(|| format!("spawn {name}"))? })
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then the exit status (or an error after `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().context("process already gone")?;
        let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(tokio::time::timeout(timeout, self.child.wait()).await.context("no exit before the timeout")??)
    }
}

/// The text of `GET /metrics` at `address` (HTTP/1.0: the server closes the connection after the answer).
pub async fn scrape(address: std::net::SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: kiroku\r\n\r\n").await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
    anyhow::ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_owned())
}

/// The sum of the samples of metric `name` (exactly) whose labels include every `labels` pair, or `None` when
/// no sample matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        if series_name != name || !labels.iter().all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\""))) {
            continue;
        }
        if let Ok(value) = value.parse::<f64>() {
            found = Some(found.unwrap_or(0.0) + value);
        }
    }
    found
}

/// A loopback address with a port that was free a moment ago, for a process whose address must be known in
/// advance. Another process could still take it in between; this process never hands the same port out twice,
/// because the OS may give a port that was just released to the next `bind(0)`, and a test that asks for five
/// addresses at once (or tests running side by side) would then start two services on one port.
pub fn free_address() -> std::net::SocketAddr {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    // Ports already given are held while looking, so that the OS offers others.
    let mut held = Vec::new();
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let address = listener.local_addr().expect("a bound listener has an address");
        if GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(address.port()) {
            return address;
        }
        held.push(listener);
    }
}

/// The path of a command-line tool that the project installs itself (`scripts/install-<name>`, cached under
/// `target/tools/`): grpcurl, buf.
pub fn tool(name: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit/ is in the repository");
    let output = std::process::Command::new(root.join("scripts").join(format!("install-{name}")))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/install-{name}: {e}"));
    assert!(output.status.success(), "scripts/install-{name} failed");
    std::path::PathBuf::from(String::from_utf8(output.stdout).expect("a path").trim())
}

/// A TCP forwarder on loopback that a test can cut, as a network fault or a server crash would: every open
/// connection is reset and new ones are refused until it is restored. Put it between a service and PostgreSQL or
/// Redis to see what the service does when its peer goes away.
pub struct TcpProxy {
    address: std::net::SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards a fresh loopback port to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Result<TcpProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (up, watch) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                let mut watch = watch.clone();
                if !*watch.borrow() {
                    // Refused: closed at once, as a port nobody listens on would be (near enough).
                    let _ = inbound.set_zero_linger();
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|up| !*up) => {
                            // Reset rather than close: the peer sees a broken connection, not a polite goodbye.
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                    }
                });
            }
        });
        Ok(TcpProxy { address, up, task })
    }

    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).expect("a URL");
        parsed.set_ip_host(self.address.ip()).expect("a host");
        parsed.set_port(Some(self.address.port())).expect("a port");
        parsed.to_string()
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.up.send(false);
    }

    pub fn restore(&self) {
        let _ = self.up.send(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC channel whose every call carries `authorization: Bearer <token>`: how a kiroku caller talks to it.
pub type CallerChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

/// Adds a caller token to every request.
#[derive(Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// `channel`, with `token` in every call's metadata.
pub fn with_caller(channel: tonic::transport::Channel, token: &str) -> CallerChannel {
    let value = format!("Bearer {token}").parse().expect("a token is ASCII");
    tonic::service::interceptor::InterceptedService::new(channel, BearerToken(value))
}

/// A channel to a gRPC server that may still be starting (tried for up to 30 s), whose calls carry `token`.
pub async fn connect_caller(address: std::net::SocketAddr, token: &str) -> Result<CallerChannel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?;
    let channel =
        eventually(Duration::from_secs(30), "the gRPC port", || async { Ok(endpoint.connect().await.ok()) }).await?;
    Ok(with_caller(channel, token))
}

/// The nearest-rank percentile `p` (0.0 to 1.0) of values sorted ascending, or the default when there are none.
/// Benchmarks report latencies with it.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    let rank = ((sorted.len().saturating_sub(1)) as f64 * p).round() as usize;
    sorted.get(rank).copied().unwrap_or_default()
}
