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
