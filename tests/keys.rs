//! Master keys and data keys in operation: one key that does not unwrap stops one person's events, not everyone's;
//! a start-up finds a master key that opens some keys but not the people's.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{CommandApp, field};
use fred::prelude::*;
use kiroku::v1::{WatchEventsRequest, watch_events_request, watch_events_response};
use kiroku_event_store::{EventStore, StoredKey};
use kiroku_testkit::{ServiceProcess, TEST_MASTER_KEY, eventually, free_address, metric, scrape};
use kiroku_vault::{MasterKeys, Vault};
use prost_types::value::Kind;
use uuid::Uuid;

#[tokio::test]
async fn one_data_key_that_does_not_unwrap_is_dead_lettered_and_everyone_else_flows() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    for id in 1..=3 {
        app.github_knows(id, &format!("user{id}"), None).await;
    }
    let broken = app.register(1, "").await.unwrap();
    // A bit flipped in the wrapped key of the first person: it no longer unwraps (a corrupt row, say).
    sqlx::query(
        "UPDATE data_keys SET wrapped = set_byte(wrapped, 20, get_byte(wrapped, 20) # 1) WHERE owner_id = $1::uuid",
    )
    .bind(&broken.user_id)
    .execute(&app.db.pool)
    .await
    .unwrap();
    app.register(2, "").await.unwrap();
    let last = app.register(3, "").await.unwrap();

    // The projector dead-letters that person's event at once, says why, counts it, and applies everyone else.
    let metrics = free_address();
    let env = app.projector_process_env(&[("KIROKU_METRICS_ADDR", &metrics.to_string())]);
    let mut projector = ServiceProcess::spawn("kiroku-projector", &env).unwrap();
    app.wait_for_users(2).await;
    let failures: Vec<(String, String)> = eventually(Duration::from_secs(20), "the dead letter", || async {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT state, last_error FROM projection_failures WHERE aggregate_id = $1::uuid")
                .bind(&broken.user_id)
                .fetch_all(&app.db.pool)
                .await?;
        Ok((!rows.is_empty()).then_some(rows))
    })
    .await
    .unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, "dead");
    assert!(failures[0].1.contains("does not unwrap"), "{}", failures[0].1);
    eventually(Duration::from_secs(20), "the counters", || async {
        let text = scrape(metrics).await?;
        let counted = metric(&text, "kiroku_vault_unopenable_events_total", &[]).unwrap_or(0.0) >= 1.0
            && metric(&text, "kiroku_projector_dead_lettered_total", &[]).unwrap_or(0.0) >= 1.0;
        Ok(counted.then_some(()))
    })
    .await
    .unwrap();
    let dead: Vec<(String, HashMap<String, String>)> =
        app.redis.client.xrange(app.redis.dead_letters_stream(), "-", "+", None).await.unwrap();
    assert_eq!(dead.len(), 1, "published like any dead letter");

    // The live feed goes on for everyone: that person's event comes without its personal data, marked.
    let request =
        WatchEventsRequest { start: Some(watch_events_request::Start::FromBeginning(true)), ..Default::default() };
    let mut stream = client.clone().watch_events(request).await.unwrap().into_inner();
    let mut events = Vec::new();
    while events.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(watch_events_response::Kind::Event(event)) = message.kind {
            events.push(event);
        }
    }
    assert_eq!(events.last().unwrap().position, last.position);
    let first = events[0].data.as_ref().unwrap();
    assert_eq!(events[0].aggregate_id, broken.user_id);
    assert_eq!(field(first, "personal_unavailable"), Some(&Kind::BoolValue(true)), "{first:?}");
    assert!(field(first, "personal").is_none() && field(first, "sealed").is_none(), "{first:?}");
    assert!(field(events[1].data.as_ref().unwrap(), "personal").is_some(), "the others open");
    projector.terminate(Duration::from_secs(10)).await.unwrap();
    query.stop().await;
    app.stop().await;
}

