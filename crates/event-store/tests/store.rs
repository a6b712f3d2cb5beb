//! The event store against a real PostgreSQL, one database per test.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kiroku_event_store::{
    Append, AppendError, AppendOutcome, Appended, Claim, Erasure, EventMetadata, EventStore, ExpectedVersion,
    IdempotencyKey, IdempotencyRecord, NewEvent, Position, RecordedEvent, append_in_transaction,
};
use kiroku_testkit::TestDb;
use serde_json::json;
use tokio::sync::Barrier;
use uuid::Uuid;

fn event(event_type: &str, n: u64) -> NewEvent {
    NewEvent {
        event_type: event_type.to_owned(),
        data: json!({ "n": n }),
        metadata: EventMetadata {
            request_id: Some(format!("req-{n}")),
            correlation_id: format!("corr-{n}"),
            causation_id: format!("cause-{n}"),
            schema_version: 1,
            caller: None,
            traceparent: None,
        },
        occurred_at: Utc::now(),
    }
}

fn append_to(aggregate_id: Uuid, expected: ExpectedVersion, events: Vec<NewEvent>) -> Append {
    Append {
        aggregate_id,
        aggregate_type: "Thing".to_owned(),
        expected,
        events,
        claims: vec![],
        idempotency: None,
        new_key: None,
        erasure: None,
    }
}

fn appended(outcome: AppendOutcome) -> Appended {
    match outcome {
        AppendOutcome::Appended(appended) => appended,
        AppendOutcome::Replayed(stored) => panic!("expected an append, got a replay of {stored:?}"),
    }
}

/// Everything final in the log, read in batches the way a follower does.
async fn read_everything(store: &EventStore) -> Vec<RecordedEvent> {
    // The horizon is cluster-wide: a transaction of another test running in parallel may hold it back for a
    // moment. Wait until every committed event is final, so that "everything" means everything.
    let committed = store.head().await.unwrap();
    if committed > Position::ZERO {
        kiroku_testkit::eventually(Duration::from_secs(30), "committed events to be final", || async {
            Ok((store.safe_horizon().await? >= committed).then_some(()))
        })
        .await
        .unwrap();
    }
    let mut all = Vec::new();
    let mut after = Position::ZERO;
    loop {
        let batch = store.read_all_after(after, 500).await.unwrap();
        let Some(last) = batch.last() else { return all };
        after = last.position;
        all.extend(batch);
    }
}

#[tokio::test]
async fn appended_events_read_back_in_version_and_position_order_with_their_metadata() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let id = Uuid::new_v4();

    let first = appended(
        store
            .append(&append_to(id, ExpectedVersion::NoStream, vec![event("Created", 1), event("Renamed", 2)]))
            .await
            .unwrap(),
    );
    let second = appended(
        store
            .append(&append_to(
                id,
                ExpectedVersion::Exact(kiroku_event_store::Version::from(2u16)),
                vec![event("Renamed", 3)],
            ))
            .await
            .unwrap(),
    );
    assert_eq!(first.version.get(), 2);
    assert_eq!(second.version.get(), 3);
    assert!(first.positions[0] < first.positions[1] && first.positions[1] < second.positions[0]);

    let stream = store.read_stream(id, kiroku_event_store::Version::NONE, 100).await.unwrap();
    assert_eq!(stream.iter().map(|e| e.version.get()).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(stream.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(), ["Created", "Renamed", "Renamed"]);
    assert_eq!(stream[0].data, json!({ "n": 1 }));
    assert_eq!(stream[0].aggregate_type, "Thing");
    assert_eq!(
        stream[0].metadata,
        json!({ "request_id": "req-1", "correlation_id": "corr-1", "causation_id": "cause-1", "schema_version": 1 })
    );
    assert_eq!(stream[0].event_id, first.event_ids[0]);
    assert_eq!(stream.iter().map(|e| e.event_id).collect::<HashSet<_>>().len(), 3, "event ids are unique");
    assert_eq!(store.read_stream(id, kiroku_event_store::Version::from(2u16), 100).await.unwrap().len(), 1);
    assert_eq!(store.stream_version(id).await.unwrap().get(), 3);

    let all = read_everything(&store).await;
    assert_eq!(all, stream, "the global read returns the same events in the same order");
    assert!(store.safe_horizon().await.unwrap() >= second.positions[0]);
}

