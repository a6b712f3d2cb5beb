//! WatchEvents end to end: replay then live, resume, filters, progress, slow subscribers, shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{CommandApp, Queries, QueryServiceClient, reason};
use kiroku::v1::{Event, WatchEventsRequest, WatchEventsResponse, watch_events_request, watch_events_response};
use kiroku_event_store::{EventStore, Position};
use tonic::{Code, Streaming};

fn from_beginning() -> WatchEventsRequest {
    WatchEventsRequest { start: Some(watch_events_request::Start::FromBeginning(true)), ..Default::default() }
}

fn after(position: u64) -> WatchEventsRequest {
    WatchEventsRequest { start: Some(watch_events_request::Start::AfterPosition(position)), ..Default::default() }
}

async fn watch(client: &Queries, request: WatchEventsRequest) -> Streaming<WatchEventsResponse> {
    client.clone().watch_events(request).await.unwrap().into_inner()
}

/// What a stream said, message by message.
#[derive(Debug)]
enum Said {
    Event(Event),
    Progress(u64),
    CaughtUp(u64),
}

async fn next(stream: &mut Streaming<WatchEventsResponse>) -> Said {
    let message = tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
    match message.kind.unwrap() {
        watch_events_response::Kind::Event(event) => Said::Event(event),
        watch_events_response::Kind::Progress(p) => Said::Progress(p.position),
        watch_events_response::Kind::CaughtUp(c) => Said::CaughtUp(c.position),
    }
}

/// Collects events until `count` have arrived, checking that exactly one CaughtUp comes at most.
async fn collect_events(stream: &mut Streaming<WatchEventsResponse>, count: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut caught_up = 0;
    while events.len() < count {
        match next(stream).await {
            Said::Event(event) => events.push(event),
            Said::CaughtUp(_) => caught_up += 1,
            Said::Progress(_) => {}
        }
    }
    assert!(caught_up <= 1, "exactly one CaughtUp");
    events
}

async fn all_positions(app: &CommandApp) -> Vec<u64> {
    let store = EventStore::new(app.db.pool.clone());
    let mut positions = Vec::new();
    let mut after = Position::ZERO;
    loop {
        let batch = store.read_all_after(after, 1000).await.unwrap();
        let Some(last) = batch.last() else { return positions };
        after = last.position;
        positions.extend(batch.iter().map(|e| e.position.get()));
    }
}

