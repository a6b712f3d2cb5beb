//! The access log of the three services, read from the real processes' stderr: every RPC, whatever its service
//! and outcome (unary, stream, error, cancelled), ends with exactly one line naming its method, its gRPC code and
//! its latency.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku::v1::{GetUserRequest, ListUsersRequest, RegisterUserRequest, WatchEventsRequest, watch_events_request};
use kiroku_testkit::{ServiceProcess, TestDb, TestRedis, eventually};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A service process whose log lines the test collects as they come.
struct Logged {
    process: ServiceProcess,
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Logged {
    fn start(binary: &str, env: Vec<(&'static str, String)>) -> Logged {
        let mut process = ServiceProcess::spawn_logged(binary, &env).unwrap();
        let stderr = process.child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        let reader = tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Logged { process, lines, reader }
    }

    /// The address from the `… listening address=…` line.
    async fn address(&self) -> String {
        eventually(Duration::from_secs(30), "the service to listen", || async {
            let lines = self.lines.lock().unwrap();
            Ok(lines.iter().find(|l| l.contains(" listening")).and_then(|line| {
                line.split_whitespace().find_map(|word| word.strip_prefix("address=")).map(str::to_owned)
            }))
        })
        .await
        .unwrap()
    }

    /// Stops the process (SIGTERM) and returns its access-log lines.
    async fn stop(self) -> Vec<String> {
        self.stop_all().await.into_iter().filter(|line| line.contains("kiroku::access")).collect()
    }

    /// Stops the process (SIGTERM) and returns every line it logged.
    async fn stop_all(mut self) -> Vec<String> {
        self.process.terminate(Duration::from_secs(10)).await.unwrap();
        self.reader.await.unwrap();
        self.lines.lock().unwrap().clone()
    }
}

/// The access-log lines of `method`, each checked for a code and a latency.
fn lines_of<'a>(lines: &'a [String], method: &str) -> Vec<&'a String> {
    let found: Vec<&String> = lines.iter().filter(|line| line.contains(&format!("method={method}"))).collect();
    for line in &found {
        assert!(line.contains("latency_ms="), "{line}");
    }
    found
}

fn env(db: &TestDb, redis: &TestRedis, issuer: &str) -> Vec<(&'static str, String)> {
    logging_env(
        db,
        redis,
        issuer,
        "warn,kiroku_command=info,kiroku_query=info,kiroku_projector=info,kiroku::access=debug",
    )
}

fn logging_env(db: &TestDb, redis: &TestRedis, issuer: &str, log: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", redis.url.clone()),
        ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
        ("KIROKU_MIGRATE", "false".to_owned()),
        ("RUST_LOG", log.to_owned()),
        ("KIROKU_COMMAND_ADDR", "127.0.0.1:0".to_owned()),
        ("KIROKU_QUERY_ADDR", "127.0.0.1:0".to_owned()),
        ("KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
        ("KIROKU_AUTH0_ISSUER", issuer.to_owned()),
        ("KIROKU_AUTH0_AUDIENCE", "kiroku-tests".to_owned()),
        ("KIROKU_API_AUDIENCE", "kiroku-callers".to_owned()),
        ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
    ]
}