#[tokio::test]
async fn an_append_at_a_stale_version_is_a_conflict_and_writes_nothing() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let id = Uuid::new_v4();
    store.append(&append_to(id, ExpectedVersion::NoStream, vec![event("Created", 1)])).await.unwrap();

    let again = store.append(&append_to(id, ExpectedVersion::NoStream, vec![event("Created", 2)])).await;
    assert!(matches!(again, Err(AppendError::Conflict { actual: Some(v), .. }) if v.get() == 1), "{again:?}");
    let ahead = store
        .append(&append_to(
            id,
            ExpectedVersion::Exact(kiroku_event_store::Version::from(5u16)),
            vec![event("Renamed", 3)],
        ))
        .await;
    assert!(matches!(ahead, Err(AppendError::Conflict { actual: Some(v), .. }) if v.get() == 1), "{ahead:?}");
    assert_eq!(store.read_stream(id, kiroku_event_store::Version::NONE, 100).await.unwrap().len(), 1);
}

#[tokio::test]
async fn of_two_concurrent_appenders_at_one_expected_version_exactly_one_wins() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    for round in 0..20u64 {
        let id = Uuid::new_v4();
        store.append(&append_to(id, ExpectedVersion::NoStream, vec![event("Created", round)])).await.unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let racers = (0..2).map(|n| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .append(&append_to(
                        id,
                        ExpectedVersion::Exact(kiroku_event_store::Version::from(1u16)),
                        vec![event("Renamed", n)],
                    ))
                    .await
            })
        });
        let results = futures::future::join_all(racers).await;
        let wins = results.iter().filter(|r| matches!(r, Ok(Ok(AppendOutcome::Appended(_))))).count();
        let conflicts = results.iter().filter(|r| matches!(r, Ok(Err(AppendError::Conflict { .. })))).count();
        assert_eq!((wins, conflicts), (1, 1), "round {round}: {results:?}");
        assert_eq!(store.stream_version(id).await.unwrap().get(), 2);
    }
}

/// A new stream's append does not read the version first (the unique version key decides): of racers that all
/// expect no stream, one wins and each other learns the version the winner wrote.
#[tokio::test]
async fn of_concurrent_appenders_that_expect_no_stream_exactly_one_wins() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    for round in 0..20u64 {
        let id = Uuid::new_v4();
        let barrier = Arc::new(Barrier::new(3));
        let racers = (0..3u64).map(|n| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let events = (0..=n).map(|i| event("Created", round * 10 + i)).collect();
                store.append(&append_to(id, ExpectedVersion::NoStream, events)).await
            })
        });
        let results: Vec<_> = futures::future::join_all(racers).await.into_iter().map(Result::unwrap).collect();
        let winner: Vec<u32> = results
            .iter()
            .filter_map(|r| if let Ok(AppendOutcome::Appended(a)) = r { Some(a.version.get()) } else { None })
            .collect();
        assert_eq!(winner.len(), 1, "round {round}: {results:?}");
        for result in &results {
            if let Err(error) = result {
                assert!(
                    matches!(error, AppendError::Conflict { actual: Some(v), .. } if v.get() == winner[0]),
                    "round {round}: {results:?}"
                );
            }
        }
        assert_eq!(store.stream_version(id).await.unwrap().get(), winner[0]);
        assert_eq!(
            store.read_stream(id, kiroku_event_store::Version::NONE, 100).await.unwrap().len() as u32,
            winner[0],
            "only the winner's events"
        );
    }
}

