//! The relay: publishes committed events from the `events` table (the outbox) to the Redis stream
//! `{prefix}:events`, in global position order, chained by `prev_position`. `kiroku-command` always runs one.
//!
//! - One leader per stream among all command processes: the event store's leader lock, named after the stream.
//!   A leader checks its lock's connection before each batch and stops when it is gone; should two ever publish
//!   at once, the Lua script below keeps the stream in order.
//! - It follows the log with the event store's [`Follower`] (woken by the commit announcement sent after commit,
//!   polling as a fallback). The checkpoint (the highest position published) lives in PostgreSQL and is saved
//!   after Redis has the batch. Killed in between, the relay publishes the batch again on restart; the script
//!   skips what the stream already holds, and consumers deduplicate by position anyway.
//! - When Redis comes back empty, the relay carries on from its checkpoint: the first new entry's
//!   `prev_position` names an entry the stream no longer has, which tells consumers to read the gap from
//!   PostgreSQL.
//!
//! - Metrics: `kiroku_relay_leader` (0/1), `kiroku_relay_published_position`, `kiroku_relay_lag_events` and
//!   `kiroku_relay_lag_seconds` (final events not yet published, and the age of the oldest; the leader samples
//!   them once a second), `kiroku_relay_events_published_total`, `kiroku_relay_entries_skipped_total`,
//!   `kiroku_relay_redis_errors_total`.
//!
//! [`stream`] is the stream's format, shared with every reader of the stream.

pub mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_event_store::{EventStore, Follower, Position, RecordedEvent};
use kiroku_platform::{Shutdown, failpoint};
use tracing::Instrument;

use crate::stream::{ENTRY_FIELDS, encode_fields};

/// Adds entries whose position is above the stream's last generated id, with the position as the entry id
/// (`<position>-0`), so the stream can never hold a duplicate or an entry out of order, whoever publishes; returns
/// how many it added, and the position of the stream's last id before it added any. The last generated id survives trimming and deletion (`XTRIM MAXLEN 0`, `XDEL` of the
/// newest entries), which the newest entry does not: XADD refuses ids at or below it, and a relay that took its
/// bound from the newest entry would fail on them for ever. Positions are compared as decimal strings (length
/// first): Lua's numbers are doubles. ARGV is the MAXLEN, then 16 strings per entry (its `ENTRY_FIELDS` names
/// and values).
const PUBLISH_SCRIPT: &str = r#"
local function above(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local newest = '0'
local before = '0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then newest = string.match(info[i + 1], '^(%d+)') end
  end
  before = newest
end
local added = 0
local i = 2
while i <= #ARGV do
  local position = ARGV[i + 1]
  if above(position, newest) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], position .. '-0', unpack(ARGV, i, i + 15))
    newest = position
    added = added + 1
  end
  i = i + 16
end
return {added, before}
"#;

/// How the relay runs.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// `{prefix}:events`.
    pub stream_key: String,
    /// `{prefix}:events:dead`: scrubbed, like the stream, of what an erasure redacted.
    pub dead_letters_key: String,
    /// Approximate `MAXLEN` of the stream.
    pub max_len: u64,
    /// Events read from PostgreSQL per batch; the checkpoint is saved once per batch.
    pub batch_size: u32,
    /// Events per Redis round trip.
    pub chunk_size: usize,
    /// How often to look for events when no commit is announced.
    pub poll_interval: Duration,
}

impl RelaySettings {
    pub fn new(prefix: &str) -> Self {
        RelaySettings {
            stream_key: stream::events_key(prefix),
            dead_letters_key: stream::dead_letters_key(prefix),
            max_len: 1_000_000,
            batch_size: 500,
            chunk_size: 100,
            poll_interval: Duration::from_millis(500),
        }
    }

    /// The name of the relay's checkpoint and of its leader lock: one of each per stream.
    pub fn checkpoint_name(&self) -> String {
        format!("relay:{}", self.stream_key)
    }
}

/// The relay of one process: a candidate for leadership that publishes while it leads.
pub struct Relay {
    store: EventStore,
    redis: Client,
    settings: RelaySettings,
    /// Entries the publish script skipped since this process started (see [`Relay::publish`]).
    skipped: AtomicU64,
}

impl Relay {
    pub fn new(store: EventStore, redis: Client, settings: RelaySettings) -> Self {
        Relay { store, redis, settings, skipped: AtomicU64::new(0) }
    }

