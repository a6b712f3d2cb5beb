//! `kiroku migrate` against a fresh database.
#![allow(clippy::unwrap_used)]

use kiroku_testkit::{TestDb, binary_path};

#[tokio::test]
async fn kiroku_migrate_creates_the_event_store_and_running_it_twice_changes_nothing() {
    let db = TestDb::create_empty().await.unwrap();
    for _ in 0..2 {
        let output = tokio::process::Command::new(binary_path("kiroku"))
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns \
         WHERE table_name = 'events' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let names: Vec<&str> = columns.iter().map(|(name, _, _)| name.as_str()).collect();
    for seed_column in [
        "id",
        "aggregate_id",
        "aggregate_type",
        "event_type",
        "event_version",
        "event_data",
        "metadata",
        "occurred_at",
        "created_at",
        "position",
    ] {
        assert!(names.contains(&seed_column), "events lacks {seed_column}: {names:?}");
    }
    let position = columns.iter().find(|(name, _, _)| name == "position").unwrap();
    assert_eq!((position.1.as_str(), position.2.as_str()), ("bigint", "NO"));
    let unique_position: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE tablename = 'events' AND indexdef LIKE 'CREATE UNIQUE INDEX%(\"position\")')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(unique_position, "events.position is UNIQUE");
    let migrations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&db.pool).await.unwrap();
    assert_eq!(migrations as usize, std::fs::read_dir("migrations").unwrap().count());
}

#[tokio::test]
async fn a_missing_setting_stops_a_service_with_one_line_and_exit_code_64() {
    let output = tokio::process::Command::new(binary_path("kiroku-command"))
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/x")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("REDIS_URL") || stderr.contains("KIROKU_AUTH0_ISSUER"), "{stderr}");
}

/// Settings that the operator's tools set, read strictly: an OTLP protocol kiroku cannot speak, and a master key
/// left unset outside development, stop the service at once with one line naming the variable.
#[tokio::test]
async fn an_unsupported_otlp_protocol_or_a_missing_master_key_stops_a_service_with_exit_code_64() {
    let base = [
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/x"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("KIROKU_AUTH0_ISSUER", "https://tenant.example/"),
        ("KIROKU_API_AUDIENCE", "kiroku-callers"),
    ];
    for (extra, named) in [
        (
            vec![("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (vec![], "KIROKU_MASTER_KEY"),
    ] {
        let output = tokio::process::Command::new(binary_path("kiroku-query"))
            .env_clear()
            .envs(base.iter().chain(&extra).copied())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
}

/// A service that cannot reach PostgreSQL or Redis says why in its last line and names the setting, at once
/// when waiting cannot help (authentication refused, a TLS handshake refused).
#[tokio::test]
async fn an_unreachable_dependency_is_named_with_why_in_the_last_line() {
    let db = kiroku_testkit::TestDb::create().await.unwrap();
    let base = [
        ("KIROKU_AUTH0_ISSUER", "https://tenant.example/"),
        ("KIROKU_API_AUDIENCE", "kiroku-callers"),
        ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY),
        ("KIROKU_MIGRATE", "false"),
        ("KIROKU_QUERY_ADDR", "127.0.0.1:0"),
        ("KIROKU_METRICS_ADDR", "off"),
    ];
    let no_such_user = db.url.replacen("postgres://postgres@", "postgres://kiroku_nobody_at_all@", 1);
    // The local server's certificate is no public CA's: verification refuses the handshake.
    let unverified = format!("{}?sslmode=verify-full", db.url.replacen("127.0.0.1", "localhost", 1));
    for (database, redis, named, why) in [
        (no_such_user.as_str(), "redis://127.0.0.1:6379/0", "DATABASE_URL", "authentication refused"),
        (unverified.as_str(), "redis://127.0.0.1:6379/0", "DATABASE_URL", "TLS handshake failed"),
        (db.url.as_str(), "redis://nobody:wrong@127.0.0.1:6379/0", "REDIS_URL", "authentication refused"),
    ] {
        let started = std::time::Instant::now();
        let output = tokio::process::Command::new(binary_path("kiroku-query"))
            .env_clear()
            .envs(base)
            .env("DATABASE_URL", database)
            .env("REDIS_URL", redis)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.trim().lines().last().unwrap_or_default();
        assert!(last.contains(named) && last.contains(why), "{named}, {why}: {last}");
        assert!(!last.contains("wrong"), "no password in the line: {last}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "at once, not after 30 s of retries");
    }
}
