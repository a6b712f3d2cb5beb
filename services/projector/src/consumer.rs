//! The Redis side: a consumer group per projection on `{prefix}:events`. Entries are acknowledged only after the
//! transaction that applied them committed; entries another consumer left pending are taken over with
//! `XAUTOCLAIM`; a lost group (`NOGROUP`) is re-created at `0`. PostgreSQL is polled as well, so the read model
//! keeps up while Redis is down or after it came back empty.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fred::prelude::*;
use kiroku_event_store::Position;
use kiroku_platform::Shutdown;
use kiroku_relay::stream::{self, DeadLetterEntry, Entry};

use crate::projection::{DeadLetter, PROJECTION, Projection, Target};

/// A stream entry as Redis returns it: its id and its fields.
type RawEntry = (String, HashMap<String, String>);

/// How the consumer runs.
#[derive(Clone, Debug)]
pub(crate) struct ConsumerSettings {
    pub stream_key: String,
    pub dead_letter_key: String,
    pub group: String,
    pub consumer: String,
    pub claim_idle: Duration,
}

impl ConsumerSettings {
    pub(crate) fn new(prefix: &str, consumer: String, claim_idle: Duration) -> Self {
        ConsumerSettings {
            stream_key: stream::events_key(prefix),
            dead_letter_key: stream::dead_letters_key(prefix),
            group: PROJECTION.to_owned(),
            consumer,
            claim_idle,
        }
    }
}

pub(crate) struct Consumer {
    projection: Projection,
    /// For commands that must not wait behind a blocking read.
    redis: Client,
    /// For the blocking `XREADGROUP` only.
    reader: Client,
    settings: ConsumerSettings,
}

impl Consumer {
    pub(crate) fn new(projection: Projection, redis: Client, reader: Client, settings: ConsumerSettings) -> Self {
        Consumer { projection, redis, reader, settings }
    }

    /// Runs until shutdown; a step in progress finishes first.
    pub(crate) async fn run(self, shutdown: Shutdown) {
        let mut group_ready = false;
        let mut next_claim = Instant::now() + self.settings.claim_idle;
        let mut next_tidy = Instant::now();
        let mut quiet_until = Instant::now();
        while !shutdown.is_triggered() {
            if !group_ready {
                group_ready = self.ensure_group().await.is_ok();
            }
            let read = tokio::select! {
                () = shutdown.wait() => break,
                read = self.read_new() => read,
            };
            let entries = match read {
                Ok(entries) => entries,
                Err(error) => {
                    if error.to_string().contains("NOGROUP") {
                        tracing::warn!("the consumer group is gone; re-creating it at 0");
                        group_ready = false;
                    } else if Instant::now() >= quiet_until {
                        tracing::warn!(%error, "cannot read the stream; following PostgreSQL meanwhile");
                        quiet_until = Instant::now() + Duration::from_secs(30);
                    }
                    tokio::select! {
                        () = shutdown.wait() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    Vec::new()
                }
            };
            match self.process(&entries).await {
                // An event that failed to apply: give the database (or the operator) a moment.
                Ok(true) => tokio::time::sleep(Duration::from_millis(500)).await,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "projection step failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            if Instant::now() >= next_claim {
                next_claim = Instant::now() + self.settings.claim_idle.min(Duration::from_secs(5));
                match self.claim_stale().await {
                    Ok(claimed) if !claimed.is_empty() => {
                        tracing::info!(entries = claimed.len(), "took over entries left pending by another consumer");
                        if let Err(error) = self.process(&claimed).await.map(drop) {
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
        let response: HashMap<String, Vec<RawEntry>> = self
            .reader
            .xreadgroup_map(
                &self.settings.group,
                &self.settings.consumer,
                Some(500),
                Some(1000),
                false,
                &self.settings.stream_key,
                ">",
            )
            .await?;
        Ok(response.into_values().flatten().collect())
    }

    async fn claim_stale(&self) -> Result<Vec<RawEntry>> {
        let idle = u64::try_from(self.settings.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let (_, entries, _): (String, Vec<RawEntry>, Vec<String>) = self
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
        Ok(entries)
    }

    /// Applies what `entries` announce (or, with none, whatever the store has), then acknowledges them. True when
    /// an event failed to apply and held the projection back.
    async fn process(&self, entries: &[RawEntry]) -> Result<bool> {
        // A malformed entry is skipped here: the chain then breaks, and the store fills in.
        let delivered: Vec<Entry> = entries.iter().filter_map(|(_, fields)| Entry::decode(fields).ok()).collect();
        let wanted = delivered.iter().map(|d| d.event.position).max().unwrap_or(Position::ZERO);
        let mut step = self.projection.step(Target::Active, &delivered).await?;
        self.publish_dead_letters(&step.dead_lettered).await;
        // A broken chain was read from the store in batches: go on until the delivered entries are covered.
        while !step.blocked && (step.more || (step.checkpoint < wanted && step.applied > 0)) {
            step = self.projection.step(Target::Active, &[]).await?;
            self.publish_dead_letters(&step.dead_lettered).await;
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

    async fn publish_dead_letters(&self, dead: &[DeadLetter]) {
        for letter in dead {
            if let Err(error) = publish_dead_letter(&self.redis, &self.settings.dead_letter_key, letter).await {
                // The failure row in PostgreSQL stays the record; `kiroku projector dead-letters` lists it.
                tracing::warn!(%error, position = %letter.event.position, "could not publish a dead letter");
            }
        }
    }
}

/// Adds a dead letter to `{prefix}:events:dead`.
async fn publish_dead_letter(redis: &Client, key: &str, letter: &DeadLetter) -> Result<()> {
    let entry = DeadLetterEntry {
        projection: PROJECTION.to_owned(),
        event: letter.event.clone(),
        attempts: letter.attempts,
        error: letter.error.clone(),
    };
    let _: String = redis.xadd(key, false, None, "*", entry.encode()).await?;
    Ok(())
}