#[tokio::test]
async fn every_rpc_of_every_service_logs_one_line_with_its_code_and_latency() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    // The tenant whose keys sign the callers' tokens.
    let key = kiroku_dev_identity::SigningKey::generate().unwrap();
    let auth0 = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/.well-known/jwks.json"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(kiroku_dev_identity::jwks(&[&key])))
        .mount(&auth0)
        .await;
    let issuer = format!("{}/", auth0.uri());
    let caller = key
        .mint_caller(&issuer, "kiroku-callers", "tests", &kiroku::permissions::ALL, Duration::from_secs(600))
        .unwrap();
    let command = Logged::start("kiroku-command", env(&db, &redis, &issuer));
    let query = Logged::start("kiroku-query", env(&db, &redis, &issuer));
    let projector = Logged::start("kiroku-projector", env(&db, &redis, &issuer));
    let connect = |address: String| {
        let caller = caller.clone();
        async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap();
            kiroku_testkit::with_caller(channel.connect().await.unwrap(), &caller)
        }
    };

    let mut commands = CommandServiceClient::new(connect(command.address().await).await);
    let no_token = RegisterUserRequest { auth0_token: String::new(), request_id: "req-access-1".to_owned() };
    assert_eq!(commands.register_user(no_token).await.unwrap_err().code(), Code::InvalidArgument);
    let garbage = RegisterUserRequest { auth0_token: "not-a-jwt".to_owned(), request_id: String::new() };
    assert_eq!(commands.register_user(garbage).await.unwrap_err().code(), Code::Unauthenticated);

    let mut queries = QueryServiceClient::new(connect(query.address().await).await);
    queries.list_users(ListUsersRequest::default()).await.unwrap();
    let bad_id = GetUserRequest { user_id: "nope".to_owned(), min_position: 0 };
    assert_eq!(queries.get_user(bad_id).await.unwrap_err().code(), Code::InvalidArgument);
    let request =
        WatchEventsRequest { start: Some(watch_events_request::Start::FromBeginning(true)), ..Default::default() };
    let mut stream = queries.watch_events(request).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    // The client goes away mid-stream.
    drop(stream);

    let projector_address = projector.address().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{projector_address}")).unwrap();
    let mut health = HealthClient::new(channel.connect().await.unwrap());
    health.check(HealthCheckRequest { service: String::new() }).await.unwrap();

    // Lines are written when a call ends; the cancelled stream ends when the server notices.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let command_lines = command.stop().await;
    let query_lines = query.stop().await;
    let projector_lines = projector.stop().await;

    let register = lines_of(&command_lines, "/kiroku.v1.CommandService/RegisterUser");
    assert_eq!(register.len(), 2, "{command_lines:#?}");
    assert!(
        register[0].contains("code=INVALID_ARGUMENT")
            && register[0].contains("request_id=\"req-access-1\"")
            && register[0].contains("caller=\"tests@clients\""),
        "{}",
        register[0]
    );
    assert!(register[1].contains("code=UNAUTHENTICATED"));
    let list = lines_of(&query_lines, "/kiroku.v1.QueryService/ListUsers");
    assert_eq!(list.len(), 1, "{query_lines:#?}");
    assert!(list[0].contains("code=OK"));
    let get = lines_of(&query_lines, "/kiroku.v1.QueryService/GetUser");
    assert_eq!(get.len(), 1);
    assert!(get[0].contains("code=INVALID_ARGUMENT"));
    let watch = lines_of(&query_lines, "/kiroku.v1.QueryService/WatchEvents");
    assert_eq!(watch.len(), 1, "{query_lines:#?}");
    assert!(watch[0].contains("code=CANCELLED") || watch[0].contains("code=UNAVAILABLE"), "{}", watch[0]);
    let check = lines_of(&projector_lines, "/grpc.health.v1.Health/Check");
    assert_eq!(check.len(), 1, "{projector_lines:#?}");
    assert!(check[0].contains("code=OK"));
}

