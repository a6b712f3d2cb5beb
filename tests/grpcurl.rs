//! The README's grpcurl lines, run with the real grpcurl (installed by `scripts/install-grpcurl`) against a
//! running `kiroku dev`: the line it prints registers a user and, run again, is ALREADY_EXISTS with readable error
//! details; the health line answers SERVING on both servers; `grpcurl list` shows exactly what each port serves;
//! WatchEvents and ListUsers print proto3 JSON (lowerCamelCase keys, 64-bit integers as strings, RFC 3339 times,
//! snake_case payloads).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kiroku_testkit::{ServiceProcess, TestDb, TestRedis, free_address, tool};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The grpcurl lines of the README's code blocks, with its addresses replaced by this test's.
fn readme_lines(command: SocketAddr, query: SocketAddr) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut in_block = false;
    let mut lines = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
        } else if in_block && line.trim_start().starts_with("grpcurl ") {
            lines.push(line.trim().to_owned());
        }
    }
    // The health line is in the text, between backticks.
    for piece in readme.split('`') {
        if piece.starts_with("grpcurl ") && piece.contains("grpc.health.v1.Health/Check") {
            lines.push(piece.to_owned());
        }
    }
    lines
        .into_iter()
        .map(|l| l.replace("127.0.0.1:50051", &command.to_string()).replace("127.0.0.1:50052", &query.to_string()))
        .collect()
}