/// A rotation half done: the people's data keys moved to a new master key, the blind index's stayed under the old
/// one. A service given only the old key used to start (the start-up check opened the index key alone) and then
/// fail every read; it is refused at start-up, naming the master key it lacks.
#[tokio::test]
async fn a_start_up_finds_a_master_key_that_opens_the_index_key_but_not_the_peoples() {
    let app = CommandApp::spawn().await;
    for id in 1..=3 {
        app.github_knows(id, &format!("user{id}"), None).await;
        app.register(id, "").await.unwrap();
    }
    let store = EventStore::new(app.db.pool.clone());
    let index = Uuid::nil();
    let Some(StoredKey::Live(index_key)) = store.keys(&[index]).await.unwrap().remove(&index) else { panic!() };
    let new_key = kiroku_vault::generate_master_key().unwrap();
    let rotated = Vault::new(store.clone(), Arc::new(MasterKeys::parse(&new_key, Some(TEST_MASTER_KEY)).unwrap()));
    assert_eq!(rotated.rewrap().await.unwrap(), 4, "the three people's keys and the index key");
    sqlx::query("UPDATE data_keys SET master_key_id = $2, wrapped = $3 WHERE owner_id = $1")
        .bind(index)
        .bind(&index_key.master_key_id)
        .bind(&index_key.wrapped)
        .execute(&app.db.pool)
        .await
        .unwrap();

    let old_only = Vault::new(store.clone(), Arc::new(MasterKeys::parse(TEST_MASTER_KEY, None).unwrap()));
    let refused = old_only.check().await.unwrap_err();
    let new_id = MasterKeys::parse(&new_key, None).unwrap().current_id().unwrap().to_owned();
    assert!(refused.to_string().contains(&new_id), "names the master key it lacks: {refused}");
    let both = Vault::new(store, Arc::new(MasterKeys::parse(&new_key, Some(TEST_MASTER_KEY)).unwrap()));
    both.check().await.unwrap();
    app.stop().await;
}

