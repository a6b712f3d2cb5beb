//! The measurable promise of EraseUser: after it, a `pg_dump` of the database and a dump of the Redis database
//! hold none of the person's login, display name, avatar URL, Auth0 subject or GitHub id, in any form a grep finds
//! (plain, hex, base64), while everyone else's data is intact.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use common::{CommandApp, field, get_user, history};
use fred::prelude::*;
use kiroku::v1::{DeactivateUserRequest, EraseUserRequest, GetUserRequest, SyncGitHubProfileRequest, UserStatus};
use kiroku_testkit::eventually;
use prost_types::value::Kind;
use serde_json::json;
use tonic::Code;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

// The victim, A: distinctive values that nothing else in a dump can match by chance.
const A_GITHUB_ID: u64 = 731904562;
const A_LOGIN: &str = "zq-erasable-login-7319";
const A_NAME: &str = "Zelda Quartermain 7319";
const A_AVATAR: &str = "https://avatars.example.test/zq-portrait-7319-first.png";
const A_NEW_LOGIN: &str = "zq-renamed-erasable-7319";
const A_NEW_NAME: &str = "Zelda Vantablack-Quartermain 7319";
const A_NEW_AVATAR: &str = "https://avatars.example.test/zq-portrait-7319-second.png";
/// The deactivation reason is personal too (DeactivateUserRequest.reason: "erased with the user").
const A_REASON: &str = "zq-reason: Zelda asked by ticket 7319";

// The bystander, B.
const B_GITHUB_ID: u64 = 486215093;
const B_LOGIN: &str = "kw-bystander-login-4862";
const B_NAME: &str = "Bertram Kowalczyk 4862";

/// Makes GitHub answer this profile for the account, ahead of every answer mounted with a larger `priority`
/// (wiremock tries lower numbers first). The ETag names neither the login nor the id, as GitHub's do not.
async fn github_answers(
    app: &CommandApp,
    github_id: u64,
    (login, name, avatar_url): (&str, &str, &str),
    etag: &str,
    priority: u8,
) {
    Mock::given(method("GET"))
        .and(path(format!("/user/{github_id}")))
        .respond_with(ResponseTemplate::new(200).insert_header("ETag", etag).set_body_json(json!({
            "id": github_id, "login": login, "name": name, "avatar_url": avatar_url,
        })))
        .with_priority(priority)
        .named(format!("github user {github_id}, priority {priority}"))
        .mount(&app.github)
        .await;
}

// ---------------------------------------------------------------------------------------------------------------
// Dumps
// ---------------------------------------------------------------------------------------------------------------

/// `pg_dump` of the test's database, plain SQL (bytea comes out as `\x` and lowercase hex).
async fn pg_dump(app: &CommandApp) -> String {
    let program = std::env::var("KIROKU_TEST_PG_DUMP").unwrap_or_else(|_| "pg_dump".to_owned());
    let output = tokio::process::Command::new(program)
        .args(["--format=plain", "--no-owner", "--no-privileges", "--dbname"])
        .arg(&app.db.url)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "pg_dump: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A logical dump of the test's Redis database: every key (SCAN), its name, type and whole content, as text.
async fn redis_dump(app: &CommandApp) -> String {
    let client = &app.redis.client;
    let mut keys = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let reply: fred::types::Value = client
            .custom(fred::cmd!("SCAN"), vec![cursor.clone(), "COUNT".to_owned(), "1000".to_owned()])
            .await
            .unwrap();
        let mut parts = match reply {
            fred::types::Value::Array(parts) => parts,
            other => panic!("SCAN answered {other:?}"),
        };
        assert_eq!(parts.len(), 2, "SCAN answers a cursor and keys: {parts:?}");
        if let fred::types::Value::Array(batch) = parts.pop().unwrap() {
            keys.extend(batch.iter().filter_map(|key| key.as_str_lossy().map(|k| k.into_owned())));
        }
        cursor = parts.pop().unwrap().as_string().unwrap();
        if cursor == "0" {
            break;
        }
    }
    keys.sort();
    keys.dedup();

    let mut dump = String::new();
    for key in keys {
        let kind: String = client.custom(fred::cmd!("TYPE"), vec![key.clone()]).await.unwrap();
        let (command, args): (&'static str, Vec<String>) = match kind.as_str() {
            "stream" => ("XRANGE", vec![key.clone(), "-".into(), "+".into()]),
            "hash" => ("HGETALL", vec![key.clone()]),
            "string" => ("GET", vec![key.clone()]),
            "list" => ("LRANGE", vec![key.clone(), "0".into(), "-1".into()]),
            "set" => ("SMEMBERS", vec![key.clone()]),
            "zset" => ("ZRANGE", vec![key.clone(), "0".into(), "-1".into(), "WITHSCORES".into()]),
            // Gone between SCAN and TYPE (nothing in this database expires, but a dump should not care).
            "none" => continue,
            other => panic!("key {key} has a type this dump does not read: {other}"),
        };
        let value: fred::types::Value = client.custom(fred::cmd!(command), args).await.unwrap();
        dump.push_str(&format!("key {key} ({kind})\n"));
        render(&value, &mut dump);
    }
    dump
}

