//! Whole-system test helpers: the real services started in-process on port 0, over a per-test PostgreSQL
//! database and Redis database, with wiremock standing in for Auth0's JWKS and GitHub's API.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod direct;

use std::net::SocketAddr;
use std::time::Duration;

use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku::v1::{RegisterUserRequest, RegisterUserResponse};
use kiroku_dev_identity::SigningKey;
use kiroku_platform::{Shutdown, ShutdownTrigger};
use kiroku_testkit::{CallerChannel, TestDb, TestRedis, with_caller};
use serde_json::json;
use tonic::transport::Channel;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

pub const AUDIENCE: &str = "https://kiroku.test/api";
/// The audience of callers' tokens (`authorization: Bearer`).
pub const API_AUDIENCE: &str = "https://kiroku.test/callers";

/// A client of CommandService or QueryService whose calls carry a caller token.
pub type Commands = CommandServiceClient<CallerChannel>;
pub type Queries = QueryServiceClient<CallerChannel>;

/// The command service, running, with its stubs.
pub struct CommandApp {
    pub address: SocketAddr,
    /// Holds a caller token with every permission.
    pub client: Commands,
    pub db: TestDb,
    pub redis: TestRedis,
    /// Serves `/.well-known/jwks.json` (the issuer is this server's URL).
    pub auth0: MockServer,
    /// Serves `/user/{id}`.
    pub github: MockServer,
    pub key: SigningKey,
    trigger: ShutdownTrigger,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// One key for the whole test binary: RSA key generation takes a while.
pub fn shared_key() -> SigningKey {
    static KEY: std::sync::OnceLock<SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap()).clone()
}

pub fn other_key() -> SigningKey {
    static KEY: std::sync::OnceLock<SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap()).clone()
}

impl CommandApp {
    pub async fn spawn() -> CommandApp {
        CommandApp::spawn_with(&[]).await
    }

    /// Starts the service with extra settings (e.g. `KIROKU_GITHUB_TIMEOUT_MS`).
    pub async fn spawn_with(extra: &[(&str, &str)]) -> CommandApp {
        CommandApp::spawn_configured(extra, None).await
    }

    /// Starts the service with its database connections going through a proxy the test can cut.
    pub async fn spawn_behind_proxy() -> (CommandApp, kiroku_testkit::TcpProxy) {
        let proxy = kiroku_testkit::TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await.unwrap();
        let app = CommandApp::spawn_configured(&[], Some(&proxy)).await;
        (app, proxy)
    }

    async fn spawn_configured(extra: &[(&str, &str)], proxy: Option<&kiroku_testkit::TcpProxy>) -> CommandApp {
        CommandApp::spawn_prepared(TestRedis::acquire().await.unwrap(), extra, proxy).await
    }

    /// Starts the service with settings that depend on its Redis database (a Redis user for its prefix, say).
    pub async fn spawn_with_redis<F, Fut>(prepare: F) -> CommandApp
    where
        F: FnOnce(u8, String) -> Fut,
        Fut: std::future::Future<Output = Vec<(String, String)>>,
    {
        let redis = TestRedis::acquire().await.unwrap();
        let extra = prepare(redis.db, redis.prefix.clone()).await;
        let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        CommandApp::spawn_prepared(redis, &extra, None).await
    }

