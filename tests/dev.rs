//! `kiroku dev`: the line it prints registers a user; pasted twice, ALREADY_EXISTS; `kiroku dev token` mints more.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiroku::v1::RegisterUserRequest;
use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku_testkit::{ServiceProcess, TestDb, TestRedis, binary_path, free_address};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;

/// Pulls the token and the address out of `grpcurl -plaintext -d '{"auth0_token":"…"}' ADDR service/method`.
fn parse_grpcurl_line(line: &str) -> (String, String) {
    assert!(line.starts_with("grpcurl -plaintext "), "{line}");
    let token = line.split("\"auth0_token\":\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.last(), Some(&"kiroku.v1.CommandService/RegisterUser"));
    (token, words[words.len() - 2].to_owned())
}

async fn register(address: &str, token: &str) -> Result<kiroku::v1::RegisterUserResponse, tonic::Status> {
    let mut client = CommandServiceClient::connect(format!("http://{address}")).await.unwrap();
    client
        .register_user(RegisterUserRequest { auth0_token: token.to_owned(), request_id: String::new() })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn the_printed_grpcurl_line_registers_a_user_once() {
    let db = TestDb::create_empty().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let identity = free_address();
    let mut dev = ServiceProcess::spawn_piped(
        "kiroku",
        &["dev"],
        &[
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", redis.url.clone()),
            ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
            ("KIROKU_COMMAND_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_QUERY_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_DEV_IDENTITY_ADDR", identity.to_string()),
        ],
    )
    .unwrap();
    let stdout = dev.child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.unwrap().unwrap().unwrap();
    let (token, address) = parse_grpcurl_line(&line);

    let registered = register(&address, &token).await.unwrap();
    assert!(registered.position > 0);
    let again = register(&address, &token).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);

    // A second terminal mints a token for another account, which the dev GitHub endpoint then knows.
    let output = tokio::process::Command::new(binary_path("kiroku"))
        .args(["dev", "token", "--github-id", "4242", "--login", "someone"])
        .env("KIROKU_DEV_IDENTITY_ADDR", identity.to_string())
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (token, _) = parse_grpcurl_line(String::from_utf8(output.stdout).unwrap().trim());
    let other = register(&address, &token).await.unwrap();
    assert_ne!(other.user_id, registered.user_id);
    let login: String = sqlx::query_scalar(
        "SELECT event_data->'personal'->>'github_username' FROM events WHERE aggregate_id = $1::uuid",
    )
    .bind(&other.user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(login, "someone");

    let status = dev.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "kiroku dev exits cleanly on SIGTERM: {status:?}");
}
