//! Appending to one aggregate: events, claims and the idempotency record in one transaction.

use std::fmt;

use sqlx::{PgConnection, Row};
use tracing::Instrument;
use ulid::Ulid;
use uuid::Uuid;

use crate::error::{AppendError, StoreError, is_unique_violation};
use crate::event::{NewEvent, Position};
use crate::{EventStore, MAX_EVENTS_PER_APPEND};

/// The version an append expects its aggregate to be at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Whatever it is; only a concurrent append to the same aggregate conflicts.
    Any,
    /// The aggregate has no events yet.
    NoStream,
    /// Exactly this version (its last event's version).
    Exact(u32),
}

impl ExpectedVersion {
    fn as_sql(self) -> Option<i32> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(i32::try_from(v).unwrap_or(i32::MAX)),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// A unique key that the appended aggregate takes (e.g. kind `github_id`, value `1234`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    pub kind: String,
    pub value: String,
}

/// Identifies one command of one caller (AIP-155).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub caller: String,
    pub request_id: String,
}

/// The answer to store with the events, returned to any later append with the same key.
#[derive(Clone, Debug)]
pub struct IdempotencyRecord {
    pub key: IdempotencyKey,
    pub outcome: serde_json::Value,
}

/// One append: events to one aggregate, the claims they take, and the command's idempotency record.
#[derive(Clone, Debug)]
pub struct Append {
    pub aggregate_id: Uuid,
    pub aggregate_type: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub claims: Vec<Claim>,
    pub idempotency: Option<IdempotencyRecord>,
    /// The data key of a new owner, stored with the events sealed under it.
    pub new_key: Option<crate::keys::WrappedKey>,
    /// An erasure: its writes commit with its event, or neither does.
    pub erasure: Option<crate::keys::Erasure>,
}

/// What a committed append wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub aggregate_id: Uuid,
    /// The aggregate's version after the append.
    pub version: u32,
    /// One per event, in order.
    pub positions: Vec<Position>,
    pub event_ids: Vec<Ulid>,
}

impl Appended {
    /// The position of the last event written: a read-your-writes token.
    pub fn last_position(&self) -> Position {
        self.positions.last().copied().unwrap_or(Position::ZERO)
    }
}

/// The answer an earlier command with the same idempotency key stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredOutcome {
    pub outcome: serde_json::Value,
    pub aggregate_id: Uuid,
    pub version: u32,
    pub position: Position,
}

/// The result of an append that did not fail.
#[derive(Clone, Debug, PartialEq)]
pub enum AppendOutcome {
    /// The events were committed.
    Appended(Appended),
    /// The idempotency key was already used: nothing was written, here is the first answer.
    Replayed(StoredOutcome),
}

/// The first of some claims that is taken, and its owner. The LATERAL subquery with its LIMIT cannot be flattened
/// into a join, so every plan, the generic one a connection caches included, is one primary-key lookup per claim:
/// a join let a plan made while the table was small (a fresh database) hash the whole table on every call, and
/// RegisterUser slowed down with every user registered (measured: 1,258 → 533 calls/s over 24,000).
const FIRST_CLAIMED: &str = "SELECT w.kind, w.value, c.owner_id \
     FROM unnest($1::varchar[], $2::varchar[]) WITH ORDINALITY AS w(kind, value, ord) \
     CROSS JOIN LATERAL (SELECT owner_id FROM claims WHERE kind = w.kind AND value = w.value LIMIT 1) c \
     ORDER BY w.ord LIMIT 1";

/// Inserts the events at the aggregate's next versions, if it is at the expected one, and returns the
/// aggregate's version before the append with the rows written. Positions are `xid8 * 2^16 + index`.
const INSERT_EVENTS: &str = r#"
WITH current AS (
    SELECT coalesce(max(event_version), 0) AS version FROM events WHERE aggregate_id = $1
), inserted AS (
    INSERT INTO events (id, aggregate_id, aggregate_type, event_type, event_version, event_data, metadata,
                        occurred_at, position)
    SELECT e.id, $1, $2, e.event_type, current.version + e.ord::integer, e.data, e.metadata, e.occurred_at,
           (pg_current_xact_id()::text::bigint << 16) + (e.ord - 1)
    FROM current,
         unnest($4::varchar[], $5::varchar[], $6::jsonb[], $7::jsonb[], $8::timestamptz[])
             WITH ORDINALITY AS e(id, event_type, data, metadata, occurred_at, ord)
    WHERE $3::integer IS NULL OR current.version = $3::integer
    ORDER BY e.ord
    RETURNING event_version, position
)
SELECT current.version AS current_version, inserted.event_version, inserted.position
FROM current LEFT JOIN inserted ON true
ORDER BY inserted.position
"#;

