//! Data keys in a real database: sealing and opening across processes, erasure, and a master key rotation.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chrono::Utc;
use kiroku_event_store::{Append, AppendOutcome, Erasure, EventMetadata, EventStore, ExpectedVersion, NewEvent};
use kiroku_testkit::TestDb;
use kiroku_vault::{MasterKeys, SealingKey, Vault, generate_master_key};
use serde_json::json;
use uuid::Uuid;

fn event(personal: serde_json::Value) -> NewEvent {
    NewEvent {
        event_type: "UserRegistered".to_owned(),
        data: json!({ "registered_at": "2026-11-27T06:00:00Z", "personal": personal }),
        metadata: EventMetadata {
            request_id: None,
            correlation_id: "c".to_owned(),
            causation_id: "c".to_owned(),
            schema_version: kiroku_domain::SCHEMA_VERSION,
            caller: None,
            traceparent: None,
        },
        occurred_at: Utc::now(),
    }
}

/// Appends one sealed registration of `owner` with their new key; returns the append.
async fn register(store: &EventStore, vault: &Vault, owner: Uuid, personal: serde_json::Value) {
    let (key, wrapped) = vault.new_key(owner).unwrap();
    let mut events = vec![event(personal)];
    vault.seal(owner, &SealingKey::Live(key), &mut events).unwrap();
    let append = Append {
        aggregate_id: owner,
        aggregate_type: "User".to_owned(),
        expected: ExpectedVersion::NoStream,
        events,
        claims: vec![],
        idempotency: None,
        new_key: Some(wrapped),
        erasure: None,
    };
    assert!(matches!(store.append(&append).await.unwrap(), AppendOutcome::Appended(_)));
}

/// The owners' events, in order (read by stream: no waiting for the log's horizon).
async fn stored(store: &EventStore, owners: &[Uuid]) -> Vec<kiroku_event_store::RecordedEvent> {
    let mut events = Vec::new();
    for owner in owners {
        events.extend(store.read_stream(*owner, kiroku_event_store::Version::NONE, 100).await.unwrap());
    }
    events
}

fn keys(current: &str, previous: Option<&str>) -> Arc<MasterKeys> {
    Arc::new(MasterKeys::parse(current, previous).unwrap())
}

#[tokio::test]
async fn a_rotation_rewraps_every_key_and_the_old_master_key_can_then_go() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let (old, new) = (generate_master_key().unwrap(), generate_master_key().unwrap());
    let before = Vault::new(store.clone(), keys(&old, None));
    let owners: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (n, owner) in owners.iter().enumerate() {
        register(&store, &before, *owner, json!({ "github_username": format!("rotated-{n}") })).await;
    }
    let stored = stored(&store, &owners).await;
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|e| e.data.get("sealed").is_some() && !e.data.to_string().contains("rotated")));

    // Only the new key: nothing opens (an error, never "erased").
    assert!(Vault::new(store.clone(), keys(&new, None)).open(stored.clone()).await.is_err());
    // No index key was made yet, but the start-up check tries the people's keys too, and says which master key
    // it lacks.
    let lacking = Vault::new(store.clone(), keys(&new, None)).check().await.unwrap_err();
    assert!(matches!(lacking, kiroku_vault::VaultError::UnknownMasterKey(_)), "{lacking}");
    assert!(Vault::new(store.clone(), keys(&new, Some(&old))).check().await.is_ok());
    // New and old: everything opens; the rotation moves every key; then the new key alone suffices.
    let rotating = Vault::new(store.clone(), keys(&new, Some(&old)));
    assert_eq!(rotating.rewrap().await.unwrap(), 3);
    assert_eq!(rotating.rewrap().await.unwrap(), 0, "nothing left to move");
    let opened = Vault::new(store.clone(), keys(&new, None)).open(stored).await.unwrap();
    let logins: Vec<&str> = opened.iter().map(|e| e.data["personal"]["github_username"].as_str().unwrap()).collect();
    assert_eq!(logins, ["rotated-0", "rotated-1", "rotated-2"]);
}