    /// Runs until shutdown: waits to be leader, publishes while leading, and after any failure (PostgreSQL or
    /// Redis away) gives up leadership, waits a second and tries again.
    pub async fn run(self, shutdown: Shutdown) {
        metrics::gauge!("kiroku_relay_leader").set(0.0);
        while !shutdown.is_triggered() {
            let outcome = tokio::select! {
                () = shutdown.wait() => return,
                outcome = self.elect_and_lead(&shutdown) => outcome,
            };
            if let Err(error) = outcome {
                tracing::warn!(error = format!("{error:#}"), "relay stopped leading; retrying in 1 s");
            }
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn elect_and_lead(&self, shutdown: &Shutdown) -> Result<()> {
        let name = self.settings.checkpoint_name();
        let mut lock = self.store.leader_lock(&name).await.context("open the relay's lock connection")?;
        loop {
            if lock.try_acquire().await.context("try the relay leader lock")? {
                break;
            }
            tokio::select! {
                () = shutdown.wait() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!(stream = %self.settings.stream_key, "relay is the leader");
        metrics::gauge!("kiroku_relay_leader").set(1.0);
        let result = self.lead(&mut lock, shutdown).await;
        // A process that no longer leads has nothing to report: its last figures would only mislead `max()`.
        metrics::gauge!("kiroku_relay_leader").set(0.0);
        metrics::gauge!("kiroku_relay_lag_events").set(0.0);
        metrics::gauge!("kiroku_relay_lag_seconds").set(0.0);
        lock.release().await;
        result
    }

    async fn lead(&self, lock: &mut kiroku_event_store::LeaderLock, shutdown: &Shutdown) -> Result<()> {
        let checkpoint = self.settings.checkpoint_name();
        let mut published = self.store.load_checkpoint(&checkpoint).await.context("load the relay checkpoint")?;
        let mut follower: Follower =
            self.store.follow(published, self.settings.batch_size, self.settings.poll_interval).await;
        let mut next_sample = tokio::time::Instant::now();
        metrics::gauge!("kiroku_relay_published_position").set(published.get() as f64);
        loop {
            // Still holding the lock? If its connection died, another process may lead by now.
            lock.check().await.context("check the leader lock connection")?;
            let batch = tokio::select! {
                () = shutdown.wait() => return Ok(()),
                batch = follower.next() => batch.context("read events to publish")?,
            };
            if let Some(last) = batch.events.last().map(|e| e.position) {
                // One span per batch, linked to the trace of each call that wrote its events.
                let span = tracing::info_span!(
                    "relay.publish",
                    events = batch.events.len(),
                    last = %last,
                    otel.kind = "producer",
                );
                kiroku_platform::trace::link_to_events(&span, batch.events.iter().map(|e| &e.metadata));
                if let Err(error) = self.publish(&batch.events, published).instrument(span).await {
                    metrics::counter!("kiroku_relay_redis_errors_total").increment(1);
                    metrics::gauge!("kiroku_redis_up").set(0.0);
                    return Err(error.context("publish to Redis"));
                }
                self.scrub(&batch.events).await.context("delete redacted entries from Redis")?;
                metrics::gauge!("kiroku_redis_up").set(1.0);
                failpoint("relay.before_checkpoint");
                self.store.save_checkpoint(&checkpoint, last).await.context("save the relay checkpoint")?;
                published = last;
                metrics::counter!("kiroku_relay_events_published_total").increment(batch.events.len() as u64);
                metrics::gauge!("kiroku_relay_published_position").set(last.get() as f64);
            }
            if tokio::time::Instant::now() >= next_sample {
                self.sample_lag(published).await;
                // Catching up (full batches), the figures change slowly and the reads matter more.
                next_sample = tokio::time::Instant::now() + Duration::from_secs(if batch.full { 5 } else { 1 });
            }
        }
    }

    /// Publishes a batch in chunks, chaining each entry to the position published before it.
    async fn publish(&self, batch: &[RecordedEvent], mut previous: Position) -> Result<()> {
        for chunk in batch.chunks(self.settings.chunk_size.max(1)) {
            let mut args: Vec<String> = Vec::with_capacity(1 + chunk.len() * ENTRY_FIELDS * 2);
            args.push(self.settings.max_len.to_string());
            for event in chunk {
                for (name, value) in encode_fields(previous, event).context("encode a stream entry")? {
                    args.push(name.to_owned());
                    args.push(value);
                }
                previous = event.position;
            }
            let (added, stream_last): (i64, String) = self
                .redis
                .eval(PUBLISH_SCRIPT, vec![self.settings.stream_key.clone()], args)
                .await
                .context("XADD entries")?;
            let skipped = chunk.len() as u64 - u64::try_from(added).unwrap_or(0).min(chunk.len() as u64);
            if skipped > 0 {
                self.report_skipped(skipped, chunk[0].position, previous, &stream_last).await;
            }
            failpoint("relay.after_chunk");
        }
        Ok(())
    }

    /// The entries of events whose personal fields an erasure redacted in the log (they predate encryption, so
    /// they were published in clear): deleted from the stream and the dead letters when the relay publishes the
    /// `UserErased` that lists them, before its checkpoint moves past it, so Redis keeps no copy (a crash repeats
    /// it; deleting twice is harmless). A consumer that had not read them yet finds a broken chain and reads the
    /// redacted events from the log.
    async fn scrub(&self, batch: &[RecordedEvent]) -> Result<()> {
        let redacted: std::collections::HashSet<u64> = batch
            .iter()
            .filter(|e| e.event_type == kiroku_domain::UserErased::EVENT_TYPE)
            .filter_map(|e| match kiroku_domain::UserEvent::decode(&e.event_type, &e.data) {
                Some(Ok(kiroku_domain::UserEvent::UserErased(erased))) => Some(erased.redacted_positions),
                _ => None,
            })
            .flatten()
            .collect();
        if redacted.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = redacted.iter().map(|p| format!("{p}-0")).collect();
        let _: i64 = self.redis.xdel(&self.settings.stream_key, ids).await?;
        let letters: Vec<(String, std::collections::HashMap<String, String>)> =
            self.redis.xrange(&self.settings.dead_letters_key, "-", "+", None).await?;
        let doomed: Vec<String> = letters
            .into_iter()
            .filter(|(_, fields)| stream::entry_position(fields).is_some_and(|p| redacted.contains(&p.get())))
            .map(|(id, _)| id)
            .collect();
        if !doomed.is_empty() {
            let _: i64 = self.redis.xdel(&self.settings.dead_letters_key, doomed).await?;
        }
        tracing::info!(entries = redacted.len(), "redacted entries deleted from Redis");
        Ok(())
    }

    /// Entries the script skipped because the stream already had ids at or above them. Expected after a crash
    /// between publishing and the checkpoint (the batch is published again); but a stream whose last id is above
    /// the head of the log means the log's positions went backwards (an asynchronous replica promoted, a crash
    /// with `synchronous_commit = off`): the new events reuse positions the stream, and its readers, have passed.
    async fn report_skipped(&self, skipped: u64, first: Position, last: Position, stream_last: &str) {
        let total = self.skipped.fetch_add(skipped, Ordering::Relaxed) + skipped;
        metrics::counter!("kiroku_relay_entries_skipped_total").increment(skipped);
        let stream_last = Position::new(stream_last.parse().unwrap_or(0));
        match self.store.head().await {
            Ok(head) if stream_last > head => tracing::error!(
                skipped,
                total,
                %stream_last,
                %head,
                "the stream is ahead of the log: positions went backwards (a failover lost committed events?); \
                 new events at these positions are not published and readers that passed them will not see them"
            ),
            _ => tracing::warn!(
                skipped,
                total,
                %first,
                %last,
                "the stream already had entries at or above these positions (a batch published again); skipped them"
            ),
        }
    }

    /// Sets the lag gauges: final events after `published`, and how long the oldest of them has been committed.
    async fn sample_lag(&self, published: Position) {
        match self.store.lag(published).await {
            Ok(lag) => {
                let seconds = lag
                    .oldest_committed_at
                    .map_or(0.0, |at| (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0);
                metrics::gauge!("kiroku_relay_lag_events").set(lag.events as f64);
                metrics::gauge!("kiroku_relay_lag_seconds").set(seconds);
            }
            Err(error) => tracing::debug!(%error, "could not sample the relay's lag"),
        }
    }
}

/// The help text of the relay's metrics.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("kiroku_relay_leader", "1 while this process's relay leads (publishes), else 0");
    describe_gauge!("kiroku_relay_published_position", "the highest position the leader has published");
    describe_gauge!("kiroku_relay_lag_events", "final events in the log not yet published (sampled by the leader)");
    describe_gauge!("kiroku_relay_lag_seconds", "how long the oldest unpublished final event has been committed");
    describe_counter!("kiroku_relay_events_published_total", "events published to the Redis stream");
    describe_counter!(
        "kiroku_relay_entries_skipped_total",
        "entries the stream already held (a batch published again)"
    );
    describe_counter!("kiroku_relay_redis_errors_total", "batches that Redis failed to take (the relay retries)");
    // Present from the start (at zero), so that rates and alerts work before the first occurrence.
    for counter in
        ["kiroku_relay_events_published_total", "kiroku_relay_entries_skipped_total", "kiroku_relay_redis_errors_total"]
    {
        metrics::counter!(counter).increment(0);
    }
    for gauge in ["kiroku_relay_published_position", "kiroku_relay_lag_events", "kiroku_relay_lag_seconds"] {
        metrics::gauge!(gauge).increment(0.0);
    }
}
