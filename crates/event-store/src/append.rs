//! Appending to one aggregate: events, claims, a new data key and the idempotency record in one transaction,
//! always by `kiroku_append` (the migrations define it; the last restatement is the one in force), so that the
//! order of its steps and its answers exist once.

use sqlx::{PgConnection, Row};
use tracing::Instrument;
use ulid::Ulid;
use uuid::Uuid;

use crate::error::{AppendError, StoreError, is_unique_violation};
use crate::types::{
    Append, AppendOutcome, Appended, Claim, ExpectedVersion, IdempotencyKey, IdempotencyRecord, Position,
    StoredOutcome, Version,
};
use crate::{EventStore, MAX_EVENTS_PER_APPEND};

/// The first of some claims that is taken, and its owner. The LATERAL subquery with its LIMIT cannot be flattened
/// into a join, so every plan, the generic one a connection caches included, is one primary-key lookup per claim:
/// a join let a plan made while the table was small (a fresh database) hash the whole table on every call, and
/// RegisterUser slowed down with every user registered (measured: 1,258 → 533 calls/s over 24,000).
const FIRST_CLAIMED: &str = "SELECT w.kind, w.value, c.owner_id \
     FROM unnest($1::varchar[], $2::varchar[]) WITH ORDINALITY AS w(kind, value, ord) \
     CROSS JOIN LATERAL (SELECT owner_id FROM claims WHERE kind = w.kind AND value = w.value LIMIT 1) c \
     ORDER BY w.ord LIMIT 1";

impl EventStore {
    /// Appends: one call of `kiroku_append`, which is its own transaction — or, for an erasure, that call and the
    /// erasure's writes in one transaction (see [`append_in_transaction`]).
    ///
    /// That transaction runs in a task of its own: a caller that gives up (a cancelled RPC drops its future) must
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
        let mut append = std::borrow::Cow::Borrowed(append);
        let events_only = append.claims.is_empty()
            && append.idempotency.is_none()
            && append.new_key.is_none()
            && append.erasure.is_none();
        if append.expected == ExpectedVersion::Any && !events_only {
            // Resolved before the transaction takes its id: a transaction reading the version after its first
            // write could build version N+1 on a version N committed meanwhile by a later transaction, and give it
            // a lower position. Resolved here, a concurrent append is a conflict instead. With events only, the
            // function's first write is the events' insert, after its read of the version: nothing to resolve.
            let resolved = match self.stream_version(append.aggregate_id).await? {
                Version::NONE => ExpectedVersion::NoStream,
                version => ExpectedVersion::Exact(version),
            };
            append.to_mut().expected = resolved;
        }
        let outcome = if append.erasure.is_none() {
            // One statement: one round trip, its own transaction, nothing left half-way on the connection if the
            // caller gives up.
            let mut conn = self.pool.acquire().await?;
            kiroku_append(&mut conn, &append).instrument(tracing::debug_span!("append.statement")).await
        } else {
            let store = self.clone();
            let append = append.into_owned();
            tokio::spawn(async move { store.append_transaction(&append).await }).await.map_err(|error| {
                StoreError::Corrupt { table: "events", detail: format!("the append task failed: {error}") }
            })?
        };
        match outcome {
            Ok(AppendOutcome::Appended(appended)) => {
                self.announce_commit();
                Ok(AppendOutcome::Appended(appended))
            }
            // The append that took the version has committed (the insert waited for it): its version is visible
            // to a read now, outside the statement that failed.
            Err(AppendError::Conflict { aggregate_id, expected, actual: None }) => {
                let actual = self.stream_version(aggregate_id).await.ok();
                Err(AppendError::Conflict { aggregate_id, expected, actual })
            }
            other => other,
        }
    }

    async fn append_transaction(&self, append: &Append) -> Result<AppendOutcome, AppendError> {
        let mut tx = self.pool.begin().instrument(tracing::debug_span!("append.begin")).await?;
        match append_in_transaction(&mut tx, append).await {
            Ok(AppendOutcome::Appended(appended)) => {
                tx.commit().instrument(tracing::debug_span!("append.commit")).await?;
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
        version: Version,
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
        .bind(version)
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
/// The same call of `kiroku_append` as [`EventStore::append`], followed by the erasure's writes if the append
/// carries one: after the event, so that a concurrent append that took the version first makes this a conflict,
/// with nothing erased. Nothing here calls the network; keep the transaction short, since an open transaction
/// holds back every reader of the log (see [`EventStore::read_batch`]).
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
    let outcome = kiroku_append(tx, append).instrument(tracing::debug_span!("append.statement")).await?;
    if let (AppendOutcome::Appended(_), Some(erasure)) = (&outcome, &append.erasure) {
        crate::keys::erase(tx, erasure).await?;
    }
    Ok(outcome)
}

/// One call of `kiroku_append`: the idempotency key first (so a concurrent repeat waits for this transaction
/// and then replays its answer), then the claims in a fixed order (so two appends cannot deadlock on them), the
/// new data key, the events at the next versions if the aggregate is at the expected one, and the stored
/// answer. One row per event written, or one replayed answer.
async fn kiroku_append(conn: &mut PgConnection, append: &Append) -> Result<AppendOutcome, AppendError> {
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
            version: first.try_get("version")?,
            position: first.try_get("event_position")?,
        }));
    }
    written(append, columns.event_ids, &rows).map(AppendOutcome::Appended)
}

/// What `kiroku_append` appended, from its rows (`version`, `event_position`), one per event. Fewer rows than
/// events cannot happen short of a broken function, and is reported as corruption.
fn written(append: &Append, event_ids: Vec<Ulid>, rows: &[sqlx::postgres::PgRow]) -> Result<Appended, AppendError> {
    let mut positions = Vec::with_capacity(rows.len());
    let mut version = Version::NONE;
    for row in rows {
        positions.push(row.try_get::<Position, _>("event_position")?);
        version = row.try_get("version")?;
    }
    if positions.len() != append.events.len() {
        return Err(StoreError::Corrupt {
            table: "events",
            detail: format!("kiroku_append wrote {} of {} events", positions.len(), append.events.len()),
        }
        .into());
    }
    Ok(Appended { aggregate_id: append.aggregate_id, version, positions, event_ids })
}

/// `kiroku_append`'s refusals, told apart by SQLSTATE: KR409 a taken claim, KR412 a version conflict (the version
/// found in its detail), and the unique version key a conflict too (a concurrent append took the version between
/// the function's read and its insert, or a new stream's first version exists).
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
            actual: detail.parse::<u64>().ok().and_then(|v| Version::try_from(v).ok()),
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
            version: row.try_get("version")?,
            position: row.try_get("position")?,
        })
    })
    .transpose()
}

/// An append's events as the columns `kiroku_append` takes (arrays for `unnest`), with the ids given to them.
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
    /// Binds $1–$8: the aggregate, its expected version, and the events' columns.
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
