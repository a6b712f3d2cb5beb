//! Reading: one aggregate in version order, or the whole log by global position below the horizon.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::EventStore;
use crate::error::StoreError;
use crate::types::{Position, RecordedEvent, Version};

/// The aggregate type of refused registrations, as a literal: the partial index that finds the refusals naming a
/// user (migration 05) has it in its predicate, and the planner uses that index only for a query that names the
/// same literal, never a parameter. The store knows no domain, so the domain's `AuditEvent::AGGREGATE_TYPE` is
/// checked against [`AUDIT_AGGREGATE_TYPE`] by a test of EraseUser, which reads them and knows both.
macro_rules! audit_aggregate_type {
    () => {
        "UserRegistrationAudit"
    };
}

/// The aggregate type that [`EventStore::refusals_naming`] reads.
pub const AUDIT_AGGREGATE_TYPE: &str = audit_aggregate_type!();

/// The audit events whose payload names a user as the holder of the identity (by the partial expression index).
pub(crate) const READ_REFUSALS_NAMING: &str = concat!(
    "SELECT position, id, aggregate_id, aggregate_type, event_type, event_version, event_data, metadata, \
     occurred_at, created_at FROM events WHERE aggregate_type = '",
    audit_aggregate_type!(),
    "' AND event_data ->> 'duplicate_user_id' = $1 ORDER BY position"
);

/// One aggregate's events after a version, in version order.
const READ_STREAM: &str = "SELECT position, id, aggregate_id, aggregate_type, event_type, event_version, \
    event_data, metadata, occurred_at, created_at FROM events WHERE aggregate_id = $1 AND event_version > $2 \
    ORDER BY event_version LIMIT $3";

/// `durable!()`: whether a horizon may be passed (see `Batch::through`): PostgreSQL does not log the assignment of a
/// transaction id, only what the transaction writes (its rows, its commit or abort record). A transaction that
/// ended by rolling back, moments before a crash, may have left nothing on disk: recovery then hands its id out
/// again, and the positions of new events land below a horizon that readers had already passed, and are never
/// delivered (the fault suite found this). Once the WAL written before the horizon was read is flushed, every
/// finished transaction below it is on disk and recovery starts above it. So a horizon is passed only when the
/// flush has caught up with the insert position; otherwise a reader goes no further than the last committed
/// event it saw (committed means flushed: recovery starts above it too).
macro_rules! durable {
    () => {
        "pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()"
    };
}

/// The horizon, and every event after a position below it, in position order — in one statement, hence one
/// snapshot. `pg_current_snapshot()` is this statement's snapshot: every transaction with an xid below its xmin
/// has finished, and its events are visible now or never will be; every transaction that can still commit has
/// an xid (hence positions, `xid · 2^16 + index`) at or above it. Nothing can later commit below what we return,
/// nor at or below the horizon — with one exception, see `durable!`. The horizon row comes back even when no
/// event does (the LEFT JOIN).
const READ_BATCH: &str = concat!(
    "SELECT h.horizon, h.durable, e.position, e.id, e.aggregate_id, e.aggregate_type, \
     e.event_type, e.event_version, e.event_data, e.metadata, e.occurred_at, e.created_at \
     FROM (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) - 1 AS horizon, ",
    durable!(),
    " AS durable) h \
     LEFT JOIN LATERAL (SELECT * FROM events WHERE position > $1 AND position <= h.horizon \
                        ORDER BY position LIMIT $2) e ON true \
     ORDER BY e.position"
);

/// Like [`READ_BATCH`], for the events that match a filter ($4 event types, $5 aggregate types, $6 aggregate id;
/// NULL matches all), scanning at most $3 events of the log: the scan ends at the position of the $3-th event
/// after $1 (or at the horizon, if that comes first), so a filter that matches little never reads the whole log
/// in one statement. `upper` is where the scan ended; `last_seen` the last event position of the scan.
const READ_FILTERED: &str = concat!(
    "WITH h AS (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) - 1 AS horizon, ",
    durable!(),
    " AS durable), \
    b AS (SELECT h.horizon, h.durable, \
          (SELECT position FROM events WHERE position > $1 AND position <= h.horizon \
           ORDER BY position OFFSET $3 - 1 LIMIT 1) AS nth, \
          (SELECT max(position) FROM events WHERE position > $1 AND position <= h.horizon) AS last_seen FROM h) \
    SELECT b.horizon, b.durable, b.nth, b.last_seen, e.position, e.id, e.aggregate_id, e.aggregate_type, \
           e.event_type, e.event_version, e.event_data, e.metadata, e.occurred_at, e.created_at \
    FROM b LEFT JOIN LATERAL (SELECT * FROM events WHERE position > $1 AND position <= coalesce(b.nth, b.horizon) \
        AND ($4::text[] IS NULL OR event_type = ANY($4)) AND ($5::text[] IS NULL OR aggregate_type = ANY($5)) \
        AND ($6::uuid IS NULL OR aggregate_id = $6) ORDER BY position LIMIT $2) e ON true \
    ORDER BY e.position"
);