/// Logs never hold personal fields, only ids of users and events: the three services run with kiroku's every
/// debug line on through a user's whole life (registration, a refused duplicate, a profile change, a
/// deactivation with a reason, an erasure, reads, a watch), and no line names the person in any way.
#[tokio::test]
async fn no_log_line_of_any_service_holds_personal_data() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let key = kiroku_dev_identity::SigningKey::generate().unwrap();
    let auth0 = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/.well-known/jwks.json"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(kiroku_dev_identity::jwks(&[&key])))
        .mount(&auth0)
        .await;
    const GITHUB_ID: u64 = 618_033_988;
    let github = wiremock::MockServer::start().await;
    let profile = |login: &str, name: &str, priority: u8| {
        wiremock::Mock::given(wiremock::matchers::path(format!("/user/{GITHUB_ID}")))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "id": GITHUB_ID, "login": login, "name": name,
                "avatar_url": format!("https://avatars.example.test/{login}.png"),
            })))
            .with_priority(priority)
    };
    profile("qx-logged-login-6180", "Quill Xanthe-Logwatch", 5).mount(&github).await;
    let issuer = format!("{}/", auth0.uri());
    let caller = key
        .mint_caller(&issuer, "kiroku-callers", "tests", &kiroku::permissions::ALL, Duration::from_secs(600))
        .unwrap();
    let token = key.mint(&issuer, "kiroku-tests", GITHUB_ID, Duration::from_secs(600)).unwrap();
    let log = "debug,h2=info,hyper=info,hyper_util=info,tower=info,sqlx=info,fred=info,reqwest=info,rustls=info";
    let mut command_env = logging_env(&db, &redis, &issuer, log);
    command_env.push(("KIROKU_GITHUB_API_URL", github.uri()));
    let command = Logged::start("kiroku-command", command_env);
    let query = Logged::start("kiroku-query", logging_env(&db, &redis, &issuer, log));
    let projector = Logged::start("kiroku-projector", logging_env(&db, &redis, &issuer, log));
    let connect = |address: String| {
        let caller = caller.clone();
        async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap();
            kiroku_testkit::with_caller(channel.connect().await.unwrap(), &caller)
        }
    };
    let mut commands = CommandServiceClient::new(connect(command.address().await).await);
    let mut queries = QueryServiceClient::new(connect(query.address().await).await);

    let register = || RegisterUserRequest { auth0_token: token.clone(), request_id: "qx-register".to_owned() };
    let user_id = commands.register_user(register()).await.unwrap().into_inner().user_id;
    commands.register_user(register()).await.unwrap();
    let duplicate = RegisterUserRequest { auth0_token: token.clone(), request_id: String::new() };
    assert_eq!(commands.register_user(duplicate).await.unwrap_err().code(), Code::AlreadyExists);
    profile("qx-renamed-login-6180", "Quill Xanthe-Renamed", 1).mount(&github).await;
    let sync = kiroku::v1::SyncGitHubProfileRequest {
        auth0_token: token.clone(),
        request_id: String::new(),
        expected_version: 0,
    };
    assert!(commands.sync_git_hub_profile(sync).await.unwrap().into_inner().changed);
    let deactivate = kiroku::v1::DeactivateUserRequest {
        user_id: user_id.clone(),
        reason: "qx-reason-asked-by-Quill".to_owned(),
        request_id: String::new(),
        expected_version: 0,
    };
    commands.deactivate_user(deactivate).await.unwrap();
    let history =
        kiroku::v1::GetUserHistoryRequest { user_id: user_id.clone(), page_size: 0, page_token: String::new() };
    assert_eq!(queries.get_user_history(history).await.unwrap().into_inner().events.len(), 3);
    let watch =
        WatchEventsRequest { start: Some(watch_events_request::Start::FromBeginning(true)), ..Default::default() };
    let mut stream = queries.watch_events(watch).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    let erase = kiroku::v1::EraseUserRequest { user_id: user_id.clone(), request_id: String::new() };
    let erased = commands.erase_user(erase).await.unwrap().into_inner();
    let user = GetUserRequest { user_id: user_id.clone(), min_position: erased.position };
    assert!(queries.get_user(user).await.unwrap().into_inner().user.unwrap().erased);

    let mut lines = command.stop_all().await;
    lines.extend(query.stop_all().await);
    lines.extend(projector.stop_all().await);
    assert!(lines.iter().any(|line| line.contains(&user_id)), "the logs name users by id");
    assert!(lines.iter().any(|line| line.contains("user erased")), "the command's lines were read: {lines:#?}");
    let needles = [
        "qx-logged-login-6180".to_owned(),
        "qx-renamed-login-6180".to_owned(),
        "Xanthe".to_owned(),
        "avatars.example.test".to_owned(),
        "qx-reason".to_owned(),
        format!("github|{GITHUB_ID}"),
        GITHUB_ID.to_string(),
    ];
    for needle in &needles {
        let found: Vec<&String> = lines.iter().filter(|line| line.contains(needle.as_str())).collect();
        assert!(found.is_empty(), "a log line holds {needle:?}: {found:#?}");
    }
}