/// The events of a new stream ([`ExpectedVersion::NoStream`]) at versions 1, 2, …: no read of the current version
/// first, because a stream that exists holds version 1 (versions start at 1, without holes, and are never
/// deleted), and the unique `(aggregate_id, event_version)` key refuses a second one. The version read cost
/// ~15 % of a one-event append's server time (pgbench, 16 clients: 12.0–15.3k against 14.7–17.7k per second).
const INSERT_NEW_STREAM: &str = r#"
INSERT INTO events (id, aggregate_id, aggregate_type, event_type, event_version, event_data, metadata, occurred_at,
                    position)
SELECT e.id, $1, $2, e.event_type, e.ord::integer, e.data, e.metadata, e.occurred_at,
       (pg_current_xact_id()::text::bigint << 16) + (e.ord - 1)
FROM unnest($4::varchar[], $5::varchar[], $6::jsonb[], $7::jsonb[], $8::timestamptz[])
         WITH ORDINALITY AS e(id, event_type, data, metadata, occurred_at, ord)
WHERE $3::integer = 0
ORDER BY e.ord
RETURNING event_version AS version, position AS event_position
"#;

impl EventStore {
    /// Appends in one transaction of its own (see [`append_in_transaction`] for the order of its steps).
    ///
    /// The transaction runs in a task of its own: a caller that gives up (a cancelled RPC drops its future) must
    /// not abandon it half-way, which would leave an open transaction on a pooled connection (sqlx cannot roll
    /// back a `BEGIN` whose answer it never read) for the next user to run inside, uncommitted.
    ///
    /// Counted in `kiroku_event_store_appends_total{outcome}` (appended, replayed, conflict, claim_refused,
    /// fenced, invalid, error), `kiroku_event_store_events_appended_total` and the latency histogram
    /// `kiroku_event_store_append_seconds`.
    pub async fn append(&self, append: &Append) -> Result<AppendOutcome, AppendError> {
        let started = std::time::Instant::now();
        let result = self.append_once(append).await;
        let outcome = match &result {
            Ok(AppendOutcome::Appended(appended)) => {
                metrics::counter!("kiroku_event_store_events_appended_total")
                    .increment(appended.positions.len() as u64);
                "appended"
            }
            Ok(AppendOutcome::Replayed(_)) => "replayed",
            Err(AppendError::Conflict { .. }) => "conflict",
            Err(AppendError::ClaimRefused { .. }) => "claim_refused",
            Err(AppendError::PositionsBehind { .. }) => "fenced",
            Err(AppendError::Invalid(_)) => "invalid",
            Err(AppendError::Store(_)) => "error",
        };
        metrics::counter!("kiroku_event_store_appends_total", "outcome" => outcome).increment(1);
        metrics::histogram!("kiroku_event_store_append_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    async fn append_once(&self, append: &Append) -> Result<AppendOutcome, AppendError> {
        validate(append)?;
        self.ensure_positions_ahead().await?;
        if append.claims.is_empty()
            && append.idempotency.is_none()
            && append.new_key.is_none()
            && append.erasure.is_none()
        {
            // One statement is its own transaction: no BEGIN and COMMIT round trips. Its version read and its
            // insert share one snapshot, so "any version" needs no resolving.
            let mut conn = self.pool.acquire().await?;
            let appended = if append.expected == ExpectedVersion::NoStream {
                self.insert_new_stream(&mut conn, append).await?
            } else {
                insert_events(&mut conn, append).await?
            };
            self.announce_commit();
            return Ok(AppendOutcome::Appended(appended));
        }
        let mut append = append.clone();
        if append.expected == ExpectedVersion::Any {
            // Resolved before the transaction takes its id: a transaction reading the version after its first
            // insert could build version N+1 on a version N committed meanwhile by a later transaction, and give
            // it a lower position. Resolved here, a concurrent append is a conflict instead.
            append.expected = match self.stream_version(append.aggregate_id).await? {
                0 => ExpectedVersion::NoStream,
                version => ExpectedVersion::Exact(version),
            };
        }
        if append.erasure.is_none() {
            // One statement (`kiroku_append`): one round trip, its own transaction, nothing left half-way on the
            // connection if the caller gives up.
            let mut conn = self.pool.acquire().await?;
            let outcome =
                append_in_one_statement(&mut conn, &append).instrument(tracing::debug_span!("append.statement")).await;
            if let Ok(AppendOutcome::Appended(_)) = &outcome {
                self.announce_commit();
            }
            return outcome;
        }
        let store = self.clone();
        tokio::spawn(async move { store.append_transaction(&append).await }).await.map_err(|error| {
            StoreError::Corrupt { table: "events", detail: format!("the append task failed: {error}") }
        })?
    }

    /// A new stream's events, without reading its version first (see [`INSERT_NEW_STREAM`]). On its own
    /// connection, outside any transaction: a refusal leaves the connection free to read the version found.
    async fn insert_new_stream(&self, conn: &mut PgConnection, append: &Append) -> Result<Appended, AppendError> {
        let columns = EventColumns::of(append)?;
        let rows = match columns.bind(sqlx::query(INSERT_NEW_STREAM)).fetch_all(&mut *conn).await {
            Ok(rows) => rows,
            Err(error) if is_unique_violation(&error, "events_aggregate_version_key") => {
                // The stream exists. Its first append has committed (the insert waited for it), so this read sees it.
                let actual = self.stream_version(append.aggregate_id).await.ok();
                return Err(AppendError::Conflict {
                    aggregate_id: append.aggregate_id,
                    expected: append.expected,
                    actual,
                });
            }
            Err(error) => return Err(error.into()),
        };
        written(append, columns.event_ids, &rows, "a new stream's insert")
    }

    async fn append_transaction(&self, append: &Append) -> Result<AppendOutcome, AppendError> {
        let mut tx = self.pool.begin().instrument(tracing::debug_span!("append.begin")).await?;
        match append_in_transaction(&mut tx, append).await {
            Ok(AppendOutcome::Appended(appended)) => {
                tx.commit().instrument(tracing::debug_span!("append.commit")).await?;
                self.announce_commit();
                Ok(AppendOutcome::Appended(appended))
            }
            other => {
                tx.rollback().await?;
                other
            }
        }
    }

    /// Refuses appends while the next position would not be above the head of the log (see
    /// [`AppendError::PositionsBehind`]). Checked before this handle's first append (the command service also
    /// checks at start-up); once the cluster is ahead, its transaction ids only grow.
    async fn ensure_positions_ahead(&self) -> Result<(), AppendError> {
        if self.positions_ahead.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.check_positions_ahead().await?;
        self.positions_ahead.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether the next position (`xid8 · 2^16`, the next transaction id being the current snapshot's xmax) is
    /// above every position in the log.
    pub async fn check_positions_ahead(&self) -> Result<(), AppendError> {
        let (next, head): (Position, Option<Position>) = sqlx::query_as(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint << 16, (SELECT max(position) FROM events)",
        )
        .fetch_one(&self.pool)
        .await?;
        match head {
            Some(head) if next <= head => Err(AppendError::PositionsBehind { head, next }),
            _ => Ok(()),
        }
    }

    /// The answer stored for an idempotency key, if any.
    pub async fn stored_outcome(&self, key: &IdempotencyKey) -> Result<Option<StoredOutcome>, StoreError> {
        stored_outcome(&self.pool, key).await
    }

    /// Stores `record` as the answer of a command that appended nothing (an answer of "no change", a final
    /// refusal), unless its key is used already: then nothing is written and the first answer is returned. A
    /// concurrent command with the same key that is still appending is waited for.
    pub async fn record_answer(
        &self,
        record: &IdempotencyRecord,
        aggregate_id: Uuid,
        version: u32,
        position: Position,
    ) -> Result<Option<StoredOutcome>, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO idempotency_records (caller, request_id, outcome, aggregate_id, version, position) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&record.key.caller)
        .bind(&record.key.request_id)
        .bind(&record.outcome)
        .bind(aggregate_id)
        .bind(i32::try_from(version).unwrap_or(i32::MAX))
        .bind(position)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(None);
        }
        match stored_outcome(&self.pool, &record.key).await? {
            Some(stored) => Ok(Some(stored)),
            None => Err(StoreError::Corrupt {
                table: "idempotency_records",
                detail: "record not found after a key conflict".to_owned(),
            }),
        }
    }

