//! Traces and JSON logs, from the real processes: a RegisterUser that carries a W3C `traceparent` continues that
//! trace in the command service's span, which an in-process OTLP receiver gets along with the relay's publish
//! and the projector's apply, both linked to it; the event's metadata carries the trace to WatchEvents
//! subscribers; and the JSON log lines of the call carry its trace id, with OTLP export on or off.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku::v1::{
    ListUsersRequest, RegisterUserRequest, WatchEventsRequest, watch_events_request, watch_events_response,
};
use kiroku_dev_identity::SigningKey;
use kiroku_testkit::{OtlpReceiver, ServiceProcess, TestDb, TestRedis, connect_caller, eventually, free_address};
use serde_json::json;
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The JSON objects of a log file, each complete line checked to be one (the process may be writing the last).
fn json_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).unwrap();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}")))
        .collect()
}

/// The trace id of the access-log line of `method` in a JSON log.
fn access_trace_id(lines: &[serde_json::Value], method: &str) -> Option<String> {
    lines
        .iter()
        .find(|line| line["fields"]["message"] == "rpc finished" && line["span"]["method"] == method)
        .and_then(|line| line["span"]["trace_id"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_registration_is_one_trace_from_grpc_to_the_projector_and_its_logs_carry_the_trace_id() {
    let db = TestDb::create().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let key = SigningKey::generate().unwrap();
    let auth0 = MockServer::start().await;
    Mock::given(path("/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(kiroku_dev_identity::jwks(&[&key])))
        .mount(&auth0)
        .await;
    let github = MockServer::start().await;
    Mock::given(path("/user/701"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": 701, "login": "traced", "name": null})))
        .mount(&github)
        .await;
    let receiver = OtlpReceiver::default();
    // The command service exports over OTLP/gRPC, the projector over OTLP/HTTP (the specification's default).
    let (otlp_grpc, otlp_http) = (receiver.start().await.unwrap(), receiver.start_http().await.unwrap());
    let issuer = format!("{}/", auth0.uri());
    let (command_addr, query_addr) = (free_address(), free_address());
    let logs = tempfile_dir();
    let env = |otlp: Option<(&str, SocketAddr)>| {
        let mut env = vec![
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", redis.url.clone()),
            ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
            ("KIROKU_MIGRATE", "false".to_owned()),
            ("KIROKU_AUTH0_ISSUER", issuer.clone()),
            ("KIROKU_AUTH0_AUDIENCE", "kiroku-tests".to_owned()),
            ("KIROKU_API_AUDIENCE", "kiroku-callers".to_owned()),
            ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY.to_owned()),
            ("KIROKU_GITHUB_API_URL", github.uri()),
            ("KIROKU_COMMAND_ADDR", command_addr.to_string()),
            ("KIROKU_QUERY_ADDR", query_addr.to_string()),
            ("KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", "info".to_owned()),
            // Spans leave the batch every 100 ms rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ];
        if let Some((protocol, otlp)) = otlp {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")));
            if protocol == "grpc" {
                env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()));
            }
        }
        env
    };
    let (command_log, query_log) = (logs.join("command.log"), logs.join("query.log"));
    let _command =
        ServiceProcess::spawn_logging_to("kiroku-command", &env(Some(("grpc", otlp_grpc))), &command_log).unwrap();
    let _projector = ServiceProcess::spawn("kiroku-projector", &env(Some(("http/protobuf", otlp_http)))).unwrap();
    // The query service exports nothing: its logs still carry the caller's trace id.
    let _query = ServiceProcess::spawn_logging_to("kiroku-query", &env(None), &query_log).unwrap();

    let caller = key
        .mint_caller(&issuer, "kiroku-callers", "tests", &kiroku::permissions::ALL, Duration::from_secs(600))
        .unwrap();
    let mut commands = CommandServiceClient::new(connect_caller(command_addr, &caller).await.unwrap());
    let mut queries = QueryServiceClient::new(connect_caller(query_addr, &caller).await.unwrap());

    let trace_id: [u8; 16] = rand::random();
    let parent: [u8; 8] = rand::random();
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&parent));
    let token = key.mint(&issuer, "kiroku-tests", 701, Duration::from_secs(600)).unwrap();
    let mut request = tonic::Request::new(RegisterUserRequest { auth0_token: token, request_id: "req-traced".into() });
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    commands.register_user(request).await.unwrap();

    // The call's span continues the caller's trace, under the caller's span.
    let register = "/kiroku.v1.CommandService/RegisterUser";
    eventually(Duration::from_secs(30), "the command's span, the relay's and the projector's", || async {
        Ok((receiver.has("kiroku-command", register, &trace_id)
            && receiver.has("kiroku-command", "relay.publish", &trace_id)
            && receiver.has("kiroku-projector", "projector.apply", &trace_id))
        .then_some(()))
    })
    .await
    .unwrap();
    let rpc = receiver.span(register).unwrap();
    assert_eq!((rpc.trace_id.as_slice(), rpc.parent_span_id.as_slice()), (&trace_id[..], &parent[..]));

    // The event carries the trace, to the store and to WatchEvents subscribers.
    let stored: String =
        sqlx::query_scalar("SELECT metadata->>'traceparent' FROM events WHERE event_type = 'UserRegistered'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(stored.starts_with(&format!("00-{}-", hex(&trace_id))), "{stored}");
    let watch =
        WatchEventsRequest { start: Some(watch_events_request::Start::FromBeginning(true)), ..Default::default() };
    let mut stream = queries.watch_events(watch).await.unwrap().into_inner();
    let delivered = loop {
        if let Some(watch_events_response::Kind::Event(event)) = stream.message().await.unwrap().unwrap().kind {
            break event;
        }
    };
    let field = delivered.metadata.unwrap().fields.remove("traceparent").unwrap();
    assert_eq!(field.kind, Some(prost_types::value::Kind::StringValue(stored.clone())));
    drop(stream);

    // A query with a traceparent of its own, to the service that exports nothing.
    let other: [u8; 16] = rand::random();
    let mut list = tonic::Request::new(ListUsersRequest::default());
    list.metadata_mut().insert("traceparent", format!("00-{}-{}-01", hex(&other), hex(&parent)).parse().unwrap());
    queries.list_users(list).await.unwrap();

    let command_lines = eventually(Duration::from_secs(10), "the access-log line", || async {
        let lines = json_lines(&command_log);
        Ok(access_trace_id(&lines, register).is_some().then_some(lines))
    })
    .await
    .unwrap();
    assert_eq!(access_trace_id(&command_lines, register), Some(hex(&trace_id)));
    let query_lines = eventually(Duration::from_secs(10), "the query's access-log line", || async {
        let lines = json_lines(&query_log);
        Ok(access_trace_id(&lines, "/kiroku.v1.QueryService/ListUsers").is_some().then_some(lines))
    })
    .await
    .unwrap();
    assert_eq!(access_trace_id(&query_lines, "/kiroku.v1.QueryService/ListUsers"), Some(hex(&other)));
    let _ = std::fs::remove_dir_all(&logs);
}

/// A fresh directory under the system's temporary one, for this test's log files.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiroku-traces-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