/// The caller token `kiroku dev` printed (`export KIROKU_CALLER_TOKEN=…`), which the README's lines use.
static CALLER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Runs a line as a shell would (the README's quoting included), with grpcurl on the PATH and the caller token
/// `kiroku dev` printed in `KIROKU_CALLER_TOKEN`.
async fn shell(grpcurl: &Path, line: &str, timeout: Duration) -> (bool, String, String) {
    let path = format!("{}:{}", grpcurl.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", line])
        .env("PATH", path)
        .env("KIROKU_CALLER_TOKEN", CALLER.get().map(String::as_str).unwrap_or_default())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let ran = tokio::time::timeout(timeout, async {
        use tokio::io::AsyncReadExt;
        let _ = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        child.wait().await.unwrap()
    })
    .await;
    let success = match ran {
        Ok(status) => status.success(),
        // A stream that does not end by itself (WatchEvents): what it printed so far is the answer.
        Err(_) => {
            let _ = child.kill().await;
            false
        }
    };
    (success, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned())
}

/// The JSON messages grpcurl printed, one after the other.
fn messages(output: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(output).into_iter::<serde_json::Value>().map_while(Result::ok).collect()
}

#[tokio::test]
async fn the_readmes_grpcurl_lines_work_against_kiroku_dev() {
    let grpcurl = tool("grpcurl");
    let db = TestDb::create_empty().await.unwrap();
    let redis = TestRedis::acquire().await.unwrap();
    let (command, query) = (free_address(), free_address());
    let mut dev = ServiceProcess::spawn_piped(
        "kiroku",
        &["dev"],
        &[
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", redis.url.clone()),
            ("KIROKU_REDIS_PREFIX", redis.prefix.clone()),
            ("KIROKU_COMMAND_ADDR", command.to_string()),
            ("KIROKU_QUERY_ADDR", query.to_string()),
            ("KIROKU_PROJECTOR_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
            ("KIROKU_DEV_IDENTITY_ADDR", "127.0.0.1:0".to_owned()),
        ],
    )
    .unwrap();
    let mut stdout = BufReader::new(dev.child.stdout.take().unwrap()).lines();
    let register = tokio::time::timeout(Duration::from_secs(60), stdout.next_line()).await.unwrap().unwrap().unwrap();
    assert!(register.starts_with("grpcurl -plaintext "), "{register}");
    let export = tokio::time::timeout(Duration::from_secs(10), stdout.next_line()).await.unwrap().unwrap().unwrap();
    let caller = export.strip_prefix("export KIROKU_CALLER_TOKEN=").unwrap_or_else(|| panic!("{export}"));
    CALLER.set(caller.to_owned()).unwrap();

    // The printed line, twice: registered, then ALREADY_EXISTS with its details decoded.
    let (ok, out, err) = shell(&grpcurl, &register, Duration::from_secs(20)).await;
    assert!(ok, "{out}{err}");
    let registered = &messages(&out)[0];
    let user_id = registered["userId"].as_str().unwrap().to_owned();
    assert!(registered["position"].as_str().unwrap().parse::<u64>().unwrap() > 0, "positions print as strings");
    let (ok, _, err) =
        shell(&grpcurl, &register.replacen("grpcurl ", "grpcurl -format-error ", 1), Duration::from_secs(20)).await;
    assert!(!ok);
    assert!(err.contains("AlreadyExists") || err.contains("ALREADY_EXISTS"), "{err}");
    assert!(err.contains("USER_ALREADY_EXISTS") && err.contains(&user_id), "error details are readable: {err}");

    let lines = readme_lines(command, query);
    let health = lines.iter().find(|l| l.contains("grpc.health.v1.Health/Check")).expect("a health line");
    for address in [command, query] {
        let line = health.replace(&command.to_string(), &address.to_string());
        let (ok, out, err) = shell(&grpcurl, &line, Duration::from_secs(20)).await;
        assert!(ok && out.contains("\"SERVING\""), "{address}: {out}{err}");
    }

    // Each port lists what it serves, and nothing it does not.
    for (address, own, other) in [
        (command, "kiroku.v1.CommandService", "kiroku.v1.QueryService"),
        (query, "kiroku.v1.QueryService", "kiroku.v1.CommandService"),
    ] {
        let (ok, out, err) =
            shell(&grpcurl, &format!("grpcurl -plaintext {address} list"), Duration::from_secs(20)).await;
        assert!(ok, "{err}");
        for service in [own, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
            assert!(out.lines().any(|l| l == service), "{address} does not list {service}: {out}");
        }
        assert!(!out.contains(other), "{address} lists {other}, which it does not serve: {out}");
    }

    let watch = lines.iter().find(|l| l.contains("QueryService/WatchEvents")).expect("a WatchEvents line");
    let (_, out, err) = shell(&grpcurl, watch, Duration::from_secs(4)).await;
    let events: Vec<serde_json::Value> = messages(&out).into_iter().filter_map(|m| m.get("event").cloned()).collect();
    let event = events.iter().find(|e| e["aggregateId"] == user_id).unwrap_or_else(|| panic!("{out}{err}"));
    assert_eq!(event["eventType"], "UserRegistered");
    assert_eq!(event["aggregateType"], "User");
    assert_eq!(event["version"], "1", "64-bit integers print as strings");
    assert!(event["position"].as_str().unwrap().parse::<u64>().is_ok());
    assert!(event["occurredAt"].as_str().unwrap().ends_with('Z'), "timestamps print as RFC 3339");
    assert!(
        event["data"]["personal"]["github_username"].as_str().unwrap().starts_with("dev-"),
        "payloads stay snake_case"
    );

    let list = lines.iter().find(|l| l.contains("QueryService/ListUsers")).expect("a ListUsers line");
    // Without the caller token, the same line is refused.
    let anonymous = list.replace("$KIROKU_CALLER_TOKEN", "");
    let (ok, _, err) = shell(&grpcurl, &anonymous, Duration::from_secs(20)).await;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let listed = kiroku_testkit::eventually(Duration::from_secs(20), "the user in ListUsers", || async {
        let (ok, out, err) = shell(&grpcurl, list, Duration::from_secs(20)).await;
        anyhow::ensure!(ok, "{err}");
        Ok(messages(&out).into_iter().next().filter(|m| m["users"].as_array().is_some_and(|u| !u.is_empty())))
    })
    .await
    .unwrap();
    assert_eq!(listed["users"][0]["userId"], user_id);
    assert_eq!(listed["users"][0]["status"], "USER_STATUS_ACTIVE");

    let status = dev.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "kiroku dev exits cleanly: {status:?}");
}