#[tokio::test]
async fn a_reader_never_passes_an_open_transaction_that_has_appended() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());

    // The first writer appends and stays open: its events take the lower position.
    let mut open = db.pool.begin().await.unwrap();
    let early = appended(
        append_in_transaction(
            &mut open,
            &append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Early", 1)]),
        )
        .await
        .unwrap(),
    );
    // The second writer appends and commits: a higher position, visible first.
    let late = appended(
        store.append(&append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Late", 2)])).await.unwrap(),
    );
    assert!(early.positions[0] < late.positions[0]);

    // While the first is open, a follower must not deliver the later event: it would then skip the earlier one.
    for _ in 0..5 {
        assert!(store.read_all_after(Position::ZERO, 100).await.unwrap().is_empty());
        assert!(store.safe_horizon().await.unwrap() < early.positions[0]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    open.commit().await.unwrap();
    let delivered = read_everything(&store).await;
    assert_eq!(
        delivered.iter().map(|e| e.position).collect::<Vec<_>>(),
        [early.positions[0], late.positions[0]],
        "both, in position order"
    );
}

#[tokio::test]
async fn a_rolled_back_append_leaves_a_gap_that_readers_pass_over() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let mut open = db.pool.begin().await.unwrap();
    append_in_transaction(&mut open, &append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Lost", 1)]))
        .await
        .unwrap();
    let late = appended(
        store.append(&append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Kept", 2)])).await.unwrap(),
    );
    assert!(store.read_all_after(Position::ZERO, 100).await.unwrap().is_empty());
    open.rollback().await.unwrap();
    let delivered = read_everything(&store).await;
    assert_eq!(delivered.iter().map(|e| e.position).collect::<Vec<_>>(), [late.positions[0]]);
}

#[tokio::test]
async fn sixteen_concurrent_writers_are_followed_without_a_skip_or_a_duplicate() {
    const WRITERS: u64 = 16;
    const EACH: u64 = 2_000;
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..EACH {
                    let id = Uuid::new_v4();
                    store
                        .append(&append_to(id, ExpectedVersion::NoStream, vec![event("Written", w * EACH + n)]))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();

    // The follower reads small batches as fast as it can, concurrently with the writers.
    let follower = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen = Vec::with_capacity((WRITERS * EACH) as usize);
            let mut after = Position::ZERO;
            while (seen.len() as u64) < WRITERS * EACH {
                let batch = store.read_all_after(after, 100).await.unwrap();
                for e in batch {
                    assert!(e.position > after, "positions strictly increase");
                    after = e.position;
                    seen.push((e.position, e.data["n"].as_u64().unwrap()));
                }
            }
            seen
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    let followed = tokio::time::timeout(Duration::from_secs(120), follower).await.unwrap().unwrap();

    let distinct: HashSet<u64> = followed.iter().map(|(_, n)| *n).collect();
    assert_eq!(distinct.len() as u64, WRITERS * EACH, "every event exactly once");
    let fresh: Vec<(Position, u64)> =
        read_everything(&store).await.iter().map(|e| (e.position, e.data["n"].as_u64().unwrap())).collect();
    assert_eq!(fresh, followed, "a fresh read from the start returns the same order");
}

#[tokio::test]
async fn a_claim_taken_twice_concurrently_lets_exactly_one_transaction_commit() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let claim = Claim { kind: "github_id".to_owned(), value: "h1~583231".to_owned() };
    let claimed = |id: Uuid| Append {
        claims: vec![claim.clone()],
        ..append_to(id, ExpectedVersion::NoStream, vec![event("Claimed", 0)])
    };

    // Deterministically: the first claimant is open when the second arrives; the second waits and is refused.
    let first_id = Uuid::new_v4();
    let mut first = db.pool.begin().await.unwrap();
    append_in_transaction(&mut first, &claimed(first_id)).await.unwrap();
    let second = {
        let (store, append) = (store.clone(), claimed(Uuid::new_v4()));
        tokio::spawn(async move { store.append(&append).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "the second claimant waits for the first to finish");
    first.commit().await.unwrap();
    match second.await.unwrap() {
        Err(AppendError::ClaimRefused { kind, value, owner }) => {
            assert_eq!((kind.as_str(), value.as_str(), owner), ("github_id", "h1~583231", first_id));
        }
        other => panic!("expected ClaimRefused, got {other:?}"),
    }

    // And by force of numbers: 30 claimants of a fresh key at once, one commits.
    let contested = Claim { kind: "auth0_subject".to_owned(), value: "h1~github|1".to_owned() };
    let barrier = Arc::new(Barrier::new(30));
    let racers = (0..30).map(|_| {
        let (store, barrier) = (store.clone(), barrier.clone());
        let append = Append {
            claims: vec![contested.clone()],
            ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Claimed", 1)])
        };
        tokio::spawn(async move {
            barrier.wait().await;
            store.append(&append).await
        })
    });
    let results = futures::future::join_all(racers).await;
    let winners: Vec<Uuid> = results
        .iter()
        .filter_map(|r| match r {
            Ok(Ok(AppendOutcome::Appended(a))) => Some(a.aggregate_id),
            _ => None,
        })
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for result in &results {
        if let Ok(Err(AppendError::ClaimRefused { owner, .. })) = result {
            assert_eq!(*owner, winners[0], "a refusal names the key's owner");
        }
    }
    assert_eq!(store.claim_owner(&contested).await.unwrap(), Some(winners[0]));
    assert_eq!(read_everything(&store).await.iter().filter(|e| e.data["n"] == 1).count(), 1);
}

#[tokio::test]
async fn the_same_idempotency_key_twice_writes_one_set_of_events_and_answers_the_same() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let key = IdempotencyKey { caller: "github|42".to_owned(), request_id: "retry-me".to_owned() };
    let command = |answer: &str| Append {
        new_key: None,
        erasure: None,
        idempotency: Some(IdempotencyRecord { key: key.clone(), outcome: json!({ "answer": answer }) }),
        ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Done", 7)])
    };

    let first = appended(store.append(&command("first")).await.unwrap());
    let AppendOutcome::Replayed(replay) = store.append(&command("second")).await.unwrap() else {
        panic!("the repeat must replay");
    };
    assert_eq!(replay.outcome, json!({ "answer": "first" }));
    assert_eq!(
        (replay.aggregate_id, replay.version.get(), replay.position),
        (first.aggregate_id, 1, first.last_position())
    );
    assert_eq!(store.stored_outcome(&key).await.unwrap(), Some(replay));

    // Concurrent repeats of a fresh key: one writes, the rest wait for it and replay its answer.
    let fresh = IdempotencyKey { caller: "github|42".to_owned(), request_id: "concurrent".to_owned() };
    let barrier = Arc::new(Barrier::new(10));
    let racers = (0..10).map(|n| {
        let (store, barrier) = (store.clone(), barrier.clone());
        let append = Append {
            new_key: None,
            erasure: None,
            idempotency: Some(IdempotencyRecord { key: fresh.clone(), outcome: json!({ "answer": n }) }),
            ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Concurrent", 100)])
        };
        tokio::spawn(async move {
            barrier.wait().await;
            store.append(&append).await.unwrap()
        })
    });
    let results: Vec<AppendOutcome> = futures::future::join_all(racers).await.into_iter().map(Result::unwrap).collect();
    let written: Vec<&Appended> =
        results.iter().filter_map(|r| if let AppendOutcome::Appended(a) = r { Some(a) } else { None }).collect();
    assert_eq!(written.len(), 1);
    for result in &results {
        if let AppendOutcome::Replayed(stored) = result {
            assert_eq!((stored.aggregate_id, stored.position), (written[0].aggregate_id, written[0].last_position()));
        }
    }
    assert_eq!(read_everything(&store).await.iter().filter(|e| e.event_type == "Concurrent").count(), 1);

    // Another caller may use the same request id for its own command.
    let other = Append {
        new_key: None,
        erasure: None,
        idempotency: Some(IdempotencyRecord {
            key: IdempotencyKey { caller: "github|43".to_owned(), request_id: "retry-me".to_owned() },
            outcome: json!({ "answer": "other" }),
        }),
        ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Done", 8)])
    };
    assert!(matches!(store.append(&other).await.unwrap(), AppendOutcome::Appended(_)));
}

#[tokio::test]
async fn a_refused_claim_leaves_no_idempotency_record_behind() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let claim = Claim { kind: "github_id".to_owned(), value: "h1~9".to_owned() };
    store
        .append(&Append {
            claims: vec![claim.clone()],
            ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Claimed", 1)])
        })
        .await
        .unwrap();
    let key = IdempotencyKey { caller: "github|9".to_owned(), request_id: "r".to_owned() };
    let refused = store
        .append(&Append {
            claims: vec![claim],
            new_key: None,
            erasure: None,
            idempotency: Some(IdempotencyRecord { key: key.clone(), outcome: json!({}) }),
            ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Claimed", 2)])
        })
        .await;
    assert!(matches!(refused, Err(AppendError::ClaimRefused { .. })));
    assert_eq!(store.stored_outcome(&key).await.unwrap(), None);
}

#[tokio::test]
async fn checkpoints_only_move_forward_and_migrations_run_twice_harmlessly() {
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    assert_eq!(store.load_checkpoint("relay").await.unwrap(), Position::ZERO);
    store.save_checkpoint("relay", Position::new(500)).await.unwrap();
    store.save_checkpoint("relay", Position::new(300)).await.unwrap();
    assert_eq!(store.load_checkpoint("relay").await.unwrap(), Position::new(500));
    kiroku_event_store::migrate(&db.pool).await.unwrap();
    kiroku_event_store::migrate(&db.pool).await.unwrap();
}

/// An erasure of a claim's owner that commits between a new append's insert of the claim (which found it held,
/// and so inserted nothing) and its look-up of the owner (which then finds nobody) used to let the append through
/// without the claim (`kiroku_append`) or fail it (a caller's transaction); a later append then took the claim
/// too: two users for one identity. Both ways of appending now take the released claim.
#[tokio::test]
async fn a_claim_released_between_an_appends_insert_and_its_look_up_is_taken_never_skipped() {
    for in_callers_transaction in [false, true] {
        let db = TestDb::create().await.unwrap();
        let store = EventStore::new(db.pool.clone());
        let claim = Claim { kind: "github_id".to_owned(), value: "h1~77".to_owned() };
        let claimed = |id: Uuid| Append {
            claims: vec![claim.clone()],
            ..append_to(id, ExpectedVersion::NoStream, vec![event("Claimed", 1)])
        };
        let owner = Uuid::new_v4();
        store.append(&claimed(owner)).await.unwrap();
        // Every insert into claims then waits, at the end of its statement, for a lock the test holds.
        sqlx::raw_sql(
            "CREATE FUNCTION wait_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_advisory_lock(4712); PERFORM pg_advisory_unlock(4712); RETURN NULL; END $$; \
             CREATE TRIGGER wait_for_the_test AFTER INSERT ON claims FOR EACH STATEMENT \
             EXECUTE FUNCTION wait_for_the_test();",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let mut gate = db.pool.acquire().await.unwrap();
        sqlx::query("SELECT pg_advisory_lock(4712)").execute(&mut *gate).await.unwrap();

        let second = Uuid::new_v4();
        let registering = {
            let (store, pool, append) = (store.clone(), db.pool.clone(), claimed(second));
            tokio::spawn(async move {
                if in_callers_transaction {
                    let mut tx = pool.begin().await.unwrap();
                    let outcome = append_in_transaction(&mut tx, &append).await;
                    if matches!(outcome, Ok(AppendOutcome::Appended(_))) {
                        tx.commit().await.unwrap();
                    }
                    outcome
                } else {
                    store.append(&append).await
                }
            })
        };
        kiroku_testkit::eventually(Duration::from_secs(20), "the append to wait after its claims' insert", || async {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = 4712 \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
            )
            .fetch_one(&db.pool)
            .await?;
            Ok(waiting.then_some(()))
        })
        .await
        .unwrap();
        // The owner is erased meanwhile: its claims are released.
        let erasure = Erasure { owner, redactions: vec![], forget_callers: vec![] };
        store
            .append(&Append {
                erasure: Some(erasure),
                ..append_to(
                    owner,
                    ExpectedVersion::Exact(kiroku_event_store::Version::from(1u16)),
                    vec![event("Erased", 2)],
                )
            })
            .await
            .unwrap();
        sqlx::query("SELECT pg_advisory_unlock(4712)").execute(&mut *gate).await.unwrap();

        let outcome = registering.await.unwrap();
        assert!(matches!(outcome, Ok(AppendOutcome::Appended(_))), "{in_callers_transaction}: {outcome:?}");
        assert_eq!(store.claim_owner(&claim).await.unwrap(), Some(second), "the append holds the claim");
        let third = store.append(&claimed(Uuid::new_v4())).await;
        assert!(
            matches!(&third, Err(AppendError::ClaimRefused { owner, .. }) if *owner == second),
            "a third claimant is refused: {third:?}"
        );
    }
}

#[tokio::test]
async fn an_erasure_finds_its_persons_claims_and_stored_answers_by_index() {
    let db = TestDb::create().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    // With sequential scans priced out, only an index on what the erasure looks for avoids one.
    sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await.unwrap();
    for (statement, index) in [
        ("EXPLAIN DELETE FROM claims WHERE owner_id = '0192f0e4-5b7a-7c3e-9d2a-4c1e8f6b2a10'", "claims_owner_idx"),
        (
            "EXPLAIN DELETE FROM idempotency_records WHERE outcome ->> 'user_id' = '0192f0e4-5b7a-7c3e-9d2a-4c1e8f6b2a10'",
            "idempotency_records_user_idx",
        ),
    ] {
        let plan: Vec<String> = sqlx::query_scalar(statement).fetch_all(&mut *conn).await.unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains(index) && !plan.contains("Seq Scan"), "{statement}:\n{plan}");
    }
}

#[tokio::test]
async fn a_claim_of_an_identity_in_clear_is_refused() {
    // What a command service from before keyed hashes would write, still running during a rolling upgrade: a
    // new service, which looks for the keyed hash, would register the same identity a second time.
    let db = TestDb::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    for (kind, value) in [("github_id", "583231"), ("auth0_subject", "github|583231")] {
        let clear = Append {
            claims: vec![Claim { kind: kind.to_owned(), value: value.to_owned() }],
            ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Claimed", 1)])
        };
        let refused = store.append(&clear).await;
        assert!(matches!(&refused, Err(AppendError::Store(_))), "{kind}: {refused:?}");
        assert!(format!("{:?}", refused).contains("keyed hashes"), "{refused:?}");
    }
    // Claims of other kinds are the caller's business.
    let other = Append {
        claims: vec![Claim { kind: "thing".to_owned(), value: "anything".to_owned() }],
        ..append_to(Uuid::new_v4(), ExpectedVersion::NoStream, vec![event("Claimed", 1)])
    };
    assert!(store.append(&other).await.is_ok());
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 1, "nothing of the refused appends was written");
}
