//! The relay: publishes committed events from the `events` table (the outbox) to the Redis stream
//! `{prefix}:events`, in global position order, chained by `prev_position`.
//!
//! - One leader among all command processes: a PostgreSQL session advisory lock held on a dedicated
//!   connection. A leader that loses that connection stops publishing before anyone else can take over,
//!   as far as it can tell; and should two ever publish at once, the Lua script below keeps the stream in order.
//! - The checkpoint (the highest position published) lives in PostgreSQL and is saved after Redis has the
//!   batch. Killed in between, the relay publishes the batch again on restart; the script skips what the stream
//!   already holds, and consumers deduplicate by position anyway.
//! - It wakes on `LISTEN kiroku_events` (sent at commit by a trigger), and polls as a fallback.
//! - When Redis comes back empty, the relay carries on from its checkpoint: the first new entry's
//!   `prev_position` names an entry the stream no longer has, which tells consumers to read the gap from
//!   PostgreSQL.

use std::time::Duration;

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_event_store::{EVENTS_CHANNEL, EventStore, Position, RecordedEvent};
use kiroku_platform::{Shutdown, failpoint};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};

/// The advisory lock key that elects the relay leader ("kiroku relay" in ASCII, folded into 63 bits).
const LEADER_LOCK: i64 = 0x6b69_726f_6b75_7265;

/// How many fields every stream entry has, as alternating names and values.
const ENTRY_STRINGS: usize = 16;

/// Adds entries whose position is above the stream's newest, with the position as the entry id
/// (`<position>-0`), so the stream can never hold a duplicate or an entry out of order, whoever publishes.
/// Positions are compared as decimal strings (length first): Lua's numbers are doubles.
const PUBLISH_SCRIPT: &str = r#"
local function above(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local newest = '0'
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then newest = string.match(top[1][1], '^(%d+)') end
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
return added
"#;

/// How the relay runs.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// `{prefix}:events`.
    pub stream_key: String,
    /// Approximate `MAXLEN` of the stream.
    pub max_len: u64,
    /// Events read from PostgreSQL per batch; the checkpoint is saved once per batch.
    pub batch_size: u32,
    /// Events per Redis round trip.
    pub chunk_size: usize,
    /// How often to look for events when no notification arrives.
    pub poll_interval: Duration,
    /// How long idempotency records are kept (at least 24 h); the leader prunes older ones.
    pub idempotency_retention: Duration,
}

impl RelaySettings {
    pub fn new(prefix: &str) -> Self {
        RelaySettings {
            stream_key: format!("{prefix}:events"),
            max_len: 1_000_000,
            batch_size: 500,
            chunk_size: 100,
            poll_interval: Duration::from_millis(500),
            idempotency_retention: Duration::from_secs(48 * 3600),
        }
    }

    fn checkpoint_name(&self) -> String {
        format!("relay:{}", self.stream_key)
    }
}

/// The relay of one process: a candidate for leadership that publishes while it leads.
pub struct Relay {
    store: EventStore,
    redis: Client,
    settings: RelaySettings,
}

impl Relay {
    pub fn new(store: EventStore, redis: Client, settings: RelaySettings) -> Self {
        Relay { store, redis, settings }
    }

    /// Runs until shutdown: waits to be leader, publishes while leading, and after any failure (PostgreSQL or
    /// Redis away) gives up leadership, waits a second and tries again.
    pub async fn run(self, shutdown: Shutdown) {
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
        let options = (*self.store.pool().connect_options()).clone();
        let mut lock = PgConnection::connect_with(&options).await.context("open the relay's lock connection")?;
        loop {
            let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK)
                .fetch_one(&mut lock)
                .await
                .context("try the relay leader lock")?;
            if acquired {
                break;
            }
            tokio::select! {
                () = shutdown.wait() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!(stream = %self.settings.stream_key, "relay is the leader");
        let result = self.lead(&mut lock, shutdown).await;
        // Closing the connection releases the lock even if the unlock below is never sent.
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LEADER_LOCK).execute(&mut lock).await;
        let _ = lock.close().await;
        result
    }