    /// The aggregate that holds a claim, if any.
    pub async fn claim_owner(&self, claim: &Claim) -> Result<Option<Uuid>, StoreError> {
        let owner = sqlx::query_scalar("SELECT owner_id FROM claims WHERE kind = $1 AND value = $2")
            .bind(&claim.kind)
            .bind(&claim.value)
            .fetch_optional(&self.pool)
            .await?;
        Ok(owner)
    }

    /// The first of `claims` (in their order) that some aggregate holds, with its owner.
    pub async fn first_claimed(&self, claims: &[Claim]) -> Result<Option<(Claim, Uuid)>, StoreError> {
        let kinds: Vec<&str> = claims.iter().map(|c| c.kind.as_str()).collect();
        let values: Vec<&str> = claims.iter().map(|c| c.value.as_str()).collect();
        let found: Option<(String, String, Uuid)> =
            sqlx::query_as(FIRST_CLAIMED).bind(&kinds).bind(&values).fetch_optional(&self.pool).await?;
        Ok(found.map(|(kind, value, owner)| (Claim { kind, value }, owner)))
    }

    /// Deletes up to `limit` idempotency records older than `keep`, in one short statement of its own (a long
    /// delete would hold back every reader of the log); returns how many went.
    pub async fn prune_idempotency_records(&self, keep: std::time::Duration, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM idempotency_records WHERE ctid IN (SELECT ctid FROM idempotency_records \
             WHERE created_at < now() - make_interval(secs => $1::double precision) LIMIT $2)",
        )
        .bind(keep.as_secs_f64())
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

/// Appends inside the caller's transaction, which must be rolled back unless the result is
/// [`AppendOutcome::Appended`]. After committing, call [`EventStore::announce_commit`].
///
/// The order matters: the idempotency key first (so a concurrent repeat waits for this transaction and then
/// replays its answer), then the claims in a fixed order (so two appends cannot deadlock on them), then the
/// events, then the stored answer. Nothing here calls the network; keep the transaction short, since an open
/// transaction holds back every reader of the log (see [`EventStore::read_all_after`]).
///
/// One append per transaction: positions are `xid · 2^16 + index`, so a second append in the same transaction
/// would reuse the first's positions (and fail on `events_position_key`). Put all of a transaction's events in
/// one [`Append`].
///
/// [`ExpectedVersion::Any`] is refused here: inside a transaction that may already hold its id, the version
/// would be read too late to be safe (see [`EventStore::append`]). Read the version first and expect it.
pub async fn append_in_transaction(tx: &mut PgConnection, append: &Append) -> Result<AppendOutcome, AppendError> {
    validate(append)?;
    if append.expected == ExpectedVersion::Any {
        return Err(AppendError::Invalid("ExpectedVersion::Any inside a caller's transaction; expect a version"));
    }
    if let Some(record) = &append.idempotency
        && !reserve_idempotency_key(tx, record, append.aggregate_id).await?
    {
        // The key's first user has committed (the insert waited for it), so its answer is visible to this
        // statement's snapshot.
        return match stored_outcome(&mut *tx, &record.key).await? {
            Some(stored) => Ok(AppendOutcome::Replayed(stored)),
            None => Err(StoreError::Corrupt {
                table: "idempotency_records",
                detail: "record not found after a key conflict".to_owned(),
            }
            .into()),
        };
    }
    if let Some(refused) = take_claims(tx, append).instrument(tracing::debug_span!("append.claims")).await? {
        return Err(refused);
    }
    if let Some(key) = &append.new_key {
        crate::keys::insert_key(tx, key).await?;
    }
    let appended = insert_events(tx, append).instrument(tracing::debug_span!("append.events")).await?;
    if let Some(erasure) = &append.erasure {
        // After the event: a concurrent append that took the version first makes this a conflict, rolled back
        // with nothing erased.
        crate::keys::erase(tx, erasure).await?;
    }
    if let Some(record) = &append.idempotency {
        sqlx::query("UPDATE idempotency_records SET version = $3, position = $4 WHERE caller = $1 AND request_id = $2")
            .bind(&record.key.caller)
            .bind(&record.key.request_id)
            .bind(i32::try_from(appended.version).unwrap_or(i32::MAX))
            .bind(appended.last_position())
            .execute(&mut *tx)
            .await?;
    }
    Ok(AppendOutcome::Appended(appended))
}

/// The append as one call of `kiroku_append` (migrations/…_append_function.sql): the same steps in the same order
/// as [`append_in_transaction`], in one statement. Its refusals are errors that roll it back, told apart by
/// SQLSTATE: KR409 a taken claim, KR412 a version conflict.
async fn append_in_one_statement(conn: &mut PgConnection, append: &Append) -> Result<AppendOutcome, AppendError> {
    let columns = EventColumns::of(append)?;
    let kinds: Vec<&str> = append.claims.iter().map(|c| c.kind.as_str()).collect();
    let values: Vec<&str> = append.claims.iter().map(|c| c.value.as_str()).collect();
    let record = append.idempotency.as_ref();
    let rows = columns
        .bind(sqlx::query(
            "SELECT replayed, version, event_position, outcome, aggregate_id \
             FROM kiroku_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        ))
        .bind(&kinds)
        .bind(&values)
        .bind(record.map(|r| r.key.caller.as_str()))
        .bind(record.map(|r| r.key.request_id.as_str()))
        .bind(record.map(|r| &r.outcome))
        .bind(append.new_key.as_ref().map(|k| k.master_key_id.as_str()))
        .bind(append.new_key.as_ref().map(|k| k.wrapped.as_slice()))
        .fetch_all(&mut *conn)
        .await
        .map_err(|error| refusal(append, error))?;
    if let Some(first) = rows.first()
        && first.try_get::<bool, _>("replayed")?
    {
        return Ok(AppendOutcome::Replayed(StoredOutcome {
            outcome: first.try_get("outcome")?,
            aggregate_id: first.try_get("aggregate_id")?,
            version: u32::try_from(first.try_get::<i32, _>("version")?).unwrap_or(0),
            position: first.try_get("event_position")?,
        }));
    }
    written(append, columns.event_ids, &rows, "kiroku_append").map(AppendOutcome::Appended)
}

/// What a statement that returns one row per event written (`version`, `event_position`) appended. Fewer rows
/// than events cannot happen short of a broken statement (`statement` names it), and is reported as corruption.
fn written(
    append: &Append,
    event_ids: Vec<Ulid>,
    rows: &[sqlx::postgres::PgRow],
    statement: &str,
) -> Result<Appended, AppendError> {
    let mut positions = Vec::with_capacity(rows.len());
    let mut version = 0;
    for row in rows {
        positions.push(row.try_get::<Position, _>("event_position")?);
        version = u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0);
    }
    if positions.len() != append.events.len() {
        return Err(StoreError::Corrupt {
            table: "events",
            detail: format!("{statement} wrote {} of {} events", positions.len(), append.events.len()),
        }
        .into());
    }
    Ok(Appended { aggregate_id: append.aggregate_id, version, positions, event_ids })
}

/// `kiroku_append`'s refusals (and a concurrent append that took the version between its read and its insert),
/// as the same errors the transaction of separate statements gives.
fn refusal(append: &Append, error: sqlx::Error) -> AppendError {
    if is_unique_violation(&error, "events_aggregate_version_key") {
        return AppendError::Conflict { aggregate_id: append.aggregate_id, expected: append.expected, actual: None };
    }
    let detail = error
        .as_database_error()
        .and_then(|db| db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .map(|db| (db.code().to_owned(), db.detail().unwrap_or_default().to_owned()));
    match detail {
        Some((code, detail)) if code == "KR409" => {
            let mut lines = detail.lines();
            let (kind, value) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
            match lines.next().and_then(|owner| owner.parse().ok()) {
                Some(owner) => AppendError::ClaimRefused { kind: kind.to_owned(), value: value.to_owned(), owner },
                None => AppendError::from(error),
            }
        }
        Some((code, detail)) if code == "KR412" => AppendError::Conflict {
            aggregate_id: append.aggregate_id,
            expected: append.expected,
            actual: detail.parse().ok(),
        },
        _ => AppendError::from(error),
    }
}

fn validate(append: &Append) -> Result<(), AppendError> {
    if append.events.is_empty() {
        return Err(AppendError::Invalid("an append needs at least one event"));
    }
    if append.events.len() > MAX_EVENTS_PER_APPEND {
        return Err(AppendError::Invalid("too many events in one append"));
    }
    Ok(())
}

async fn stored_outcome(
    executor: impl sqlx::PgExecutor<'_>,
    key: &IdempotencyKey,
) -> Result<Option<StoredOutcome>, StoreError> {
    let row = sqlx::query(
        "SELECT outcome, aggregate_id, version, position FROM idempotency_records \
         WHERE caller = $1 AND request_id = $2",
    )
    .bind(&key.caller)
    .bind(&key.request_id)
    .fetch_optional(executor)
    .await?;
    row.map(|row| {
        Ok(StoredOutcome {
            outcome: row.try_get("outcome")?,
            aggregate_id: row.try_get("aggregate_id")?,
            version: u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0),
            position: row.try_get("position")?,
        })
    })
    .transpose()
}

/// Inserts the idempotency key with a placeholder answer. Returns false when the key is already used; if its
/// first user has not committed yet, PostgreSQL makes us wait for it first.
async fn reserve_idempotency_key(
    tx: &mut PgConnection,
    record: &IdempotencyRecord,
    aggregate_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_records (caller, request_id, outcome, aggregate_id, version, position) \
         VALUES ($1, $2, $3, $4, 0, 0) ON CONFLICT DO NOTHING",
    )
    .bind(&record.key.caller)
    .bind(&record.key.request_id)
    .bind(&record.outcome)
    .bind(aggregate_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Takes every claim of the append for its aggregate, or returns the first one (in sorted order) that another
/// aggregate holds. A claim this aggregate holds already counts as taken.
///
/// `ON CONFLICT DO NOTHING` waits for a concurrent claimant to finish and skips the row only if it committed, so the
/// claims table decides the race and we learn the winner without aborting the transaction. But the winner's claim
/// may be released (an erasure) between that insert and the look-up of its owner, which then finds nobody: the
/// claims are inserted again until each is held by someone, as `kiroku_append` does.
async fn take_claims(tx: &mut PgConnection, append: &Append) -> Result<Option<AppendError>, sqlx::Error> {
    if append.claims.is_empty() {
        return Ok(None);
    }
    let mut claims = append.claims.clone();
    claims.sort();
    claims.dedup();
    let kinds: Vec<&str> = claims.iter().map(|c| c.kind.as_str()).collect();
    let values: Vec<&str> = claims.iter().map(|c| c.value.as_str()).collect();
    for _ in 0..CLAIM_TRIES {
        sqlx::query(
            "INSERT INTO claims (kind, value, owner_id) \
             SELECT kind, value, $3 FROM unnest($1::varchar[], $2::varchar[]) WITH ORDINALITY AS c(kind, value, ord) \
             ORDER BY ord ON CONFLICT DO NOTHING",
        )
        .bind(&kinds)
        .bind(&values)
        .bind(append.aggregate_id)
        .execute(&mut *tx)
        .await?;
        // A fresh snapshot (READ COMMITTED): who holds each claim now, in the claims' order; nobody when released.
        let holders: Vec<Option<Uuid>> = sqlx::query_scalar(
            "SELECT c.owner_id FROM unnest($1::varchar[], $2::varchar[]) WITH ORDINALITY AS w(kind, value, ord) \
             LEFT JOIN claims c ON c.kind = w.kind AND c.value = w.value ORDER BY w.ord",
        )
        .bind(&kinds)
        .bind(&values)
        .fetch_all(&mut *tx)
        .await?;
        if let Some((claim, owner)) = claims
            .iter()
            .zip(&holders)
            .find_map(|(claim, owner)| owner.filter(|o| *o != append.aggregate_id).map(|o| (claim, o)))
        {
            return Ok(Some(AppendError::ClaimRefused { kind: claim.kind.clone(), value: claim.value.clone(), owner }));
        }
        if holders.iter().all(Option::is_some) {
            return Ok(None);
        }
    }
    Err(sqlx::Error::Protocol("claims were released and taken again while this append claimed them; retry".to_owned()))
}

/// How often an append inserts claims that vanished between its insert and its look-up (see [`take_claims`]).
const CLAIM_TRIES: usize = 10;

/// An append's events as the columns both inserts bind (arrays for `unnest`), with the ids given to them.
struct EventColumns<'a> {
    append: &'a Append,
    event_ids: Vec<Ulid>,
    ids: Vec<String>,
    types: Vec<&'a str>,
    data: Vec<&'a serde_json::Value>,
    metadata: Vec<serde_json::Value>,
    occurred: Vec<chrono::DateTime<chrono::Utc>>,
}

impl<'a> EventColumns<'a> {
    /// Binds $1–$8, which both inserts share: the aggregate, its expected version, and the events' columns.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.append.aggregate_id)
            .bind(&self.append.aggregate_type)
            .bind(self.append.expected.as_sql())
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.data)
            .bind(&self.metadata)
            .bind(&self.occurred)
    }

