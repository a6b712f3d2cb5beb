//! The Redis side: a consumer group per projection on `{prefix}:events`. Entries are acknowledged only after the
//! transaction that applied them committed; entries another consumer left pending are taken over with
//! `XAUTOCLAIM`; a lost group (`NOGROUP`) is re-created at `0`. PostgreSQL is read as well — whenever Redis
//! cannot be read, and every couple of seconds of a quiet stream — so the read model keeps up while Redis is down
//! or after it came back empty; switching to it and back is logged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fred::prelude::*;
use fred::types::Value;
use kiroku_event_store::Position;
use kiroku_platform::Shutdown;
use kiroku_relay::stream::{self, Entry};
use tracing::Instrument;

use crate::dead_letters::DeadLetterStream;
use crate::projection::{PROJECTION, Projection, Source, Step, Target};

/// How often a projector with a quiet stream looks at the event store anyway.
const STORE_LOOK_EVERY: Duration = Duration::from_secs(2);

/// A stream entry as Redis returns it: its id and its fields.
type RawEntry = (String, HashMap<String, String>);

/// How the consumer runs.
#[derive(Clone, Debug)]
pub(crate) struct ConsumerSettings {
    pub stream_key: String,
    pub group: String,
    pub consumer: String,
    pub claim_idle: Duration,
}

impl ConsumerSettings {
    pub(crate) fn new(prefix: &str, consumer: String, claim_idle: Duration) -> Self {
        ConsumerSettings { stream_key: stream::events_key(prefix), group: PROJECTION.to_owned(), consumer, claim_idle }
    }
}

pub(crate) struct Consumer {
    projection: Projection,
    /// For commands that must not wait behind a blocking read.
    redis: Client,
    /// For the blocking `XREADGROUP` only.
    reader: Client,
    dead_letters: DeadLetterStream,
    settings: ConsumerSettings,
}

impl Consumer {
    pub(crate) fn new(
        projection: Projection,
        redis: Client,
        reader: Client,
        dead_letters: DeadLetterStream,
        settings: ConsumerSettings,
    ) -> Self {
        Consumer { projection, redis, reader, dead_letters, settings }
    }

