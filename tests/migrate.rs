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