    async fn lead(&self, lock: &mut PgConnection, shutdown: &Shutdown) -> Result<()> {
        let mut listener = PgListener::connect_with(self.store.pool()).await.context("open the relay's listener")?;
        listener.listen(EVENTS_CHANNEL).await.context("listen for appended events")?;
        let checkpoint = self.settings.checkpoint_name();
        let mut published = self.store.load_checkpoint(&checkpoint).await.context("load the relay checkpoint")?;
        let mut next_prune = tokio::time::Instant::now();
        loop {
            // Drain everything final, batch by batch; then sleep until a commit is announced or the poll fires.
            loop {
                // Still holding the lock? If its connection died, another process may lead by now.
                sqlx::query("SELECT 1").execute(&mut *lock).await.context("check the leader lock connection")?;
                let batch = self
                    .store
                    .read_all_after(published, self.settings.batch_size)
                    .await
                    .context("read events to publish")?;
                let Some(last) = batch.last().map(|e| e.position) else { break };
                self.publish(&batch, published).await.context("publish to Redis")?;
                failpoint("relay.before_checkpoint");
                self.store.save_checkpoint(&checkpoint, last).await.context("save the relay checkpoint")?;
                published = last;
                if batch.len() < self.settings.batch_size as usize {
                    break;
                }
            }
            if tokio::time::Instant::now() >= next_prune {
                self.prune_idempotency_records().await;
                next_prune = tokio::time::Instant::now() + Duration::from_secs(60);
            }
            tokio::select! {
                () = shutdown.wait() => return Ok(()),
                notification = listener.recv() => {
                    // A lost listener connection reconnects on the next recv; the poll covers what it missed.
                    if let Err(error) = notification {
                        tracing::debug!(%error, "relay listener interrupted");
                    }
                }
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
    }

    /// Publishes a batch in chunks, chaining each entry to the position published before it.
    async fn publish(&self, batch: &[RecordedEvent], mut previous: Position) -> Result<()> {
        for chunk in batch.chunks(self.settings.chunk_size.max(1)) {
            let mut args: Vec<String> = Vec::with_capacity(1 + chunk.len() * ENTRY_STRINGS);
            args.push(self.settings.max_len.to_string());
            for event in chunk {
                append_entry(&mut args, event, previous)?;
                previous = event.position;
            }
            let _added: i64 = self
                .redis
                .eval(PUBLISH_SCRIPT, vec![self.settings.stream_key.clone()], args)
                .await
                .context("XADD entries")?;
            failpoint("relay.after_chunk");
        }
        Ok(())
    }

    async fn prune_idempotency_records(&self) {
        // Ten thousand at most per minute (600,000 an hour), so the relay never pauses long for it.
        match self.store.prune_idempotency_records(self.settings.idempotency_retention, 10).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned old idempotency records"),
            Err(error) => tracing::warn!(%error, "could not prune idempotency records"),
        }
    }
}

/// The stream entry of one event: its fields in the order of the contract, `position` first.
fn append_entry(args: &mut Vec<String>, event: &RecordedEvent, previous: Position) -> Result<()> {
    let payload = serde_json::json!({
        "data": event.data,
        "metadata": event.metadata,
        "occurred_at": event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    });
    let fields: [(&str, String); ENTRY_STRINGS / 2] = [
        ("position", event.position.to_string()),
        ("prev_position", previous.to_string()),
        ("event_id", event.event_id.to_string()),
        ("aggregate_id", event.aggregate_id.to_string()),
        ("aggregate_type", event.aggregate_type.clone()),
        ("event_type", event.event_type.clone()),
        ("version", event.version.to_string()),
        ("payload", serde_json::to_string(&payload).context("encode payload")?),
    ];
    for (name, value) in fields {
        args.push(name.to_owned());
        args.push(value);
    }
    Ok(())
}