    /// Runs until shutdown; a step in progress finishes first.
    pub(crate) async fn run(self, shutdown: Shutdown) {
        let mut group_ready = false;
        let mut next_claim = Instant::now() + self.settings.claim_idle;
        let mut next_tidy = Instant::now();
        let mut redis_down = false;
        let mut last_store_look = Instant::now();
        let mut source = SourceReport::default();
        while !shutdown.is_triggered() {
            if !group_ready {
                group_ready = self.ensure_group().await.is_ok();
            }
            let read = tokio::select! {
                () = shutdown.wait() => break,
                read = self.read_new() => read,
            };
            let entries = match read {
                Ok(entries) => {
                    if std::mem::replace(&mut redis_down, false) {
                        tracing::info!("the stream is readable again");
                    }
                    entries
                }
                Err(error) => {
                    if error.to_string().contains("NOGROUP") {
                        tracing::warn!("the consumer group is gone; re-creating it at 0");
                        group_ready = false;
                    } else if !std::mem::replace(&mut redis_down, true) {
                        tracing::warn!(%error, "cannot read the stream; consuming from PostgreSQL meanwhile");
                    }
                    tokio::select! {
                        () = shutdown.wait() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    Vec::new()
                }
            };
            // A quiet stream is normal: look at the store now and then (a relay that is down, entries lost), but
            // not after every empty read, which would take events the stream is about to deliver.
            let look_at_store = redis_down || last_store_look.elapsed() >= STORE_LOOK_EVERY;
            if !entries.is_empty() || look_at_store {
                if entries.is_empty() {
                    last_store_look = Instant::now();
                }
                match self.process(&entries, &mut source).await {
                    // An event that failed to apply: give the database (or the operator) a moment.
                    Ok(true) => tokio::time::sleep(Duration::from_millis(500)).await,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(error = format!("{error:#}"), "projection step failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            if Instant::now() >= next_claim {
                next_claim = Instant::now() + self.settings.claim_idle.min(Duration::from_secs(5));
                match self.claim_stale().await {
                    Ok(claimed) if !claimed.is_empty() => {
                        metrics::counter!("kiroku_projector_autoclaim_takeovers_total").increment(claimed.len() as u64);
                        tracing::info!(entries = claimed.len(), "took over entries left pending by another consumer");
                        if let Err(error) = self.process(&claimed, &mut source).await.map(drop) {
                            tracing::warn!(error = format!("{error:#}"), "projection step failed; retrying");
                        }
                    }
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "XAUTOCLAIM failed"),
                }
            }
            if Instant::now() >= next_tidy {
                next_tidy = Instant::now() + Duration::from_secs(60);
                if let Err(error) = self.forget_gone_consumers(Duration::from_secs(600)).await {
                    tracing::debug!(%error, "could not tidy the consumer group");
                }
            }
        }
        // Leaving: take our name out of the group unless entries are still pending under it. Close the reader
        // first, so that a read already sent cannot add entries to our name in between.
        let _ = self.reader.quit().await;
        if let Err(error) = self.forget_gone_consumers(Duration::ZERO).await {
            tracing::debug!(%error, "could not tidy the consumer group");
        }
    }

    /// Removes consumers with nothing pending that have been idle for `idle` (every process has a name of its
    /// own, so names of dead processes would otherwise pile up). This process removes itself only when `idle` is
    /// zero, which it passes when leaving.
    async fn forget_gone_consumers(&self, idle: Duration) -> Result<()> {
        let consumers: Vec<HashMap<String, fred::types::Value>> =
            self.redis.xinfo_consumers(&self.settings.stream_key, &self.settings.group).await?;
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        for consumer in consumers {
            let name = consumer.get("name").and_then(fred::types::Value::as_string).unwrap_or_default();
            let pending = consumer.get("pending").and_then(fred::types::Value::as_u64).unwrap_or(1);
            let idle_for = consumer.get("idle").and_then(fred::types::Value::as_u64).unwrap_or(0);
            let is_self = name == self.settings.consumer;
            if pending == 0 && (is_self == (idle_ms == 0)) && idle_for >= idle_ms && !name.is_empty() {
                let _: i64 =
                    self.redis.xgroup_delconsumer(&self.settings.stream_key, &self.settings.group, &name).await?;
            }
        }
        Ok(())
    }

    async fn ensure_group(&self) -> Result<()> {
        let created: Result<(), _> =
            self.redis.xgroup_create(&self.settings.stream_key, &self.settings.group, "0", true).await;
        match created {
            Ok(()) => Ok(()),
            Err(error) if error.to_string().contains("BUSYGROUP") => Ok(()),
            Err(error) => Err(error).context("create the consumer group"),
        }
    }

    async fn read_new(&self) -> Result<Vec<RawEntry>> {
        let reply: Value = self
            .reader
            .xreadgroup(
                &self.settings.group,
                &self.settings.consumer,
                Some(500),
                Some(1000),
                false,
                &self.settings.stream_key,
                ">",
            )
            .await?;
        Ok(read_reply_entries(reply))
    }

    async fn claim_stale(&self) -> Result<Vec<RawEntry>> {
        let idle = u64::try_from(self.settings.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply: Value = self
            .redis
            .xautoclaim(
                &self.settings.stream_key,
                &self.settings.group,
                &self.settings.consumer,
                idle,
                "0-0",
                Some(500),
                false,
            )
            .await?;
        // [next start id, [entries…], [ids deleted from the stream (Redis 7)]].
        Ok(match reply {
            Value::Array(mut parts) if parts.len() >= 2 => entries_of(parts.swap_remove(1)),
            _ => Vec::new(),
        })
    }

    /// Applies what `entries` announce (or, with none, whatever the store has), then acknowledges them. True when
    /// an event failed to apply and held the projection back.
    async fn process(&self, entries: &[RawEntry], source: &mut SourceReport) -> Result<bool> {
        // A malformed or trimmed entry is skipped here: the chain then breaks, and the store fills in.
        let delivered: Vec<Entry> = entries.iter().filter_map(|(_, fields)| Entry::decode(fields).ok()).collect();
        let wanted = delivered.iter().map(|d| d.event.position).max().unwrap_or(Position::ZERO);
        // A span per step that applies delivered entries, linked to the trace of each call that wrote them.
        let span = if delivered.is_empty() {
            tracing::Span::none()
        } else {
            tracing::info_span!("projector.apply", events = delivered.len(), otel.kind = "consumer")
        };
        kiroku_platform::trace::link_to_events(&span, delivered.iter().map(|d| &d.event.metadata));
        let mut step = self.projection.step(Target::Active, &delivered).instrument(span).await?;
        source.note(&step, !entries.is_empty());
        self.dead_letters.publish(&step.dead_lettered).await;
        // A broken chain was read from the store in batches: go on until the delivered entries are covered.
        while !step.blocked && (step.more || (step.checkpoint < wanted && step.applied + step.parked > 0)) {
            step = self.projection.step(Target::Active, &[]).await?;
            source.note(&step, !entries.is_empty());
            self.dead_letters.publish(&step.dead_lettered).await;
        }
        let done: Vec<&str> = entries
            .iter()
            .filter(|(_, fields)| stream::entry_position(fields).is_none_or(|p| p <= step.checkpoint))
            .map(|(id, _)| id.as_str())
            .collect();
        if !done.is_empty() {
            let _: i64 =
                self.redis.xack(&self.settings.stream_key, &self.settings.group, done).await.context("XACK")?;
        }
        Ok(step.blocked)
    }
}

/// Says when the projection starts taking its events from the event store instead of the stream, and when it
/// is back (the counts are in `projection_checkpoints`, shown by `kiroku projector status`).
#[derive(Default)]
struct SourceReport {
    from_store: bool,
}

impl SourceReport {
    fn note(&mut self, step: &Step, delivered: bool) {
        crate::metrics::record_step(step);
        match step.source {
            Source::Store if !self.from_store => {
                self.from_store = true;
                let why = if delivered {
                    "the stream's chain is broken (Redis restarted or trimmed, or entries held by another consumer)"
                } else {
                    "the stream did not deliver them (Redis away, or the relay behind)"
                };
                tracing::warn!(events = step.applied + step.parked, why, "consuming from PostgreSQL instead of Redis");
            }
            Source::Stream if self.from_store => {
                self.from_store = false;
                tracing::info!("consuming from Redis again");
            }
            _ => {}
        }
    }
}

/// The entries of an XREADGROUP reply, whatever its shape: none (a read that timed out answers nil), RESP2
/// (`[[stream, entries]]`) or RESP3 (`{stream: entries}`).
fn read_reply_entries(reply: Value) -> Vec<RawEntry> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => entries_of(pair.swap_remove(1)),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.inner().into_values().flat_map(entries_of).collect(),
        _ => Vec::new(),
    }
}

/// Stream entries (`[[id, fields]…]`). An entry whose data was trimmed away after it was delivered comes back
/// with nil fields: it is kept with no fields, so that it is acknowledged (its position is read from the store).
fn entries_of(value: Value) -> Vec<RawEntry> {
    let Value::Array(entries) = value else { return Vec::new() };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut parts) = entry else { return None };
            if parts.is_empty() {
                return None;
            }
            let fields = if parts.len() > 1 { parts.swap_remove(1) } else { Value::Null };
            let id = parts.swap_remove(0).into_string()?;
            let fields = match fields {
                Value::Array(flat) => {
                    flat.chunks_exact(2).filter_map(|pair| Some((pair[0].as_string()?, pair[1].as_string()?))).collect()
                }
                Value::Map(map) => map
                    .inner()
                    .into_iter()
                    .filter_map(|(key, value)| Some((key.as_str()?.to_owned(), value.as_string()?)))
                    .collect(),
                _ => HashMap::new(),
            };
            Some((id, fields))
        })
        .collect()
}
