//! `kiroku dev`: the line it prints registers a user; pasted twice, ALREADY_EXISTS; `kiroku dev token` mints more.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiroku::v1::RegisterUserRequest;
use kiroku::v1::command_service_client::CommandServiceClient;
use kiroku_testkit::{ServiceProcess, TestDb, TestRedis, binary_path, free_address};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;

/// What a printed line holds.
struct Line {
    caller: String,
    token: String,
    address: String,
}

/// Pulls the tokens and the address out of
/// `grpcurl -plaintext -H 'authorization: Bearer …' -d '{"auth0_token":"…"}' ADDR service/method`.
fn parse_grpcurl_line(line: &str) -> Line {
    assert!(line.starts_with("grpcurl -plaintext -H 'authorization: Bearer "), "{line}");
    let caller = line.split("Bearer ").nth(1).unwrap().split('\'').next().unwrap().to_owned();
    let token = line.split("\"auth0_token\":\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.last(), Some(&"kiroku.v1.CommandService/RegisterUser"));
    Line { caller, token, address: words[words.len() - 2].to_owned() }
}

async fn register(line: &Line) -> Result<kiroku::v1::RegisterUserResponse, tonic::Status> {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", line.address)).unwrap().connect().await.unwrap();
    let mut client = CommandServiceClient::new(kiroku_testkit::with_caller(channel, &line.caller));
    let token = &line.token;
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
    let metrics = free_address();
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
            ("KIROKU_METRICS_ADDR", metrics.to_string()),
        ],
    )
    .unwrap();
    let stdout = dev.child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.unwrap().unwrap().unwrap();
    let printed = parse_grpcurl_line(&line);

    let registered = register(&printed).await.unwrap();
    assert!(registered.position > 0);
    let again = register(&printed).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    // One metrics endpoint for the three services of the process.
    let scraped = kiroku_testkit::eventually(Duration::from_secs(20), "the projector's first apply", || async {
        let text = kiroku_testkit::scrape(metrics).await?;
        let applied = kiroku_testkit::metric(&text, "kiroku_projector_events_applied_total", &[]);
        Ok(applied.is_some_and(|n| n >= 1.0).then_some(text))
    })
    .await
    .unwrap();
    let registered_ok = [("method", "RegisterUser"), ("code", "OK")];
    assert_eq!(kiroku_testkit::metric(&scraped, "kiroku_grpc_server_handled_total", &registered_ok), Some(1.0));

    // A second terminal mints a token for another account, which the dev GitHub endpoint then knows.
    let output = tokio::process::Command::new(binary_path("kiroku"))
        .args(["dev", "token", "--github-id", "4242", "--login", "someone"])
        .env("KIROKU_DEV_IDENTITY_ADDR", identity.to_string())
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let minted = parse_grpcurl_line(String::from_utf8(output.stdout).unwrap().trim());
    let other = register(&Line { address: printed.address.clone(), ..minted }).await.unwrap();
    assert_ne!(other.user_id, registered.user_id);
    // The log holds the profile sealed; the read model, opened.
    let sealed: bool = sqlx::query_scalar("SELECT event_data ? 'sealed' FROM events WHERE aggregate_id = $1::uuid")
        .bind(&other.user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(sealed);
    kiroku_testkit::eventually(Duration::from_secs(30), "the minted user in users_read", || async {
        let login: Option<String> = sqlx::query_scalar("SELECT github_username FROM users_read WHERE id = $1::uuid")
            .bind(&other.user_id)
            .fetch_optional(&db.pool)
            .await?
            .flatten();
        Ok(login.filter(|login| login == "someone"))
    })
    .await
    .unwrap();

    // A caller token with fewer permissions: it may read, not register.
    let output = tokio::process::Command::new(binary_path("kiroku"))
        .args(["dev", "token", "--caller", "--permissions", "kiroku:read"])
        .env("KIROKU_DEV_IDENTITY_ADDR", identity.to_string())
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let reader = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let refused = register(&Line { caller: reader, ..parse_grpcurl_line(&line) }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let status = dev.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "kiroku dev exits cleanly on SIGTERM: {status:?}");
}

/// `kiroku dev` starts quietly: no `NOPERM … 'info'` lines from the Redis users it makes, one line at most about
/// the development master key (its three services share one process), and no other warning.
#[tokio::test]
async fn kiroku_dev_starts_without_warnings() {
    let db = TestDb::create_empty().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let log = std::env::temp_dir().join(format!("kiroku-dev-{}.log", uuid::Uuid::new_v4()));
    let mut dev = tokio::process::Command::new(binary_path("kiroku"))
        .arg("dev")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", redis.url.clone()),
            ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
            ("KIROKU_COMMAND_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_QUERY_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_DEV_IDENTITY_ADDR", free_address().to_string()),
            ("KIROKU_METRICS_ADDR", free_address().to_string()),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.unwrap().unwrap().unwrap();
    // Everything has started once the line is printed; a moment for the projector's first reads.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = dev.id().unwrap();
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let _ = tokio::time::timeout(Duration::from_secs(10), dev.wait()).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(!text.contains("NOPERM"), "{text}");
    let key_lines = text.lines().filter(|line| line.contains("KIROKU_DEV_MASTER_KEY_IN_DATABASE")).count();
    assert!(key_lines <= 1, "{text}");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .filter(|line| !line.contains("KIROKU_DEV_MASTER_KEY_IN_DATABASE"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}