/// `kiroku <args>` with `env`, its output.
async fn kiroku(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new(kiroku_testkit::binary_path("kiroku"))
        .args(args)
        .env_remove("KIROKU_MASTER_KEY")
        .env_remove("KIROKU_PREVIOUS_MASTER_KEYS")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

/// A plain-SQL dump of a database (as an operator's nightly backup would be), to restore with `restore`.
async fn pg_dump(url: &str) -> Vec<u8> {
    let output = tokio::process::Command::new("pg_dump")
        .args(["--format=plain", "--no-owner", "--dbname", url])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "pg_dump: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// A fresh database holding `dump`.
async fn restore(dump: &[u8]) -> kiroku_testkit::TestDb {
    let restored = kiroku_testkit::TestDb::create_empty().await.unwrap();
    let file = std::env::temp_dir().join(format!("kiroku-dump-{}.sql", Uuid::new_v4()));
    std::fs::write(&file, dump).unwrap();
    let output = tokio::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &restored.url, "-f"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(output.status.success(), "psql: {}", String::from_utf8_lossy(&output.stderr));
    restored
}

/// A user's events in `pool`, opened with the tests' master key.
async fn opened(pool: &sqlx::PgPool, user_id: &str) -> Result<Vec<serde_json::Value>, String> {
    let store = EventStore::new(pool.clone());
    let vault = Vault::new(store.clone(), Arc::new(MasterKeys::parse(TEST_MASTER_KEY, None).unwrap()));
    let events = store.read_stream(user_id.parse().unwrap(), kiroku_event_store::Version::NONE, 100).await.unwrap();
    vault.open(events).await.map(|events| events.into_iter().map(|e| e.data).collect()).map_err(|e| e.to_string())
}

/// The restore steps the README gives, run: a pg_dump taken before an erasure, restored into a fresh database
/// after it, then `kiroku erasure reapply` with the erasure ledger: the person is unreadable there again, and
/// everyone else reads as before.
#[tokio::test]
async fn a_backup_from_before_an_erasure_is_erased_again_from_the_ledger_after_a_restore() {
    let ledger = std::env::temp_dir().join(format!("kiroku-ledger-{}.jsonl", Uuid::new_v4()));
    let ledger_text = ledger.to_str().unwrap().to_owned();
    let app = CommandApp::spawn_with(&[("KIROKU_ERASURE_LEDGER", &ledger_text)]).await;
    app.github_knows(11, "restored-gone", Some("Gone Again")).await;
    app.github_knows(12, "restored-kept", None).await;
    let gone = app.register(11, "").await.unwrap();
    app.register(11, "").await.unwrap_err(); // a refused attempt, which names them
    let kept = app.register(12, "").await.unwrap();
    let backup = pg_dump(&app.db.url).await;

    let erase = kiroku::v1::EraseUserRequest { user_id: gone.user_id.clone(), request_id: "erase-1".to_owned() };
    app.client.clone().erase_user(erase.clone()).await.unwrap();
    app.client.clone().erase_user(erase).await.unwrap(); // a retry: its line again, which readers take once
    let lines = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(lines.lines().count(), 2);
    assert!(lines.contains(&gone.user_id) && !lines.contains("restored-gone") && !lines.contains("github|11"));

    // Restored, the backup opens the person's data again: that is what the ledger is for.
    let restored = restore(&backup).await;
    let before = opened(&restored.pool, &gone.user_id).await.unwrap();
    assert_eq!(before[0]["personal"]["github_username"], "restored-gone");

    let env = [
        ("DATABASE_URL", restored.url.as_str()),
        ("KIROKU_MASTER_KEY", TEST_MASTER_KEY),
        ("KIROKU_ERASURE_LEDGER", ledger_text.as_str()),
    ];
    let output = kiroku(&["erasure", "reapply"], &env).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["erased"], serde_json::json!([gone.user_id]), "{report}");

    let after = opened(&restored.pool, &gone.user_id).await.unwrap();
    assert!(after.iter().all(|data| data.get("personal").is_none()), "{after:?}");
    assert_eq!(after[0]["erased"], true);
    let claims: i64 = sqlx::query_scalar("SELECT count(*) FROM claims WHERE owner_id = $1::uuid")
        .bind(&gone.user_id)
        .fetch_one(&restored.pool)
        .await
        .unwrap();
    assert_eq!(claims, 0, "their identities are released there too");
    let others = opened(&restored.pool, &kept.user_id).await.unwrap();
    assert_eq!(others[0]["personal"]["github_username"], "restored-kept", "everyone else reads fine");
    // Once is enough: run again, it finds them erased.
    let again = kiroku(&["erasure", "reapply"], &env).await;
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!((report["erased"].clone(), report["already_erased"].clone()), (serde_json::json!([]), 1.into()));
    std::fs::remove_file(&ledger).unwrap();
    app.stop().await;
}

/// Master-key epochs: `kiroku keys rotate` moves every data key to the new master key; `kiroku keys retire`
/// refuses while a data key still needs the old one, then retires it. No service starts with it any more, and a
/// backup from before the rotation, restored, cannot be opened at all with the keys in use.
#[tokio::test]
async fn a_retired_master_key_takes_the_backups_only_it_opens_with_it() {
    let app = CommandApp::spawn().await;
    app.github_knows(21, "epoch", None).await;
    let user = app.register(21, "").await.unwrap();
    let backup = pg_dump(&app.db.url).await;
    let new = kiroku_vault::generate_master_key().unwrap();
    let old_id = MasterKeys::parse(TEST_MASTER_KEY, None).unwrap().current_id().unwrap().to_owned();
    let new_id = MasterKeys::parse(&new, None).unwrap().current_id().unwrap().to_owned();
    let env = [
        ("DATABASE_URL", app.db.url.as_str()),
        ("KIROKU_MASTER_KEY", new.as_str()),
        ("KIROKU_PREVIOUS_MASTER_KEYS", TEST_MASTER_KEY),
    ];

    let early = kiroku(&["keys", "retire", &old_id], &env).await;
    assert!(!early.status.success(), "refused while data keys need it");
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("still wraps"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    let rotated = kiroku(&["keys", "rotate"], &env).await;
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let report: serde_json::Value = serde_json::from_slice(&rotated.stdout).unwrap();
    assert_eq!(report["data_keys_by_master_key"], serde_json::json!({ new_id.clone(): 2 }), "{report}");
    let retired = kiroku(&["keys", "retire", &old_id], &env).await;
    assert!(retired.status.success(), "{}", String::from_utf8_lossy(&retired.stderr));

    // A service still given the retired key refuses to start; the new key alone opens everything.
    let store = EventStore::new(app.db.pool.clone());
    let with_old = Vault::new(store.clone(), Arc::new(MasterKeys::parse(&new, Some(TEST_MASTER_KEY)).unwrap()));
    let refused = with_old.check().await.unwrap_err();
    assert!(matches!(&refused, kiroku_vault::VaultError::Retired(id) if *id == old_id), "{refused}");
    let current = Vault::new(store.clone(), Arc::new(MasterKeys::parse(&new, None).unwrap()));
    current.check().await.unwrap();
    let events = store.read_stream(user.user_id.parse().unwrap(), kiroku_event_store::Version::NONE, 10).await.unwrap();
    assert_eq!(current.open(events).await.unwrap()[0].data["personal"]["github_username"], "epoch");

    // The backup from before the rotation: its keys are wrapped by the retired key alone.
    let restored = restore(&backup).await;
    let in_use = Vault::new(EventStore::new(restored.pool.clone()), Arc::new(MasterKeys::parse(&new, None).unwrap()));
    let unopened = in_use.check().await.unwrap_err();
    assert!(matches!(&unopened, kiroku_vault::VaultError::UnknownMasterKey(id) if *id == old_id), "{unopened}");
    app.stop().await;
}
