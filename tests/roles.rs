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

/// A login user in `role` (none: `None`, only what PUBLIC may), and whether it may connect to `url`'s database
/// (SQLSTATE 42501 when it may not).
async fn may_connect(role: Option<&str>, url: &str, admin: &PgPool) -> (String, bool) {
    let name = format!("kiroku_t_{}", Uuid::new_v4().simple());
    let member = role.map(|role| format!(" IN ROLE {role}")).unwrap_or_default();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {name} LOGIN{member}"))).execute(admin).await.unwrap();
    let url = url.replacen("postgres://postgres@", &format!("postgres://{name}@"), 1);
    let connected = match <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
        Ok(connection) => {
            let _ = sqlx::Connection::close(connection).await;
            true
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42501") => false,
        Err(other) => panic!("{other}"),
    };
    (name, connected)
}

/// Two deployments on one cluster (`KIROKU_DATABASE_ROLE_PREFIX`): each database is given to its own deployment's
/// roles, and no other role (neither the other deployment's nor kiroku's default ones, nor PUBLIC) may connect.
#[tokio::test]
async fn deployments_on_one_cluster_have_roles_of_their_own_and_cannot_reach_each_other() {
    use sqlx::Connection;
    let admin = PgPool::connect(&kiroku_testkit::admin_database_url()).await.unwrap();
    let prefix = |n: u8| format!("t{}_{n}", Uuid::new_v4().simple());
    let (a_prefix, b_prefix) = (prefix(1), prefix(2));
    let (a, b) = (TestDb::create_empty().await.unwrap(), TestDb::create_empty().await.unwrap());
    kiroku_event_store::migrate_with_roles(&a.pool, &a_prefix).await.unwrap();
    kiroku_event_store::migrate_with_roles(&b.pool, &b_prefix).await.unwrap();
    // Running it again changes nothing.
    kiroku_event_store::migrate_with_roles(&a.pool, &a_prefix).await.unwrap();

    let mut users = Vec::new();
    for (role, url, expected) in [
        (Some(format!("{a_prefix}_query")), &a.url, true),
        (Some(format!("{a_prefix}_query")), &b.url, false),
        (Some(format!("{b_prefix}_command")), &a.url, false),
        (Some("kiroku_query".to_owned()), &a.url, false),
        (None, &a.url, false),
    ] {
        let (user, connected) = may_connect(role.as_deref(), url, &admin).await;
        assert_eq!(connected, expected, "{role:?} on {url}");
        users.push(user);
    }
    // A's query role reads there, and may not write.
    let reader = format!("postgres://{}@", users[0]);
    let mut connection =
        sqlx::PgConnection::connect(&a.url.replacen("postgres://postgres@", &reader, 1)).await.unwrap();
    sqlx::query("SELECT count(*) FROM users_read").execute(&mut connection).await.unwrap();
    let write = sqlx::query("DELETE FROM claims").execute(&mut connection).await.unwrap_err();
    assert_eq!(write.as_database_error().and_then(|e| e.code()).as_deref(), Some("42501"));
    connection.close().await.unwrap();

    for user in users {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {user}"))).execute(&admin).await.unwrap();
    }
    for (db, prefix) in [(&a, &a_prefix), (&b, &b_prefix)] {
        for service in ["command", "query", "projector"] {
            let role = format!("{prefix}_{service}");
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP OWNED BY {role}"))).execute(&db.pool).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("REVOKE ALL ON DATABASE {} FROM {role}", db.name)))
                .execute(&admin)
                .await
                .unwrap();
        }
    }
    for prefix in [&a_prefix, &b_prefix] {
        for service in ["command", "query", "projector"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {prefix}_{service}"))).execute(&admin).await.unwrap();
        }
    }
}

/// The one mutation of the log (an erasure's redaction of rows from before encryption) must take members away
/// and mark the payload erased; one without the marker used to pass. Its SECURITY DEFINER function looks only in
/// schemas no service role may create objects in.
#[tokio::test]
async fn a_redaction_must_mark_the_payload_erased_and_the_definer_function_trusts_no_writable_schema() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let AppendOutcome::Appended(appended) = store.append(&registration()).await.unwrap() else { panic!() };
    let command = Member::of("kiroku_command", &db).await;
    let redact = |payload: serde_json::Value| {
        sqlx::query("SELECT kiroku_redact_events($1::bigint[], $2::jsonb[])")
            .bind(vec![i64::try_from(appended.positions[0].get()).unwrap()])
            .bind(vec![payload])
            .execute(&command.pool)
    };
    assert!(redact(json!({})).await.is_err(), "a redaction without the erased marker is refused");
    assert!(redact(json!({ "erased": true, "added": 1 })).await.is_err(), "nor may it add members");
    redact(json!({ "erased": true })).await.unwrap();
    for role in ["kiroku_command", "kiroku_query", "kiroku_projector"] {
        let creates: bool = sqlx::query_scalar("SELECT has_schema_privilege($1, 'public', 'CREATE')")
            .bind(role)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(!creates, "{role} may create objects in public");
    }
    let path: Vec<String> =
        sqlx::query_scalar("SELECT unnest(proconfig) FROM pg_proc WHERE proname = 'kiroku_redact_events'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(path, ["search_path=pg_catalog, public, pg_temp"]);
    command.drop_role().await;
}