/// A Redis reply as text, one scalar a line (bytes as UTF-8, lossily: plaintext stays readable).
fn render(value: &fred::types::Value, out: &mut String) {
    match value {
        fred::types::Value::Array(items) => items.iter().for_each(|item| render(item, out)),
        fred::types::Value::Map(map) => {
            for (key, item) in map.iter() {
                out.push_str(&key.as_str_lossy());
                out.push('\n');
                render(item, out);
            }
        }
        scalar => {
            if let Some(text) = scalar.as_str_lossy() {
                out.push_str(&text);
                out.push('\n');
            }
        }
    }
}

/// The stream's entries, as (id, fields).
async fn stream_entries(app: &CommandApp) -> Vec<(String, HashMap<String, String>)> {
    app.redis.client.xrange(app.redis.events_stream(), "-", "+", None).await.unwrap()
}

fn entries_of<'a>(
    entries: &'a [(String, HashMap<String, String>)],
    aggregate_id: &str,
) -> Vec<&'a (String, HashMap<String, String>)> {
    entries.iter().filter(|(_, fields)| fields.get("aggregate_id").map(String::as_str) == Some(aggregate_id)).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Looking for a needle in a dump
// ---------------------------------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The parts of `needle`'s base64 encodings that do not depend on what surrounds it: for each of the three
/// alignments it may have in a longer byte string, the characters of the 3-byte groups that lie wholly inside it.
fn base64_cores(needle: &[u8]) -> Vec<String> {
    let mut cores = Vec::new();
    for engine in [&STANDARD, &URL_SAFE] {
        for offset in 0..3usize {
            let mut bytes = vec![0u8; offset];
            bytes.extend_from_slice(needle);
            let encoded = engine.encode(&bytes);
            // The first group mixes the needle with the bytes before it, the last (when partial) with those after.
            let start = if offset == 0 { 0 } else { 4 };
            let end = if bytes.len() % 3 == 0 { encoded.len() } else { encoded.len() - 4 };
            if end > start + 4 {
                cores.push(encoded[start..end].to_owned());
            }
        }
    }
    cores
}

/// Where and in which form `needle` occurs in `dump`: in plain text or lowercase hex, regardless of case; in
/// base64 (standard or URL-safe alphabet, any alignment), as written or lowercased. `None` when nowhere.
fn find(dump: &str, needle: &str) -> Option<(&'static str, usize)> {
    let folded = dump.to_ascii_lowercase();
    let variants = [needle.to_owned(), needle.to_ascii_lowercase()];
    if let Some(at) = folded.find(&needle.to_ascii_lowercase()) {
        return Some(("plain text", at));
    }
    for variant in &variants {
        if let Some(at) = folded.find(&hex(variant.as_bytes())) {
            return Some(("hex", at));
        }
    }
    for variant in &variants {
        for core in base64_cores(variant.as_bytes()) {
            if let Some(at) = dump.find(&core) {
                return Some(("base64", at));
            }
        }
    }
    None
}