/// Bytes as they are: to send a request that is not a valid protobuf message.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let remaining = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, remaining).to_vec()))
    }
}

/// Hostile input, from a campaign of them: a malformed message is INTERNAL (as the gRPC status guide says) but is
/// told apart from kiroku's own failures in the access log and the metrics; input echoed back (an unknown filter
/// field, an unknown event type, a path) is cut to ~128 characters in statuses and in logs.
#[tokio::test]
async fn malformed_requests_are_told_apart_and_echoed_input_is_bounded() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let key = kiroku_dev_identity::SigningKey::generate().unwrap();
    let auth0 = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/.well-known/jwks.json"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(kiroku_dev_identity::jwks(&[&key])))
        .mount(&auth0)
        .await;
    let issuer = format!("{}/", auth0.uri());
    let caller = key
        .mint_caller(&issuer, "kiroku-callers", "tests", &kiroku::permissions::ALL, Duration::from_secs(600))
        .unwrap();
    let metrics = kiroku_testkit::free_address();
    let mut query_env = env(&db, &redis, &issuer);
    query_env.push(("KIROKU_METRICS_ADDR", metrics.to_string()));
    let query = Logged::start("kiroku-query", query_env);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", query.address().await)).unwrap();
    let channel = kiroku_testkit::with_caller(channel.connect().await.unwrap(), &caller);

    // A truncated varint where ListUsersRequest's first field should be.
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/kiroku.v1.QueryService/ListUsers");
    let malformed = raw.unary(tonic::Request::new(vec![0x08, 0x80]), path, Raw).await.unwrap_err();
    assert_eq!(malformed.code(), Code::Internal, "{malformed:?}");
    // A path of 12 KB.
    let long = format!("/kiroku.v1.QueryService/{}", "x".repeat(12_000));
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(long.as_str()).unwrap();
    let unknown = raw.unary(tonic::Request::new(Vec::new()), path, Raw).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented, "{unknown:?}");

    // A megabyte where a name should be: refused, and echoed in a few hundred bytes at most.
    let mut queries = QueryServiceClient::new(channel);
    let huge = "y".repeat(1 << 20);
    let filter = ListUsersRequest { filter: format!("{huge} = \"x\""), ..Default::default() };
    let refused = queries.list_users(filter).await.unwrap_err();
    let watch = WatchEventsRequest { event_types: vec![huge.clone()], ..Default::default() };
    let unknown_type = queries.watch_events(watch).await.unwrap_err();
    let many = WatchEventsRequest { event_types: vec!["UserRegistered".to_owned(); 65], ..Default::default() };
    let too_many = queries.watch_events(many).await.unwrap_err();
    for status in [&refused, &unknown_type, &too_many] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().len() < 400, "{} bytes", status.message().len());
        assert!(status.details().len() < 1_000, "{} bytes of details", status.details().len());
    }

    let scraped = eventually(Duration::from_secs(10), "the counted calls", || async {
        let text = kiroku_testkit::scrape(metrics).await?;
        let labels = [("method", "ListUsers"), ("code", "INTERNAL"), ("malformed", "true")];
        Ok(kiroku_testkit::metric(&text, "kiroku_grpc_server_handled_total", &labels).map(|_| text))
    })
    .await
    .unwrap();
    let internal = [("code", "INTERNAL"), ("malformed", "false")];
    assert_eq!(
        kiroku_testkit::metric(&scraped, "kiroku_grpc_server_handled_total", &internal),
        None,
        "no fault of kiroku's"
    );
    let lines = query.stop().await;
    let malformed_line = lines_of(&lines, "/kiroku.v1.QueryService/ListUsers");
    assert!(
        malformed_line.iter().any(|line| line.contains("code=INTERNAL") && line.contains("malformed=true")),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(line.len() < 1_000, "an access-log line of {} bytes", line.len());
    }
}