/// The highest position that is final, and that a reader may pass (see `durable!`).
const SAFE_HORIZON: &str = concat!(
    "WITH h AS (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) - 1 AS horizon, ",
    durable!(),
    " AS durable) \
     SELECT CASE WHEN h.durable THEN h.horizon \
            ELSE coalesce((SELECT max(position) FROM events WHERE position <= h.horizon), 0) END FROM h"
);

/// What one read of the log after a position found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// Final events after the position read from, in position order.
    pub events: Vec<RecordedEvent>,
    /// Everything at or below it has been read: nothing unread can ever commit there. The last event's position
    /// when the batch is full; otherwise the horizon at the time of the read when it may be passed, or else the
    /// last event read (see `durable!`), and never below the position read from.
    pub through: Position,
    /// True when the read stopped at its limit: more is there right away.
    pub full: bool,
}

/// Which events a filtered read returns; empty lists and `None` match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub event_types: Vec<String>,
    pub aggregate_types: Vec<String>,
    pub aggregate_id: Option<Uuid>,
}

impl LogFilter {
    pub fn is_empty(&self) -> bool {
        self.event_types.is_empty() && self.aggregate_types.is_empty() && self.aggregate_id.is_none()
    }

    /// The same test the filtered read makes in SQL, for events already in hand (a live feed).
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
            && (self.aggregate_types.is_empty() || self.aggregate_types.contains(&event.aggregate_type))
            && self.aggregate_id.is_none_or(|id| id == event.aggregate_id)
    }
}

/// Where [`EventStore::lag`] stops counting.
pub const LAG_COUNT_LIMIT: i64 = 100_000;

/// How far a follower at some position is behind the log, and what holds the log back from every reader.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    /// The horizon the figures were taken at: the last position no open transaction can still commit below.
    pub horizon: Position,
    /// Final events after the follower's position (at most [`LAG_COUNT_LIMIT`]).
    pub events: u64,
    /// When the first of them was committed; `None` when there is none.
    pub oldest_committed_at: Option<DateTime<Utc>>,
    /// Events committed above the horizon (at most [`LAG_COUNT_LIMIT`]): no reader can deliver them until an older
    /// transaction ends. A follower that is "caught up" while this grows is stalled by the horizon, not by itself.
    pub undeliverable_events: u64,
    /// How long the oldest transaction with an id (in any database of the cluster) has been open: the one that
    /// holds the horizon back. Near zero on a healthy cluster.
    pub oldest_transaction_seconds: Option<f64>,
}

impl EventStore {
    /// One aggregate's events with a version above `after_version`, in version order, at most `limit`.
    pub async fn read_stream(
        &self,
        aggregate_id: Uuid,
        after_version: Version,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(READ_STREAM)
            .bind(aggregate_id)
            .bind(after_version)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Up to `limit` final events after `after`, in position order, never skipping one that commits later, and
    /// how far that read covers the log (see [`Batch::through`]).
    pub async fn read_batch(&self, after: Position, limit: u32) -> Result<Batch, StoreError> {
        let rows = sqlx::query(READ_BATCH).bind(after).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        let (horizon, durable): (Position, bool) = match rows.first() {
            Some(row) => (row.try_get("horizon")?, row.try_get("durable")?),
            None => (Position::ZERO, false),
        };
        let events = rows
            .iter()
            .filter(|row| row.try_get::<Option<Position>, _>("position").ok().flatten().is_some())
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        let full = events.len() >= limit as usize && limit > 0;
        let last = events.last().map_or(after, |e| e.position).max(after);
        let through = if !full && durable { horizon.max(last) } else { last };
        Ok(Batch { events, through, full })
    }

    /// The final events after `after` up to `through` (at most `limit`), in position order: what a follower that
    /// was told of events up to `through` (by the Redis stream, say) checks them against. Never past the horizon.
    pub async fn read_range(
        &self,
        after: Position,
        through: Position,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT position, id, aggregate_id, aggregate_type, event_type, event_version, event_data, metadata, \
             occurred_at, created_at FROM events WHERE position > $1 AND position <= $2 \
             AND position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) ORDER BY position LIMIT $3",
        )
        .bind(after)
        .bind(through)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Up to `limit` final events after `after` that match `filter`, scanning at most `scan` events of the log in
    /// one statement (the filter runs in PostgreSQL). `through` is where the scan ended; `full` says more of the
    /// log is there right away (the limit was reached, or the scan stopped before the horizon).
    pub async fn read_filtered(
        &self,
        after: Position,
        limit: u32,
        scan: u32,
        filter: &LogFilter,
    ) -> Result<Batch, StoreError> {
        let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        let rows = sqlx::query(READ_FILTERED)
            .bind(after)
            .bind(i64::from(limit))
            .bind(i64::from(scan.max(1)))
            .bind(non_empty(&filter.event_types))
            .bind(non_empty(&filter.aggregate_types))
            .bind(filter.aggregate_id)
            .fetch_all(&self.pool)
            .await?;
        let (horizon, durable, nth, last_seen): (Position, bool, Option<Position>, Option<Position>) =
            match rows.first() {
                Some(row) => {
                    (row.try_get("horizon")?, row.try_get("durable")?, row.try_get("nth")?, row.try_get("last_seen")?)
                }
                None => (Position::ZERO, false, None, None),
            };
        let events = rows
            .iter()
            .filter(|row| row.try_get::<Option<Position>, _>("position").ok().flatten().is_some())
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        let limited = events.len() >= limit as usize && limit > 0;
        let (through, full) = match (events.last(), nth) {
            (Some(last), _) if limited => (last.position, true),
            // The scan stopped at its n-th event, before the horizon: more right away.
            (_, Some(nth)) => (nth.max(after), nth < horizon),
            // The scan reached the horizon: past it if it may be passed, else to the last event it saw.
            (_, None) if durable => (horizon.max(after), false),
            (_, None) => (last_seen.unwrap_or(after).max(after), false),
        };
        Ok(Batch { events, through, full })
    }