    async fn spawn_prepared(
        redis: TestRedis,
        extra: &[(&str, &str)],
        proxy: Option<&kiroku_testkit::TcpProxy>,
    ) -> CommandApp {
        let db = TestDb::create().await.unwrap();
        let auth0 = MockServer::start().await;
        let github = MockServer::start().await;
        let key = shared_key();
        Mock::given(method("GET"))
            .and(path("/.well-known/jwks.json"))
            .respond_with(ResponseTemplate::new(200).set_body_json(kiroku_dev_identity::jwks(&[&key])))
            .named("jwks")
            .mount(&auth0)
            .await;

        let database_url = proxy.map_or_else(|| db.url.clone(), |proxy| proxy.url(&db.url));
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), database_url),
            ("REDIS_URL".into(), redis.url.clone()),
            ("KIROKU_REDIS_PREFIX".into(), redis.prefix.clone()),
            ("KIROKU_AUTH0_ISSUER".into(), format!("{}/", auth0.uri())),
            ("KIROKU_AUTH0_AUDIENCE".into(), AUDIENCE.into()),
            ("KIROKU_API_AUDIENCE".into(), API_AUDIENCE.into()),
            ("KIROKU_MASTER_KEY".into(), kiroku_testkit::TEST_MASTER_KEY.into()),
            // Tests refuse one identity many times on purpose; the limit has a test of its own.
            ("KIROKU_REFUSALS_PER_MINUTE".into(), "1000".into()),
            ("KIROKU_GITHUB_API_URL".into(), github.uri()),
            ("KIROKU_COMMAND_ADDR".into(), "127.0.0.1:0".into()),
            ("KIROKU_MIGRATE".into(), "false".into()),
            // In-process services share the test's one recorder; the metrics tests scrape real processes.
            ("KIROKU_METRICS_ADDR".into(), "off".into()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).into(), (*v).into()));
        }
        let source = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let settings = kiroku_command::config::Settings::from_source(&source).unwrap();
        let app = kiroku_command::Application::build(settings).await.unwrap();
        let address = app.local_addr();
        let (trigger, shutdown) = Shutdown::new();
        let server = tokio::spawn(app.run_until_stopped(shutdown));
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let caller = caller_token(&key, &format!("{}/", auth0.uri()), &kiroku::permissions::ALL);
        CommandApp {
            address,
            client: CommandServiceClient::new(with_caller(channel, &caller)),
            db,
            redis,
            auth0,
            github,
            key,
            trigger,
            server,
        }
    }

    pub fn issuer(&self) -> String {
        format!("{}/", self.auth0.uri())
    }

    /// A caller token of this app's tenant with `permissions`.
    pub fn caller_token(&self, permissions: &[&str]) -> String {
        caller_token(&self.key, &self.issuer(), permissions)
    }

    /// A valid token for `github|<id>`, signed with the published key.
    pub fn token(&self, github_id: u64) -> String {
        self.key.mint(&self.issuer(), AUDIENCE, github_id, Duration::from_secs(3600)).unwrap()
    }

    /// Makes GitHub know the account.
    pub async fn github_knows(&self, github_id: u64, login: &str, name: Option<&str>) {
        Mock::given(method("GET"))
            .and(path(format!("/user/{github_id}")))
            .respond_with(ResponseTemplate::new(200).insert_header("ETag", format!("\"{login}-etag\"")).set_body_json(
                json!({
                    "id": github_id,
                    "login": login,
                    "name": name,
                    "avatar_url": format!("https://avatars.githubusercontent.com/u/{github_id}"),
                }),
            ))
            .named(format!("github user {github_id}"))
            .mount(&self.github)
            .await;
    }

    pub async fn register(&self, github_id: u64, request_id: &str) -> Result<RegisterUserResponse, tonic::Status> {
        let mut client = self.client.clone();
        client
            .register_user(RegisterUserRequest {
                auth0_token: self.token(github_id),
                request_id: request_id.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn count_events(&self, event_type: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
            .bind(event_type)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    pub async fn total_events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&self.db.pool).await.unwrap()
    }

    pub async fn stop(self) {
        self.trigger.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
    }
}

/// A caller token (a machine-to-machine client's) of the tenant `issuer` with `permissions`.
pub fn caller_token(key: &SigningKey, issuer: &str, permissions: &[&str]) -> String {
    key.mint_caller(issuer, API_AUDIENCE, "tests", permissions, Duration::from_secs(3600)).unwrap()
}

/// The ErrorInfo reason of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason).unwrap_or_default()
}