/// Up to 80 bytes either side of `at`, for the failure message.
fn around(dump: &str, at: usize) -> String {
    let bytes = dump.as_bytes();
    let start = at.saturating_sub(80);
    let end = (at + 80).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..end]).into_owned()
}

/// Every occurrence of every needle in every dump, described.
fn leaks(dumps: &[(&str, &str)], needles: &[(&str, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (dump_name, dump) in dumps {
        for (what, needle) in needles {
            if let Some((form, at)) = find(dump, needle) {
                found.push(format!("{dump_name} holds {what} {needle:?} in {form}: …{}…", around(dump, at)));
            }
        }
    }
    found
}

/// The detector itself finds each needle in each form it claims to, at every alignment, and nothing in a dump
/// that lacks it: without this, a clean result after an erasure would prove nothing.
#[test]
fn the_leak_detector_finds_plain_hex_and_base64_forms_at_every_alignment() {
    for needle in [A_LOGIN, A_NAME, A_AVATAR, "github|731904562", "731904562"] {
        let mut hidden = vec![
            format!("INSERT INTO t VALUES ('{needle}');"),
            format!("{{\"display\":\"{}\"}}", needle.to_ascii_uppercase()),
            format!("COPY t (b) FROM stdin;\n\\\\x00ff{}ee\n", hex(needle.as_bytes())),
        ];
        for prefix in ["", "a", "ab", "abc"] {
            for suffix in ["", "z", "zy"] {
                let bytes = [prefix.as_bytes(), needle.as_bytes(), suffix.as_bytes()].concat();
                hidden.push(format!("payload {} end", STANDARD.encode(&bytes)));
                hidden.push(format!("payload {} end", URL_SAFE.encode(&bytes)));
            }
        }
        for dump in &hidden {
            assert!(find(dump, needle).is_some(), "{needle:?} not found in {dump:?}");
        }
        let clean = format!("nothing here but {} and {}", B_LOGIN, STANDARD.encode(B_NAME));
        assert!(find(&clean, needle).is_none(), "{needle:?} found in {clean:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The promise
// ---------------------------------------------------------------------------------------------------------------

/// With command, query and projector running: A registers (with a request id, then retried with it), changes
/// their GitHub profile, is refused a duplicate registration (an audit event naming A) and is deactivated with a
/// reason; B registers. Before the erasure the database dump shows A in clear (the read model), which proves the
/// search works. After EraseUser(A) has reached the read model and the Redis stream, neither the database dump
/// nor the Redis dump holds any of A's logins, names, avatar URLs, Auth0 subject, GitHub id or deactivation
/// reason, in plain text, hex or base64; A's events are all still there, as unreadable ciphertext; and B's
/// data is intact everywhere: in the dump, through GetUser and GetUserHistory, and byte for byte in Redis.
#[tokio::test]
async fn after_erase_user_no_dump_of_postgres_or_redis_holds_the_persons_data_and_others_are_intact() {
    let app = CommandApp::spawn().await;
    let projector = app.start_projector(&[]).await;
    let (query, client) = app.start_query(&[]).await;
    let a_subject = format!("github|{A_GITHUB_ID}");
    let b_subject = format!("github|{B_GITHUB_ID}");

    // A registers; the retry with the same request id replays the answer and writes nothing.
    github_answers(&app, A_GITHUB_ID, (A_LOGIN, A_NAME, A_AVATAR), "\"etag-first-5c0f\"", 10).await;
    let a = app.register(A_GITHUB_ID, "zq-register-7319").await.unwrap();
    let retried = app.register(A_GITHUB_ID, "zq-register-7319").await.unwrap();
    assert_eq!((retried.user_id.as_str(), retried.position), (a.user_id.as_str(), a.position));
    assert_eq!(app.total_events().await, 1, "the retry wrote nothing");

    // A's profile changes on GitHub: login, name and avatar.
    github_answers(&app, A_GITHUB_ID, (A_NEW_LOGIN, A_NEW_NAME, A_NEW_AVATAR), "\"etag-second-7e11\"", 1).await;
    let synced = app
        .client
        .clone()
        .sync_git_hub_profile(SyncGitHubProfileRequest {
            auth0_token: app.token(A_GITHUB_ID),
            request_id: String::new(),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(synced.changed);

    // A tries to register again: refused, and recorded in an audit event that names A.
    let duplicate = app.register(A_GITHUB_ID, "").await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists, "{duplicate:?}");
    assert_eq!(app.count_events("UserRegistrationFailed").await, 1);

    app.client
        .clone()
        .deactivate_user(DeactivateUserRequest {
            user_id: a.user_id.clone(),
            reason: A_REASON.to_owned(),
            request_id: String::new(),
            expected_version: 0,
        })
        .await
        .unwrap();

    // B, the bystander.
    app.github_knows(B_GITHUB_ID, B_LOGIN, Some(B_NAME)).await;
    let b = app.register(B_GITHUB_ID, "").await.unwrap();

    // Everything applied (the projector goes in log order and B's registration is last) and published.
    let user = get_user(&client, &a.user_id, b.position).await;
    assert_eq!((user.github_username.as_str(), user.display_name.as_str()), (A_NEW_LOGIN, A_NEW_NAME));
    assert_eq!(user.status, UserStatus::Deactivated as i32);
    eventually(Duration::from_secs(20), "the refused registration in its read model", || async {
        let failures: i64 =
            sqlx::query_scalar("SELECT count(*) FROM registration_failures_read").fetch_one(&app.db.pool).await?;
        Ok((failures == 1).then_some(()))
    })
    .await
    .unwrap();
    let b_position = b.position.to_string();
    eventually(Duration::from_secs(30), "B's registration in the Redis stream", || async {
        let entries = stream_entries(&app).await;
        Ok(entries.iter().any(|(_, fields)| fields.get("position") == Some(&b_position)).then_some(()))
    })
    .await
    .unwrap();

    // Positive control: before the erasure the database holds A in clear (the read model), and the Redis dump
    // reads every entry of the stream.
    let pg_before = pg_dump(&app).await;
    let redis_before = redis_dump(&app).await;
    for (what, needle) in [
        ("login", A_NEW_LOGIN.to_owned()),
        ("display name", A_NEW_NAME.to_owned()),
        ("avatar URL", A_NEW_AVATAR.to_owned()),
        ("Auth0 subject", a_subject.clone()),
        ("GitHub id", A_GITHUB_ID.to_string()),
    ] {
        assert_eq!(
            find(&pg_before, &needle).map(|(form, _)| form),
            Some("plain text"),
            "before the erasure the database dump shows A's {what} in clear: the search must be able to fail"
        );
    }
    for needle in [a.user_id.as_str(), b.user_id.as_str(), "UserRegistered", "UserProfileUpdated", "UserDeactivated"] {
        assert!(redis_before.contains(needle), "the Redis dump reads the stream: {needle} missing");
    }
    let entries_before = stream_entries(&app).await;
    let a_before: Vec<String> = entries_of(&entries_before, &a.user_id).iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(a_before.len(), 3, "A's registration, profile change and deactivation are in the stream");
    let b_before: Vec<(String, HashMap<String, String>)> =
        entries_of(&entries_before, &b.user_id).into_iter().cloned().collect();
    assert_eq!(b_before.len(), 1);

    // The erasure, seen by the read model and published by the relay.
    let erased = app
        .client
        .clone()
        .erase_user(EraseUserRequest { user_id: a.user_id.clone(), request_id: "zq-erase-7319".to_owned() })
        .await
        .unwrap()
        .into_inner();
    let user = get_user(&client, &a.user_id, erased.position).await;
    assert_eq!(user.status, UserStatus::Erased as i32);
    assert!(user.erased);
    assert_eq!(
        (
            user.auth0_id.as_str(),
            user.github_id.as_str(),
            user.github_username.as_str(),
            user.display_name.as_str(),
            user.avatar_url.as_str()
        ),
        ("", "", "", "", "")
    );
    eventually(Duration::from_secs(30), "UserErased in the Redis stream", || async {
        let entries = stream_entries(&app).await;
        Ok(entries
            .iter()
            .any(|(_, fields)| {
                fields.get("event_type").map(String::as_str) == Some("UserErased")
                    && fields.get("aggregate_id") == Some(&a.user_id)
            })
            .then_some(()))
    })
    .await
    .unwrap();

    // The promise: nothing of A in either dump, in any form.
    let pg_after = pg_dump(&app).await;
    let redis_after = redis_dump(&app).await;
    let needles: Vec<(&str, String)> = vec![
        ("the first login", A_LOGIN.to_owned()),
        ("the second login", A_NEW_LOGIN.to_owned()),
        ("the first display name", A_NAME.to_owned()),
        ("the second display name", A_NEW_NAME.to_owned()),
        ("the first avatar URL", A_AVATAR.to_owned()),
        ("the second avatar URL", A_NEW_AVATAR.to_owned()),
        ("the Auth0 subject", a_subject.clone()),
        ("the GitHub id", A_GITHUB_ID.to_string()),
        ("the deactivation reason", A_REASON.to_owned()),
    ];
    let found = leaks(&[("pg_dump", pg_after.as_str()), ("the Redis dump", redis_after.as_str())], &needles);
    assert!(found.is_empty(), "A's personal data outlived the erasure:\n{}", found.join("\n"));

    // A's events are all still there, in the store and in the stream (the key is gone, not the entries).
    let a_history = history(&client, &a.user_id).await;
    assert_eq!(
        a_history.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(),
        ["UserRegistered", "UserProfileUpdated", "UserDeactivated", "UserErased"]
    );
    for event in &a_history {
        let data = event.data.as_ref().unwrap();
        assert!(field(data, "personal").is_none(), "{event:?}");
    }
    assert_eq!(app.count_events("UserRegistrationFailed").await, 1, "the audit event stays");
    let entries_after = stream_entries(&app).await;
    let a_after: Vec<String> = entries_of(&entries_after, &a.user_id).iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(a_after.len(), 4, "A's three entries and the erasure's");
    assert!(a_before.iter().all(|id| a_after.contains(id)), "A's entries stay in the stream: {a_after:?}");

    // B is intact: in the database dump, through the read model and the history, and byte for byte in Redis.
    for (what, needle) in [
        ("login", B_LOGIN.to_owned()),
        ("display name", B_NAME.to_owned()),
        ("Auth0 subject", b_subject.clone()),
        ("GitHub id", B_GITHUB_ID.to_string()),
    ] {
        assert!(find(&pg_after, &needle).is_some(), "B's {what} is still in the database");
    }
    let user = get_user(&client, &b.user_id, 0).await;
    assert_eq!((user.github_username.as_str(), user.display_name.as_str()), (B_LOGIN, B_NAME));
    assert_eq!(
        (user.auth0_id.as_str(), user.status, user.erased),
        (b_subject.as_str(), UserStatus::Active as i32, false)
    );
    let b_history = history(&client, &b.user_id).await;
    let personal = match b_history.first().and_then(|e| field(e.data.as_ref().unwrap(), "personal")) {
        Some(Kind::StructValue(personal)) => personal.clone(),
        other => panic!("B's registration is readable, got {other:?}"),
    };
    assert_eq!(field(&personal, "github_username"), Some(&Kind::StringValue(B_LOGIN.to_owned())));
    let b_after: Vec<(String, HashMap<String, String>)> =
        entries_of(&entries_after, &b.user_id).into_iter().cloned().collect();
    assert_eq!(b_after, b_before, "B's entries in Redis are untouched");

    query.stop().await;
    projector.stop().await;
    app.stop().await;
}

/// The user of `tests/fixtures/schema_v1.sql`, written by a kiroku from before encryption.
const V1_USER: &str = "0193a1b2-0000-7000-8000-00000000f1a1";
const V1_GITHUB_ID: u64 = 424_242_999;

/// Rows written before encryption (schema 1: personal fields in clear, claims and an idempotency key holding the
/// subject in clear) keep working: the command service hashes the claims and the key at start-up (the person is
/// still refused as a duplicate, a retry still gets its answer), readers upcast the rows to today's types
/// (history, read model); and erasing the person redacts those rows in the log, the one mutation the log allows,
/// records which, and removes their entries from Redis, so that neither dump holds the person any more.
#[tokio::test]
async fn schema_1_rows_upcast_and_an_erasure_redacts_them_in_the_log_and_redis() {
    let app = CommandApp::spawn().await;
    // Loaded as an older kiroku wrote it: without the trigger that now refuses claims in clear.
    let fixture = format!(
        "SET session_replication_role = replica; {} RESET session_replication_role;",
        include_str!("fixtures/schema_v1.sql")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(fixture)).execute(&app.db.pool).await.unwrap();
    // A command service that starts now finds the rows in clear and hashes what must stay unique or findable.
    let (command, commands) = app.start_command().await;
    let (query, client) = app.start_query(&[]).await;
    let projector = app.start_projector(&[]).await;
    let clear: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM claims WHERE value LIKE '%424242999%') \
              + (SELECT count(*) FROM idempotency_records WHERE caller LIKE '%424242999%')",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(clear, 0, "claims and idempotency keys are hashed at start-up");

    // Upcast: schema 1 reads as today's type (every personal field under `personal`).
    let events = history(&client, V1_USER).await;
    assert_eq!(events.len(), 2);
    let Some(Kind::StructValue(personal)) = field(events[0].data.as_ref().unwrap(), "personal") else {
        panic!("{:?}", events[0])
    };
    assert_eq!(field(personal, "auth0_id"), Some(&Kind::StringValue(format!("github|{V1_GITHUB_ID}"))));
    assert_eq!(field(personal, "github_etag"), Some(&Kind::StringValue("\"v1-etag-4242\"".to_owned())));
    let Some(Kind::StructValue(changes)) = field(events[1].data.as_ref().unwrap(), "personal") else {
        panic!("{:?}", events[1])
    };
    assert_eq!(field(changes, "github_etag"), Some(&Kind::StringValue("\"v1-etag-4243\"".to_owned())));
    // The projector applies them too.
    eventually(Duration::from_secs(30), "the schema-1 user in the read model", || async {
        let user = client
            .clone()
            .get_user(GetUserRequest { user_id: V1_USER.to_owned(), min_position: 0 })
            .await
            .ok()
            .and_then(|r| r.into_inner().user);
        Ok(user.filter(|u| u.github_username == "v1-fixture-renamed-4242" && u.version == 2))
    })
    .await
    .unwrap();

    // Hashed claims still make the person unique; the hashed idempotency key still replays its answer.
    let mut commands = commands;
    let token = app.token(V1_GITHUB_ID);
    let refused = commands
        .register_user(kiroku::v1::RegisterUserRequest { auth0_token: token.clone(), request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    let retried = commands
        .register_user(kiroku::v1::RegisterUserRequest {
            auth0_token: token,
            request_id: "v1-fixture-request".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.user_id, V1_USER);

    // The erasure redacts the three rows in clear, records which, and scrubs their Redis entries.
    let fixture_positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events WHERE id LIKE '01JDV1FXTR%' ORDER BY position")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    let erased = commands
        .erase_user(EraseUserRequest { user_id: V1_USER.to_owned(), request_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let redacted: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT event_data FROM events WHERE id LIKE '01JDV1FXTR%' ORDER BY position")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    for row in &redacted {
        assert_eq!(row["erased"], json!(true), "{row}");
        assert!(row.get("personal").is_none() && row.get("auth0_id").is_none(), "{row}");
    }
    let recorded: serde_json::Value =
        sqlx::query_scalar("SELECT event_data FROM events WHERE event_type = 'UserErased' AND aggregate_id = $1::uuid")
            .bind(V1_USER)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(recorded["redacted_positions"], json!(fixture_positions), "{recorded}");
    let erased_position = erased.position.to_string();
    eventually(Duration::from_secs(30), "the redacted entries gone from the stream", || async {
        let entries = stream_entries(&app).await;
        let published = entries.iter().any(|(_, f)| f.get("position") == Some(&erased_position));
        let left = entries
            .iter()
            .filter(|(_, f)| fixture_positions.iter().any(|p| f.get("position") == Some(&p.to_string())))
            .count();
        Ok((published && left == 0).then_some(()))
    })
    .await
    .unwrap();
    let user = get_user(&client, V1_USER, erased.position).await;
    assert_eq!((user.status, user.erased, user.github_username.as_str()), (UserStatus::Erased as i32, true, ""));

    let needles: Vec<(&str, String)> = vec![
        ("the login", "v1-fixture-login-4242".to_owned()),
        ("the renamed login", "v1-fixture-renamed-4242".to_owned()),
        ("the display name", "Vera Fixture-Oldschema".to_owned()),
        ("the Auth0 subject", format!("github|{V1_GITHUB_ID}")),
        ("the GitHub id", V1_GITHUB_ID.to_string()),
        ("the ETag", "v1-etag-4242".to_owned()),
    ];
    let pg = pg_dump(&app).await;
    let redis = redis_dump(&app).await;
    let found = leaks(&[("pg_dump", pg.as_str()), ("the Redis dump", redis.as_str())], &needles);
    assert!(found.is_empty(), "the schema-1 person outlived the erasure:\n{}", found.join("\n"));

    projector.stop().await;
    query.stop().await;
    command.stop().await;
    app.stop().await;
}

/// Development on one machine: without `KIROKU_MASTER_KEY` and with `KIROKU_DEV_MASTER_KEY_IN_DATABASE=true` (what
/// `kiroku dev` sets), the services share a master key the migrations keep in the database, so what the command
/// service seals, the query service and the projector open.
#[tokio::test]
async fn in_development_services_share_a_master_key_kept_in_the_database() {
    const DEV: (&str, &str) = ("KIROKU_DEV_MASTER_KEY_IN_DATABASE", "true");
    let app = CommandApp::spawn_with(&[("KIROKU_MASTER_KEY", ""), DEV]).await;
    app.github_knows(515_151_515, "kept-key-login", Some("Kept Key")).await;
    let registered = app.register(515_151_515, "").await.unwrap();
    let (query, client) = app.start_query(&[("KIROKU_MASTER_KEY", ""), DEV]).await;
    let projector = app.start_projector(&[("KIROKU_MASTER_KEY", ""), DEV]).await;
    let events = history(&client, &registered.user_id).await;
    let Some(Kind::StructValue(personal)) = field(events[0].data.as_ref().unwrap(), "personal") else {
        panic!("{:?}", events[0])
    };
    assert_eq!(field(personal, "github_username"), Some(&Kind::StringValue("kept-key-login".to_owned())));
    let user = get_user(&client, &registered.user_id, registered.position).await;
    assert_eq!(user.display_name, "Kept Key");
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT event_data FROM events WHERE event_type = 'UserRegistered'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(stored.get("sealed").is_some() && !stored.to_string().contains("kept-key-login"), "{stored}");
    projector.stop().await;
    query.stop().await;
    app.stop().await;
}
