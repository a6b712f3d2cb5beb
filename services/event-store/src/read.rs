//! Reading: one aggregate in version order, or the whole log by global position.

use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::EventStore;
use crate::error::StoreError;
use crate::event::{Position, RecordedEvent};

/// One aggregate's events after a version, in version order.
const READ_STREAM: &str = "SELECT position, id, aggregate_id, aggregate_type, event_type, event_version, \
    event_data, metadata, occurred_at, created_at FROM events WHERE aggregate_id = $1 AND event_version > $2 \
    ORDER BY event_version LIMIT $3";

/// Every event after a position, in position order, but only below the oldest transaction still running:
/// `pg_current_snapshot()` is this statement's snapshot, so every transaction with an xid below its xmin has
/// finished, and its events are visible now or never will be. Nothing can later commit below what we return.
const READ_ALL_AFTER: &str = "SELECT position, id, aggregate_id, aggregate_type, event_type, event_version, \
    event_data, metadata, occurred_at, created_at FROM events \
    WHERE position > $1 AND position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) \
    ORDER BY position LIMIT $2";

/// The highest position that is final: every event at or below it has committed (and is visible) or never will.
const SAFE_HORIZON: &str = "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) - 1";

impl EventStore {
    /// One aggregate's events with a version above `after_version`, in version order, at most `limit`.
    pub async fn read_stream(
        &self,
        aggregate_id: Uuid,
        after_version: u32,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(READ_STREAM)
            .bind(aggregate_id)
            .bind(i64::from(after_version))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Up to `limit` events with a position above `after`, in position order, never skipping one that commits
    /// later (see [`READ_ALL_AFTER`]). An empty answer means "nothing more is final yet", not "the end".
    pub async fn read_all_after(&self, after: Position, limit: u32) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows =
            sqlx::query(READ_ALL_AFTER).bind(after.as_i64()).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(decode).collect()
    }

    /// The highest position that is final now: no event at or below it can still commit.
    pub async fn safe_horizon(&self) -> Result<Position, StoreError> {
        let horizon: i64 = sqlx::query_scalar(SAFE_HORIZON).fetch_one(&self.pool).await?;
        Ok(Position::from_i64(horizon))
    }

    /// The current version of an aggregate (0 when it has no events).
    pub async fn stream_version(&self, aggregate_id: Uuid) -> Result<u32, StoreError> {
        let version: i32 =
            sqlx::query_scalar("SELECT coalesce(max(event_version), 0) FROM events WHERE aggregate_id = $1")
                .bind(aggregate_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(u32::try_from(version).unwrap_or(0))
    }
}

fn decode(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let id: String = row.try_get("id")?;
    let event_id = id
        .parse()
        .map_err(|e| StoreError::Corrupt { table: "events", detail: format!("id {id:?} is not a ULID: {e}") })?;
    Ok(RecordedEvent {
        position: Position::from_i64(row.try_get("position")?),
        event_id,
        aggregate_id: row.try_get("aggregate_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        event_type: row.try_get("event_type")?,
        version: u32::try_from(row.try_get::<i32, _>("event_version")?).unwrap_or(0),
        data: row.try_get("event_data")?,
        metadata: row.try_get("metadata")?,
        occurred_at: row.try_get("occurred_at")?,
        created_at: row.try_get("created_at")?,
    })
}