/// A query service or a projector running in-process next to a [`CommandApp`].
pub struct Running {
    pub address: SocketAddr,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.trigger.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

impl CommandApp {
    /// The settings every service of this test shares, plus `extra`.
    pub fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), self.db.url.clone()),
            ("REDIS_URL".into(), self.redis.url.clone()),
            ("KIROKU_REDIS_PREFIX".into(), self.redis.prefix.clone()),
            ("KIROKU_QUERY_ADDR".into(), "127.0.0.1:0".into()),
            ("KIROKU_AUTH0_ISSUER".into(), self.issuer()),
            ("KIROKU_API_AUDIENCE".into(), API_AUDIENCE.into()),
            ("KIROKU_MASTER_KEY".into(), kiroku_testkit::TEST_MASTER_KEY.into()),
            ("KIROKU_PROJECTOR_HEALTH_ADDR".into(), "127.0.0.1:0".into()),
            ("KIROKU_MIGRATE".into(), "false".into()),
            ("KIROKU_METRICS_ADDR".into(), "off".into()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).into(), (*v).into()));
        }
        env
    }

    /// Another command service on this app's database, Redis and stubs: one that starts after the test changed
    /// the database under the first (loaded rows of an older kiroku, say).
    pub async fn start_command(&self) -> (Running, Commands) {
        let github = self.github.uri();
        let env = self.env(&[
            ("KIROKU_AUTH0_AUDIENCE", AUDIENCE),
            ("KIROKU_GITHUB_API_URL", &github),
            ("KIROKU_COMMAND_ADDR", "127.0.0.1:0"),
            ("KIROKU_REFUSALS_PER_MINUTE", "1000"),
        ]);
        let source = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let settings = kiroku_command::config::Settings::from_source(&source).unwrap();
        let app = kiroku_command::Application::build(settings).await.unwrap();
        let address = app.local_addr();
        let (trigger, shutdown) = Shutdown::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown));
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let caller = self.caller_token(&kiroku::permissions::ALL);
        (Running { address, trigger, task }, CommandServiceClient::new(with_caller(channel, &caller)))
    }

    pub async fn start_query(&self, extra: &[(&str, &str)]) -> (Running, Queries) {
        let env = self.env(extra);
        let source = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let app = kiroku_query::Application::build(kiroku_query::config::Settings::from_source(&source).unwrap())
            .await
            .unwrap();
        let address = app.local_addr();
        let (trigger, shutdown) = Shutdown::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown));
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let caller = self.caller_token(&kiroku::permissions::ALL);
        (Running { address, trigger, task }, QueryServiceClient::new(with_caller(channel, &caller)))
    }

    pub async fn start_projector(&self, extra: &[(&str, &str)]) -> Running {
        let env = self.env(extra);
        let source = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let app =
            kiroku_projector::Application::build(kiroku_projector::config::Settings::from_source(&source).unwrap())
                .await
                .unwrap();
        let address = app.health_addr().unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown));
        Running { address, trigger, task }
    }

    /// The env of a spawned projector process.
    pub fn projector_process_env(&self, extra: &[(&str, &str)]) -> Vec<(&'static str, String)> {
        self.env(extra).into_iter().map(|(k, v)| (&*Box::leak(k.into_boxed_str()), v)).collect()
    }

    /// This app's dead-letter stream, as a rebuild in the test publishes to it.
    pub async fn dead_letter_stream(&self) -> kiroku_projector::dead_letters::DeadLetterStream {
        let redis = kiroku_testkit::connect(&self.redis.url).await.unwrap();
        kiroku_projector::dead_letters::DeadLetterStream::new(redis, &self.redis.prefix)
    }

    /// The rows of `users_read`, in id order, as JSON (for comparing whole read models).
    pub async fn users_read(&self) -> Vec<serde_json::Value> {
        sqlx::query_scalar("SELECT to_jsonb(u) FROM users_read u ORDER BY id").fetch_all(&self.db.pool).await.unwrap()
    }

    /// Waits until `users_read` holds `count` users.
    pub async fn wait_for_users(&self, count: i64) {
        kiroku_testkit::eventually(Duration::from_secs(60), &format!("{count} users in users_read"), || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM users_read").fetch_one(&self.db.pool).await?;
            Ok((n >= count).then_some(()))
        })
        .await
        .unwrap();
    }
}

pub use kiroku::v1::query_service_client::QueryServiceClient;

/// Stored payloads of `event_type` as readers see them: personal fields opened with the tests' master key (the
/// log keeps them sealed).
pub async fn open_payloads(
    pool: &sqlx::PgPool,
    event_type: &str,
    payloads: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    let store = kiroku_event_store::EventStore::new(pool.clone());
    let master = kiroku_vault::MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).unwrap();
    let vault = kiroku_vault::Vault::new(store, std::sync::Arc::new(master));
    let events = payloads
        .into_iter()
        .map(|data| kiroku_event_store::RecordedEvent {
            position: kiroku_event_store::Position::ZERO,
            event_id: ulid::Ulid::new(),
            aggregate_id: uuid::Uuid::nil(),
            aggregate_type: String::new(),
            event_type: event_type.to_owned(),
            version: kiroku_event_store::Version::from(1u16),
            data,
            metadata: json!({ "schema_version": kiroku_domain::SCHEMA_VERSION }),
            occurred_at: chrono::Utc::now(),
            created_at: chrono::Utc::now(),
        })
        .collect();
    vault.open(events).await.unwrap().into_iter().map(|e| e.data).collect()
}

/// One stored payload, opened (see [`open_payloads`]).
pub async fn open_payload(pool: &sqlx::PgPool, event_type: &str, data: serde_json::Value) -> serde_json::Value {
    open_payloads(pool, event_type, vec![data]).await.remove(0)
}

/// GetUser, once the read model has reached `min_position`.
pub async fn get_user(client: &Queries, user_id: &str, min_position: u64) -> kiroku::v1::User {
    client
        .clone()
        .get_user(kiroku::v1::GetUserRequest { user_id: user_id.to_owned(), min_position })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

/// Every event of a user (one page is enough for the few events of these tests).
pub async fn history(client: &Queries, user_id: &str) -> Vec<kiroku::v1::Event> {
    let page = client
        .clone()
        .get_user_history(kiroku::v1::GetUserHistoryRequest {
            user_id: user_id.to_owned(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_page_token.is_empty(), "one page holds the whole history");
    page.events
}

/// A field of an event's `data` (or any Struct).
pub fn field<'a>(s: &'a prost_types::Struct, name: &str) -> Option<&'a prost_types::value::Kind> {
    s.fields.get(name).and_then(|value| value.kind.as_ref())
}