#[tokio::test]
async fn from_the_beginning_under_sixteen_writers_the_stream_equals_the_store() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    const WRITERS: u64 = 16;
    const EACH: u64 = 15;
    for id in 0..WRITERS * EACH {
        app.github_knows(10_000 + id, &format!("w{id}"), None).await;
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (client, tokens): (_, Vec<String>) =
                (app.client.clone(), (0..EACH).map(|n| app.token(10_000 + w * EACH + n)).collect());
            tokio::spawn(async move {
                let mut client = client;
                for token in tokens {
                    client
                        .register_user(kiroku::v1::RegisterUserRequest {
                            auth0_token: token,
                            request_id: String::new(),
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    // Start watching while the writers are busy.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut stream = watch(&client, from_beginning()).await;
    for writer in writers {
        writer.await.unwrap();
    }
    let events = collect_events(&mut stream, (WRITERS * EACH) as usize).await;
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, all_positions(&app).await, "the same events in the same order, no duplicates");
    query.stop().await;
    app.stop().await;
}

/// A watcher resumed while writers append gets exactly the rest of the log: nothing missing, nothing twice, nothing
/// extra after CaughtUp. It reads until a Progress mark covers the whole log once the writers are done: a mark is
/// sent only after a second with nothing to send, so an extra event would have come before it.
#[tokio::test]
async fn a_resumed_watcher_gets_exactly_the_remaining_events() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    for id in 1..=40 {
        app.github_knows(id, &format!("u{id}"), None).await;
    }
    for id in 1..=20 {
        app.register(id, "").await.unwrap();
    }
    let mut stream = watch(&client, from_beginning()).await;
    let first = collect_events(&mut stream, 8).await;
    drop(stream);
    let resume_after = first.last().unwrap().position;
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (client, tokens): (_, Vec<String>) =
                (app.client.clone(), (0..5).map(|n| app.token(21 + w * 5 + n)).collect());
            tokio::spawn(async move {
                let mut client = client;
                for token in tokens {
                    let request = kiroku::v1::RegisterUserRequest { auth0_token: token, request_id: String::new() };
                    client.register_user(request).await.unwrap();
                }
            })
        })
        .collect();
    let mut resumed = watch(&client, after(resume_after)).await;
    for writer in writers {
        writer.await.unwrap();
    }
    // Every event committed, and final (another test's open transaction may hold the horizon back a moment).
    let store = EventStore::new(app.db.pool.clone());
    let head = store.head().await.unwrap();
    kiroku_testkit::eventually(Duration::from_secs(30), "the log to be final", || async {
        Ok((store.safe_horizon().await? >= head).then_some(()))
    })
    .await
    .unwrap();
    let head = head.get();
    // CaughtUp comes once the replay reads short: after the remaining events, or before some of them when an open
    // transaction (a writer's, a projector's step) held the horizon below them at that moment; those then come live.
    let (mut rest, mut caught_up) = (Vec::new(), None);
    loop {
        match next(&mut resumed).await {
            Said::Event(event) => rest.push(event),
            Said::CaughtUp(position) => {
                assert!(caught_up.replace(position).is_none(), "exactly one CaughtUp");
                assert!(position >= rest.last().map_or(resume_after, |e| e.position), "CaughtUp after what it follows");
            }
            Said::Progress(position) if position >= head && caught_up.is_some() => break,
            Said::Progress(_) => {}
        }
    }
    let together: Vec<u64> = first.iter().chain(&rest).map(|e| e.position).collect();
    assert_eq!(together, all_positions(&app).await, "exactly the log: nothing missing, twice or extra");
    query.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn live_only_sends_what_comes_after_the_call_and_caught_up_first() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(1, "before", None).await;
    app.github_knows(2, "after", None).await;
    let before = app.register(1, "").await.unwrap();
    // Wait until the earlier event is final (another test's open transaction may hold the horizon back).
    let store = EventStore::new(app.db.pool.clone());
    kiroku_testkit::eventually(Duration::from_secs(20), "the first event to be final", || async {
        Ok((store.safe_horizon().await?.get() >= before.position).then_some(()))
    })
    .await
    .unwrap();
    let mut stream = watch(&client, WatchEventsRequest::default()).await;
    assert!(matches!(next(&mut stream).await, Said::CaughtUp(_)), "CaughtUp comes first");
    let registered = app.register(2, "").await.unwrap();
    let events = collect_events(&mut stream, 1).await;
    assert_eq!(events[0].position, registered.position);
    assert_eq!(events[0].aggregate_id, registered.user_id);
    query.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn filters_select_events_and_progress_still_advances() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(1, "one", None).await;
    app.github_knows(2, "two", None).await;
    let one = app.register(1, "").await.unwrap();
    let two = app.register(2, "").await.unwrap();
    app.register(1, "").await.unwrap_err(); // a UserRegistrationFailed
    let head = *all_positions(&app).await.last().unwrap();

    let by_type = WatchEventsRequest { event_types: vec!["UserRegistrationFailed".into()], ..from_beginning() };
    let mut stream = watch(&client, by_type).await;
    let events = collect_events(&mut stream, 1).await;
    assert_eq!(
        (events[0].event_type.as_str(), events[0].aggregate_type.as_str()),
        ("UserRegistrationFailed", "UserRegistrationAudit")
    );

    let by_aggregate_type = WatchEventsRequest { aggregate_types: vec!["User".into()], ..from_beginning() };
    let mut stream = watch(&client, by_aggregate_type).await;
    let events = collect_events(&mut stream, 2).await;
    assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), [one.position, two.position]);

    // One aggregate: only its event, then CaughtUp and progress past the events filtered out.
    let by_id = WatchEventsRequest { aggregate_id: two.user_id.clone(), ..from_beginning() };
    let mut stream = watch(&client, by_id).await;
    let mut saw_event = false;
    let progress = loop {
        match next(&mut stream).await {
            Said::Event(event) => {
                assert_eq!(event.aggregate_id, two.user_id);
                saw_event = true;
            }
            Said::CaughtUp(position) => assert!(position >= head),
            Said::Progress(position) => break position,
        }
    };
    assert!(saw_event);
    assert!(progress >= head, "progress covers events the filter hid");

    let mut query_client = client.clone();
    for bad in [
        WatchEventsRequest { event_types: vec!["NoSuchEvent".into()], ..Default::default() },
        WatchEventsRequest { aggregate_types: vec!["Nope".into()], ..Default::default() },
        WatchEventsRequest { aggregate_id: "not-a-uuid".into(), ..Default::default() },
    ] {
        let status = query_client.watch_events(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let beyond = query_client.watch_events(after(head + (1 << 40))).await.unwrap_err();
    assert_eq!(beyond.code(), Code::OutOfRange);
    assert_eq!(reason(&beyond), "POSITION_OUT_OF_RANGE");
    // A position returned by RegisterUser is always valid.
    query_client.watch_events(after(two.position)).await.unwrap();
    query.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_cut_off_while_another_gets_everything() {
    let app = CommandApp::spawn().await;
    let (query, client) =
        app.start_query(&[("KIROKU_WATCH_BUFFER", "32"), ("KIROKU_WATCH_STALL_TIMEOUT_MS", "1000")]).await;
    let mut healthy = watch(&client, WatchEventsRequest::default()).await;
    let mut stalled = watch(&client, WatchEventsRequest::default()).await;
    assert!(matches!(next(&mut healthy).await, Said::CaughtUp(_)));
    assert!(matches!(next(&mut stalled).await, Said::CaughtUp(_)));

    // The healthy subscriber reads all along.
    let total = 3000;
    let healthy = tokio::spawn(async move { collect_events(&mut healthy, total).await });
    // Many events, with big enough payloads to fill the HTTP/2 windows in front of the stalled client.
    let store = EventStore::new(app.db.pool.clone());
    let padding = "x".repeat(2000);
    for chunk in 0..(total / 100) {
        let append = kiroku_event_store::Append {
            aggregate_id: uuid::Uuid::new_v4(),
            aggregate_type: "User".into(),
            expected: kiroku_event_store::ExpectedVersion::NoStream,
            events: (0..100)
                .map(|n| kiroku_event_store::NewEvent {
                    event_type: "UserProfileUpdated".into(),
                    data: serde_json::json!({ "n": chunk * 100 + n, "padding": padding }),
                    metadata: kiroku_event_store::EventMetadata {
                        request_id: None,
                        correlation_id: "c".into(),
                        causation_id: "c".into(),
                        schema_version: 1,
                        caller: None,
                        traceparent: None,
                    },
                    occurred_at: chrono::Utc::now(),
                })
                .collect(),
            claims: vec![],
            new_key: None,
            erasure: None,
            idempotency: None,
        };
        store.append(&append).await.unwrap();
    }
    let received = healthy.await.unwrap();
    assert_eq!(received.len(), total, "the healthy subscriber gets every event");

    // The stalled subscriber, read at last: what was buffered, then RESOURCE_EXHAUSTED.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut got = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), stalled.message()).await.unwrap() {
            Ok(Some(message)) => {
                if let Some(watch_events_response::Kind::Event(_)) = message.kind {
                    got += 1;
                }
            }
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "CONSUMER_TOO_SLOW");
    assert!(got < total, "cut off, not fed everything ({got})");
    query.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    let mut stream = watch(&client, WatchEventsRequest::default()).await;
    assert!(matches!(next(&mut stream).await, Said::CaughtUp(_)));
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(query.stop());
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    stopping.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    app.stop().await;
}

#[tokio::test]
async fn a_filtered_catch_up_sends_progress_through_stretches_it_filters_out() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    let store = EventStore::new(app.db.pool.clone());
    // 12,000 events of one aggregate, in two appends.
    let busy = uuid::Uuid::new_v4();
    let mut last = Position::ZERO;
    for (round, expected) in [
        (0u64, kiroku_event_store::ExpectedVersion::NoStream),
        (1, kiroku_event_store::ExpectedVersion::Exact(kiroku_event_store::Version::from(6_000u16))),
    ] {
        let events = (0..6_000u64)
            .map(|n| kiroku_event_store::NewEvent {
                event_type: "UserProfileUpdated".to_owned(),
                data: serde_json::json!({ "n": round * 6_000 + n }),
                metadata: kiroku_event_store::EventMetadata {
                    request_id: None,
                    correlation_id: "c".to_owned(),
                    causation_id: "c".to_owned(),
                    schema_version: 1,
                    caller: None,
                    traceparent: None,
                },
                occurred_at: chrono::Utc::now(),
            })
            .collect();
        let append = kiroku_event_store::Append {
            aggregate_id: busy,
            aggregate_type: "User".to_owned(),
            expected,
            events,
            claims: vec![],
            new_key: None,
            erasure: None,
            idempotency: None,
        };
        match store.append(&append).await.unwrap() {
            kiroku_event_store::AppendOutcome::Appended(appended) => last = appended.last_position(),
            replayed => panic!("{replayed:?}"),
        }
    }

    // The horizon is cluster-wide: another test's open transaction may hold it back for a moment.
    kiroku_testkit::eventually(Duration::from_secs(30), "the appends to be final", || async {
        Ok((store.safe_horizon().await? >= last).then_some(()))
    })
    .await
    .unwrap();
    // A subscriber that wants another aggregate, which has no event: a catch-up that sends nothing but must
    // still say how far it has got, and must not read the whole log in one go.
    let request = WatchEventsRequest { aggregate_id: uuid::Uuid::new_v4().to_string(), ..from_beginning() };
    let mut stream = watch(&client, request).await;
    let mut marks = Vec::new();
    let caught_up = loop {
        match next(&mut stream).await {
            Said::Progress(position) => marks.push(position),
            Said::CaughtUp(position) => break position,
            Said::Event(event) => panic!("nothing matches, got {event:?}"),
        }
    };
    assert!(marks.len() >= 2, "progress through the filtered stretches: {marks:?}");
    assert!(marks.windows(2).all(|w| w[0] < w[1]), "{marks:?}");
    assert!(marks.iter().all(|m| *m < caught_up) && caught_up >= last.get(), "{marks:?} then {caught_up}");
    query.stop().await;
    app.stop().await;
}

