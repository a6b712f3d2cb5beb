//! Least privilege: each service logs in as a member of its own role, which can do what the service does and
//! nothing else. The roles come from the migrations; the login users here are the test's own (dropped after).
#![allow(clippy::unwrap_used)]

use chrono::Utc;
use kiroku_event_store::{
    Append, AppendOutcome, Claim, EventMetadata, EventStore, ExpectedVersion, IdempotencyKey, IdempotencyRecord,
    NewEvent,
};
use kiroku_testkit::TestDb;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// A login user in `role` for this test, connected to `db`; dropped with the value.
struct Member {
    name: String,
    pool: PgPool,
    admin: PgPool,
}

impl Member {
    async fn of(role: &str, db: &TestDb) -> Member {
        let admin = PgPool::connect(&kiroku_testkit::admin_database_url()).await.unwrap();
        let name = format!("kiroku_t_{}", Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {name} LOGIN IN ROLE {role}")))
            .execute(&admin)
            .await
            .unwrap();
        let url = db.url.replacen("postgres://postgres@", &format!("postgres://{name}@"), 1);
        let pool = PgPool::connect(&url).await.unwrap();
        Member { name, pool, admin }
    }

    async fn drop_role(self) {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {}", self.name))).execute(&self.admin).await.unwrap();
    }
}

/// Runs `sql` as the member and says whether PostgreSQL refused it for want of privilege (SQLSTATE 42501).
async fn refused(member: &Member, sql: &'static str) -> bool {
    match sqlx::query(sql).execute(&member.pool).await {
        Ok(_) => false,
        Err(sqlx::Error::Database(error)) => error.code().as_deref() == Some("42501"),
        Err(other) => panic!("{sql}: {other}"),
    }
}

fn registration() -> Append {
    Append {
        aggregate_id: Uuid::new_v4(),
        aggregate_type: "Thing".to_owned(),
        expected: ExpectedVersion::NoStream,
        events: vec![NewEvent {
            event_type: "Happened".to_owned(),
            data: json!({}),
            metadata: EventMetadata {
                request_id: Some("r".to_owned()),
                correlation_id: "c".to_owned(),
                causation_id: "c".to_owned(),
                schema_version: 1,
                caller: None,
                traceparent: None,
            },
            occurred_at: Utc::now(),
        }],
        claims: vec![Claim { kind: "thing".to_owned(), value: Uuid::new_v4().to_string() }],
        new_key: None,
        erasure: None,
        idempotency: Some(IdempotencyRecord {
            key: IdempotencyKey { caller: "roles".to_owned(), request_id: Uuid::new_v4().to_string() },
            outcome: json!({}),
        }),
    }
}

#[tokio::test]
async fn each_service_role_can_do_its_work_and_nothing_else() {
    let db = TestDb::create().await.unwrap();

    let query = Member::of("kiroku_query", &db).await;
    assert!(
        refused(
            &query,
            "INSERT INTO events (id, aggregate_id, aggregate_type, event_type, event_version, \
        event_data, occurred_at, position) VALUES ('x', gen_random_uuid(), 'User', 'X', 1, '{}', now(), 1)"
        )
        .await
    );
    assert!(refused(&query, "DELETE FROM users_read_rows").await, "the query role cannot write a read model");
    assert!(refused(&query, "UPDATE projection_checkpoints SET position = 0").await);
    assert!(refused(&query, "DELETE FROM claims").await);
    assert!(!refused(&query, "SELECT * FROM users_read").await, "but it reads them");
    assert!(!refused(&query, "SELECT * FROM events").await);
    // Nor any service the development master key, which the migrations make.
    assert!(refused(&query, "DELETE FROM database_master_key").await);
    assert!(refused(&query, "INSERT INTO database_master_key (id, key) VALUES (2, '\\x00')").await);

    let command = Member::of("kiroku_command", &db).await;
    assert!(refused(&command, "DELETE FROM users_read_rows").await, "the command role cannot write a read model");
    assert!(refused(&command, "UPDATE projection_checkpoints SET position = 0").await);
    assert!(refused(&command, "DELETE FROM events").await, "nobody rewrites the log");
    assert!(refused(&command, "UPDATE events SET event_data = '{}'").await);
    assert!(refused(&command, "UPDATE database_master_key SET key = '\\x00'").await);
    // It appends, with claims and an idempotency record.
    let store = EventStore::new(command.pool.clone());
    assert!(matches!(store.append(&registration()).await.unwrap(), AppendOutcome::Appended(_)));
    store.save_checkpoint("relay:roles", kiroku_event_store::Position::new(1)).await.unwrap();

    let projector = Member::of("kiroku_projector", &db).await;
    assert!(refused(&projector, "DELETE FROM events").await);
    assert!(refused(&projector, "DELETE FROM claims").await, "the projector cannot touch the command side");
    assert!(refused(&projector, "DELETE FROM idempotency_records").await);
    // It projects: a step applies the log to the read models and moves its checkpoint.
    let projection = kiroku_projector::Projection::new(
        projector.pool.clone(),
        5,
        kiroku_vault::MasterKeys::parse(kiroku_testkit::TEST_MASTER_KEY, None).map(std::sync::Arc::new).unwrap(),
    );
    let step = projection.step(kiroku_projector::Target::Active, &[]).await.unwrap();
    assert!(step.checkpoint > kiroku_event_store::Position::ZERO);

    for member in [query, command, projector] {
        member.drop_role().await;
    }
}