#[tokio::test]
async fn an_erased_owner_opens_as_erased_and_gets_no_new_key() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let vault = Vault::new(store.clone(), keys(&generate_master_key().unwrap(), None));
    let (gone, kept) = (Uuid::now_v7(), Uuid::now_v7());
    register(&store, &vault, gone, json!({ "github_username": "gone" })).await;
    register(&store, &vault, kept, json!({ "github_username": "kept" })).await;
    let erase = Append {
        aggregate_id: gone,
        aggregate_type: "User".to_owned(),
        expected: ExpectedVersion::Exact(kiroku_event_store::Version::from(1u16)),
        events: vec![NewEvent { event_type: "UserErased".to_owned(), data: json!({}), ..event(json!({})) }],
        claims: vec![],
        idempotency: None,
        new_key: None,
        erasure: Some(Erasure { owner: gone, redactions: vec![], forget_callers: vec![] }),
    };
    store.append(&erase).await.unwrap();

    let opened = vault.open(stored(&store, &[gone, kept]).await).await.unwrap();
    let by_owner = |owner: Uuid| opened.iter().find(|e| e.aggregate_id == owner && e.version.get() == 1).unwrap();
    assert_eq!(by_owner(gone).data, json!({ "registered_at": "2026-11-27T06:00:00Z", "erased": true }));
    assert_eq!(by_owner(kept).data["personal"]["github_username"], "kept");
    // A write about the erased person after the fact cannot make them a fresh key: it is written erased.
    assert!(matches!(vault.key_or_create(gone).await.unwrap(), SealingKey::Erased));
    let mut late = vec![event(json!({ "github_username": "gone" }))];
    vault.seal(gone, &vault.key_or_create(gone).await.unwrap(), &mut late).unwrap();
    assert_eq!(late[0].data, json!({ "registered_at": "2026-11-27T06:00:00Z", "erased": true }));
}

#[tokio::test]
async fn without_a_configured_master_key_services_share_the_one_kept_in_the_database() {
    // The migrations made it: no service role may write the table.
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let first = Vault::new(store.clone(), Arc::new(MasterKeys::in_database()));
    assert!(first.new_key(Uuid::now_v7()).is_err(), "nothing is sealed before the key is loaded");
    first.check().await.unwrap();
    let owner = Uuid::now_v7();
    register(&store, &first, owner, json!({ "github_username": "kept-in-db" })).await;
    // Another service (its own process, its own MasterKeys) loads the same key and opens what the first sealed.
    let second = Vault::new(store.clone(), Arc::new(MasterKeys::in_database()));
    second.check().await.unwrap();
    let opened = second.open(stored(&store, &[owner]).await).await.unwrap();
    assert_eq!(opened[0].data["personal"]["github_username"], "kept-in-db");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM database_master_key").fetch_one(&db.pool).await.unwrap();
    assert_eq!(kept, 1);
}

#[test]
fn a_master_key_is_required_unless_development_asks_for_the_one_in_a_local_database() {
    let source = |url: &'static str, dev: bool| {
        move |name: &str| match name {
            "DATABASE_URL" => Some(url.to_owned()),
            "KIROKU_DEV_MASTER_KEY_IN_DATABASE" => dev.then(|| "true".to_owned()),
            _ => None,
        }
    };
    // A database on loopback used to be enough; the development key is now asked for by name.
    let error = kiroku_vault::master_keys(&source("postgres://postgres@127.0.0.1:5432/kiroku", false)).unwrap_err();
    assert_eq!(error.name, "KIROKU_MASTER_KEY");
    for local in [
        "postgres://postgres@127.0.0.1:5432/kiroku",
        "postgres://postgres@localhost/kiroku",
        "postgres://postgres@db.internal/kiroku?host=/var/run/postgresql",
        "postgres://postgres@db.internal/kiroku?host=127.0.0.1",
    ] {
        assert!(kiroku_vault::master_keys(&source(local, true)).is_ok(), "{local}");
    }
    // Where sqlx really connects decides, not the URL's host alone.
    for remote in [
        "postgres://kiroku@db.internal:5432/kiroku",
        "postgres://kiroku@127.0.0.1:5432/kiroku?hostaddr=10.0.0.5",
        "postgres://kiroku@localhost/kiroku?host=db.internal",
    ] {
        let error = kiroku_vault::master_keys(&source(remote, true)).unwrap_err();
        assert_eq!(error.name, "KIROKU_DEV_MASTER_KEY_IN_DATABASE", "{remote}");
    }
}
