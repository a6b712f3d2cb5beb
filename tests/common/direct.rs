//! Writing to the event store directly, as a test chooses (its own ids, events no command would write), and the
//! operator's command line.

use chrono::Utc;
use kiroku_domain::{
    Auth0Subject, GitHubId, GitHubProfile, ProfileChanges, RegisterUser, User, UserCommand, UserEvent,
    UserProfileUpdated,
};
use kiroku_event_store::{
    Append, AppendOutcome, Claim, EventMetadata, EventStore, ExpectedVersion, NewEvent, Position,
};
use kiroku_testkit::binary_path;
use uuid::Uuid;

use super::CommandApp;

pub fn new_event(event: &UserEvent) -> NewEvent {
    let (event_type, data) = event.encode().unwrap();
    NewEvent {
        event_type: event_type.to_owned(),
        data,
        metadata: EventMetadata {
            request_id: None,
            correlation_id: "tests".to_owned(),
            causation_id: "tests".to_owned(),
            schema_version: 1,
            caller: None,
            traceparent: None,
        },
        occurred_at: Utc::now(),
    }
}

/// Registers GitHub account `github_id` as user `id`, straight into the store (a test chooses the id).
pub async fn register_as(store: &EventStore, id: Uuid, github_id: u64) -> Position {
    let subject: Auth0Subject = format!("github|{github_id}").parse().unwrap();
    let profile = GitHubProfile {
        id: GitHubId::new(github_id),
        login: format!("user{github_id}"),
        name: None,
        avatar_url: None,
        etag: None,
    };
    let command = UserCommand::Register(RegisterUser { subject: subject.clone(), profile, now: Utc::now() });
    let events = User::decide(None, &command).unwrap();
    let append = Append {
        aggregate_id: id,
        aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
        expected: ExpectedVersion::NoStream,
        events: events.iter().map(new_event).collect(),
        claims: User::claims(&subject)
            .into_iter()
            // Claims of identities hold keyed hashes (a trigger refuses them in clear); a stand-in will do here.
            .map(|(kind, value)| Claim { kind: kind.as_str().to_owned(), value: format!("h1~{value}") })
            .collect(),
        new_key: None,
        erasure: None,
        idempotency: None,
    };
    match store.append(&append).await.unwrap() {
        AppendOutcome::Appended(appended) => appended.last_position(),
        replayed => panic!("{replayed:?}"),
    }
}

/// A renamed login for user `id` at `version` + 1.
pub async fn rename(store: &EventStore, id: Uuid, version: u32, login: &str) {
    let event = UserEvent::UserProfileUpdated(UserProfileUpdated {
        personal: Some(ProfileChanges { github_username: Some(login.to_owned()), ..ProfileChanges::default() }),
        updated_at: Utc::now(),
    });
    let append = Append {
        aggregate_id: id,
        aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
        expected: ExpectedVersion::Exact(version.try_into().unwrap()),
        events: vec![new_event(&event)],
        claims: vec![],
        new_key: None,
        erasure: None,
        idempotency: None,
    };
    store.append(&append).await.unwrap();
}

/// `kiroku projector <args>` against the app's database and Redis, its output as JSON lines.
pub async fn cli(app: &CommandApp, args: &[&str]) -> Vec<serde_json::Value> {
    let env = app.projector_process_env(&[]);
    let output = tokio::process::Command::new(binary_path("kiroku"))
        .arg("projector")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Makes the read model refuse rows: a trigger named `name` that raises on `operation` (`INSERT`, `UPDATE`) of a
/// row of `users_read_rows` for which `when` holds (over `NEW`), so that the event writing it cannot apply.
pub async fn refuse_rows(app: &CommandApp, name: &str, operation: &str, when: &str) {
    let sql = format!(
        "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER {name} BEFORE {operation} ON users_read_rows FOR EACH ROW \
         WHEN ({when}) EXECUTE FUNCTION {name}();"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&app.db.pool).await.unwrap();
}