/// Replays share a few database connections (`KIROKU_WATCH_REPLAY_CONNECTIONS`), and one caller's replays at most
/// a share of those: many subscribers catching up at once used to be able to take every connection of the pool,
/// so that GetUser and the rest waited. Replays are held in the middle of their reads by a lock on the data keys
/// (which every replay of sealed events reads), and the test counts how many wait.
#[tokio::test]
async fn replays_share_a_few_connections_and_one_caller_cannot_take_them_all() {
    let app = CommandApp::spawn().await;
    let (query, client) = app
        .start_query(&[("KIROKU_WATCH_REPLAY_CONNECTIONS", "3"), ("KIROKU_WATCH_REPLAY_CONNECTIONS_PER_CALLER", "2")])
        .await;
    for id in 1..=3 {
        app.github_knows(id, &format!("u{id}"), None).await;
        app.register(id, "").await.unwrap();
    }
    let mut lock = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE data_keys IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let waiting = || async {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE relation = 'data_keys'::regclass AND NOT granted")
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        count
    };
    // Whatever waits already (the feed's pump, should it have new events to open).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = waiting().await;
    let settled = |more: i64| async move {
        let expected = before + more;
        let seen =
            kiroku_testkit::eventually(Duration::from_secs(20), &format!("{expected} replays waiting"), || async {
                Ok((waiting().await == expected).then_some(()))
            })
            .await;
        assert!(seen.is_ok(), "{} wait, not {expected}", waiting().await);
        // And no more than that, a moment later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(waiting().await, expected);
    };

    let mut streams = Vec::new();
    for _ in 0..40 {
        streams.push(watch(&client, from_beginning()).await);
    }
    settled(2).await;
    let other =
        app.key.mint_caller(&app.issuer(), common::API_AUDIENCE, "other", &["kiroku:watch"], Duration::from_secs(600));
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", query.address)).unwrap();
    let other = QueryServiceClient::new(kiroku_testkit::with_caller(channel.connect().await.unwrap(), &other.unwrap()));
    let mut theirs = watch(&other, from_beginning()).await;
    settled(3).await;
    // The other queries still get connections.
    let mut asked =
        tonic::Request::new(kiroku::v1::GetUserRequest { user_id: uuid::Uuid::new_v4().to_string(), min_position: 0 });
    asked.set_timeout(Duration::from_secs(5));
    assert_eq!(client.clone().get_user(asked).await.unwrap_err().code(), Code::NotFound);

    lock.rollback().await.unwrap();
    assert_eq!(collect_events(&mut theirs, 3).await.len(), 3);
    assert_eq!(collect_events(&mut streams[39], 3).await.len(), 3, "the last replay got its turn");
    query.stop().await;
    app.stop().await;
}