    fn of(append: &'a Append) -> Result<Self, StoreError> {
        let event_ids: Vec<Ulid> = append.events.iter().map(|_| Ulid::new()).collect();
        let metadata =
            append.events.iter().map(|e| serde_json::to_value(&e.metadata)).collect::<Result<_, _>>().map_err(|e| {
                StoreError::Corrupt { table: "events", detail: format!("metadata does not serialize: {e}") }
            })?;
        Ok(EventColumns {
            append,
            ids: event_ids.iter().map(Ulid::to_string).collect(),
            event_ids,
            types: append.events.iter().map(|e| e.event_type.as_str()).collect(),
            data: append.events.iter().map(|e| &e.data).collect(),
            metadata,
            occurred: append.events.iter().map(|e| e.occurred_at).collect(),
        })
    }
}

async fn insert_events(tx: &mut PgConnection, append: &Append) -> Result<Appended, AppendError> {
    let columns = EventColumns::of(append)?;

    let rows = columns.bind(sqlx::query(INSERT_EVENTS)).fetch_all(&mut *tx).await.map_err(|error| {
        if is_unique_violation(&error, "events_aggregate_version_key") {
            // A concurrent append took the same version between our read of the current version and our
            // insert. Its version is not visible to us yet; report the one we expected to build on.
            AppendError::Conflict { aggregate_id: append.aggregate_id, expected: append.expected, actual: None }
        } else {
            AppendError::from(error)
        }
    })?;

    let mut positions = Vec::with_capacity(rows.len());
    let mut version = 0u32;
    let mut current = 0i32;
    for row in &rows {
        current = row.try_get("current_version")?;
        if let Some(position) = row.try_get::<Option<Position>, _>("position")? {
            positions.push(position);
            version = u32::try_from(row.try_get::<i32, _>("event_version")?).unwrap_or(0);
        }
    }
    if positions.len() != append.events.len() {
        return Err(AppendError::Conflict {
            aggregate_id: append.aggregate_id,
            expected: append.expected,
            actual: u32::try_from(current).ok(),
        });
    }
    Ok(Appended { aggregate_id: append.aggregate_id, version, positions, event_ids: columns.event_ids })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What PostgreSQL would run for `sql` (prepared with two `varchar[]` parameters) once a connection switches
    /// to its cached generic plan, on a fresh database (empty, never analysed tables).
    async fn generic_plan(sql: &str) -> String {
        let db = kiroku_testkit::TestDb::create().await.unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
        let prepare = format!("PREPARE probe(varchar[], varchar[]) AS {sql}");
        sqlx::query(sqlx::AssertSqlSafe(prepare)).execute(&mut *conn).await.unwrap();
        let lines: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE probe('{auth0_id}', '{github|1}')")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        lines.join("\n")
    }

    #[tokio::test]
    async fn finding_a_taken_claim_is_a_key_lookup_even_in_a_plan_cached_on_an_empty_table() {
        let plan = generic_plan(FIRST_CLAIMED).await;
        assert!(plan.contains("Index Scan using claims_pkey") && !plan.contains("Seq Scan"), "{plan}");
    }
}