    /// Up to `limit` final events after `after`, in position order (the events of [`EventStore::read_batch`]).
    /// An empty answer means "nothing more is final yet", not "the end".
    pub async fn read_all_after(&self, after: Position, limit: u32) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self.read_batch(after, limit).await?.events)
    }

    /// The event at `position`, if one committed there.
    pub async fn read_event(&self, position: Position) -> Result<Option<RecordedEvent>, StoreError> {
        let row = sqlx::query(
            "SELECT position, id, aggregate_id, aggregate_type, event_type, event_version, event_data, metadata, \
             occurred_at, created_at FROM events WHERE position = $1",
        )
        .bind(position)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// The highest position that is final now: no event at or below it can still commit, even after a crash
    /// (the horizon when it may be passed, else the last committed event below it; see `durable!`).
    pub async fn safe_horizon(&self) -> Result<Position, StoreError> {
        Ok(sqlx::query_scalar(SAFE_HORIZON).fetch_one(&self.pool).await?)
    }

    /// The highest position committed so far ([`Position::ZERO`] for an empty log). It may be above the
    /// horizon while an older transaction is still open.
    pub async fn head(&self) -> Result<Position, StoreError> {
        let head: Option<Position> =
            sqlx::query_scalar("SELECT max(position) FROM events").fetch_one(&self.pool).await?;
        Ok(head.unwrap_or(Position::ZERO))
    }

    /// How far a follower whose checkpoint is `after` is behind the final part of the log, and how much of the log
    /// the horizon holds back.
    ///
    /// Counts stop at [`LAG_COUNT_LIMIT`], so that sampling a large backlog (a relay catching up after an outage)
    /// costs a bounded index scan, not one over the whole backlog.
    pub async fn lag(&self, after: Position) -> Result<Lag, StoreError> {
        type Row = (Position, i64, Option<DateTime<Utc>>, i64, Option<f64>);
        let (horizon, events, oldest, undeliverable, transaction_seconds): Row = sqlx::query_as(
            "WITH h AS (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) - 1 AS horizon) \
             SELECT h.horizon, \
                    (SELECT count(*) FROM (SELECT 1 FROM events \
                     WHERE position > $1 AND position <= h.horizon LIMIT $2) c), \
                    (SELECT created_at FROM events WHERE position > $1 AND position <= h.horizon \
                     ORDER BY position LIMIT 1), \
                    (SELECT count(*) FROM (SELECT 1 FROM events WHERE position > h.horizon LIMIT $2) u), \
                    (SELECT extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity \
                     WHERE backend_xid IS NOT NULL ORDER BY age(backend_xid) DESC LIMIT 1) \
             FROM h",
        )
        .bind(after)
        .bind(LAG_COUNT_LIMIT)
        .fetch_one(&self.pool)
        .await?;
        Ok(Lag {
            horizon,
            events: u64::try_from(events).unwrap_or(0),
            oldest_committed_at: oldest,
            undeliverable_events: u64::try_from(undeliverable).unwrap_or(0),
            oldest_transaction_seconds: transaction_seconds,
        })
    }

    /// The current version of an aggregate (0 when it has no events).
    pub async fn stream_version(&self, aggregate_id: Uuid) -> Result<Version, StoreError> {
        let version = sqlx::query_scalar("SELECT coalesce(max(event_version), 0) FROM events WHERE aggregate_id = $1")
            .bind(aggregate_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(version)
    }
}

pub(crate) fn decode(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let id: String = row.try_get("id")?;
    let event_id = id
        .parse()
        .map_err(|e| StoreError::Corrupt { table: "events", detail: format!("id {id:?} is not a ULID: {e}") })?;
    Ok(RecordedEvent {
        position: row.try_get("position")?,
        event_id,
        aggregate_id: row.try_get("aggregate_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        event_type: row.try_get("event_type")?,
        version: row.try_get("event_version")?,
        data: row.try_get("event_data")?,
        metadata: row.try_get("metadata")?,
        occurred_at: row.try_get("occurred_at")?,
        created_at: row.try_get("created_at")?,
    })
}
