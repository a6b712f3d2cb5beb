//! How each event changes the read models. One function per event type; events of other aggregates are
//! skipped on purpose, and an unknown event type of a known aggregate is an error (it goes to the dead letters
//! rather than being silently dropped).

use chrono::{DateTime, Utc};
use kiroku_domain::{
    AuditEvent, UserErased, UserEvent, UserProfileUpdated, UserRegistered, UserRegistrationFailed, UserStatus,
};
use kiroku_event_store::{Position, RecordedEvent, Version};
use sqlx::PgConnection;

/// Why an event could not be applied: retried while transient, dead-lettered after enough other failures.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("{0}")]
    Decode(#[from] kiroku_domain::DecodeError),
    #[error("unknown event type {event_type} for aggregate type {aggregate_type}")]
    UnknownEventType { aggregate_type: String, event_type: String },
    #[error("user {0} is missing the predecessor of version {1}")]
    MissingPredecessor(uuid::Uuid, Version),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl ApplyError {
    /// True when trying the same event again later may well succeed by itself: a lost connection, a deadlock or
    /// serialization failure, a timeout or cancellation, a server short of resources or shutting down. Those are
    /// retried without counting; everything else counts an attempt towards the dead letters, so that nothing can
    /// block the projection for ever.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, ApplyError::Database(error) if kiroku_event_store::is_transient(error))
    }
}

/// Applies one event to one generation of the read models. Applying it twice changes nothing.
pub(crate) async fn apply(conn: &mut PgConnection, generation: i32, event: &RecordedEvent) -> Result<(), ApplyError> {
    let unknown = || ApplyError::UnknownEventType {
        aggregate_type: event.aggregate_type.clone(),
        event_type: event.event_type.clone(),
    };
    match event.aggregate_type.as_str() {
        UserEvent::AGGREGATE_TYPE => match UserEvent::decode(&event.event_type, &event.data).ok_or_else(unknown)?? {
            UserEvent::UserRegistered(registered) => user_registered(conn, generation, event, &registered).await,
            UserEvent::UserProfileUpdated(updated) => profile_updated(conn, generation, event, &updated).await,
            UserEvent::UserDeactivated(e) => {
                status_changed(conn, generation, event, UserStatus::Deactivated, e.deactivated_at).await
            }
            UserEvent::UserReactivated(e) => {
                status_changed(conn, generation, event, UserStatus::Active, e.reactivated_at).await
            }
            UserEvent::UserErased(e) => erased(conn, event, e.erased_at).await,
        },
        AuditEvent::AGGREGATE_TYPE => {
            match AuditEvent::decode(&event.event_type, &event.data).ok_or_else(unknown)?? {
                AuditEvent::UserRegistrationFailed(failed) => {
                    registration_failed(conn, generation, event, &failed).await
                }
            }
        }
        // Aggregates this projection does not read (none yet): their positions still advance the checkpoint.
        _ => Ok(()),
    }
}

/// Whether an event can be applied in a multi-row insert with others of its run: a registration or a refused
/// attempt, which depend on no earlier row.
pub(crate) fn batchable(event: &RecordedEvent) -> bool {
    (event.aggregate_type == UserEvent::AGGREGATE_TYPE && event.event_type == UserRegistered::EVENT_TYPE)
        || (event.aggregate_type == AuditEvent::AGGREGATE_TYPE
            && event.event_type == UserRegistrationFailed::EVENT_TYPE)
}

/// A run of [`batchable`] events as the rows they insert: one insert for the registrations, one for the refused
/// attempts. The same rows as [`apply`] one by one, but not idempotent: a row already there fails the run, and the
/// step then goes event by event, where [`apply`] skips it. A step's rows and its checkpoint commit together, so a
/// run after the checkpoint finds no row of its own; `ON CONFLICT DO NOTHING` here cost a rebuild about a sixth of
/// its speed (speculative insertion into the primary key; `cargo bench --bench read_side`, alternating runs).
#[derive(Default)]
pub(crate) struct Run {
    users: UserRows,
    failures: FailureRows,
}

impl Run {
    /// The rows of `events`, all of them [`batchable`].
    pub(crate) fn of<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> Result<Run, ApplyError> {
        let mut run = Run::default();
        for event in events {
            let unknown = || ApplyError::UnknownEventType {
                aggregate_type: event.aggregate_type.clone(),
                event_type: event.event_type.clone(),
            };
            match event.aggregate_type.as_str() {
                UserEvent::AGGREGATE_TYPE => {
                    match UserEvent::decode(&event.event_type, &event.data).ok_or_else(unknown)?? {
                        UserEvent::UserRegistered(registered) => run.users.push(event, &registered),
                        _ => return Err(unknown()),
                    }
                }
                _ => match AuditEvent::decode(&event.event_type, &event.data).ok_or_else(unknown)?? {
                    AuditEvent::UserRegistrationFailed(failed) => run.failures.push(event, &failed),
                },
            }
        }
        Ok(run)
    }

    /// The rows of a whole batch, built before its step (outside its transaction, while the step before applies):
    /// `None` unless every event is [`batchable`] and decodes, which the step's event-by-event path then sorts out.
    pub(crate) fn prepare(events: &[RecordedEvent]) -> Option<Run> {
        if events.is_empty() || !events.iter().all(batchable) {
            return None;
        }
        Run::of(events).ok()
    }

    pub(crate) async fn insert(&self, conn: &mut PgConnection, generation: i32) -> Result<(), ApplyError> {
        self.users.insert(conn, generation, Existing::Fail).await?;
        self.failures.insert(conn, generation, Existing::Fail).await
    }
}

/// What an insert does with a row that is already there.
#[derive(Clone, Copy)]
enum Existing {
    /// Leaves it as it is: applying an event twice changes nothing.
    Skip,
    /// Fails the statement (a run of a batch, which is then applied event by event).
    Fail,
}

/// The columns of a run of registrations, as arrays for `unnest`.
#[derive(Default)]
struct UserRows {
    ids: Vec<uuid::Uuid>,
    auth0_ids: Vec<Option<String>>,
    github_ids: Vec<Option<String>>,
    logins: Vec<Option<String>>,
    names: Vec<Option<String>>,
    avatars: Vec<Option<String>>,
    at: Vec<DateTime<Utc>>,
    versions: Vec<Version>,
    positions: Vec<Position>,
}

impl UserRows {
    fn push(&mut self, event: &RecordedEvent, registered: &UserRegistered) {
        // Personal columns stay empty for a person erased before this event was applied (a rebuild, a lagging
        // projector): their data can no longer be opened.
        let personal = registered.personal.as_ref();
        self.ids.push(event.aggregate_id);
        self.auth0_ids.push(personal.map(|p| p.auth0_id.to_string()));
        self.github_ids.push(personal.map(|p| p.github_id.to_string()));
        self.logins.push(personal.map(|p| p.github_username.clone()));
        self.names.push(personal.map(|p| p.display_name.clone()));
        self.avatars.push(personal.and_then(|p| p.avatar_url.clone()));
        self.at.push(registered.registered_at);
        self.versions.push(event.version);
        self.positions.push(event.position);
    }

    /// One insert for all the rows (none: nothing to do).
    async fn insert(&self, conn: &mut PgConnection, generation: i32, existing: Existing) -> Result<(), ApplyError> {
        macro_rules! insert {
            () => {
                "INSERT INTO users_read_rows (generation, id, auth0_id, github_id, github_username, \
                 display_name, avatar_url, status, created_at, updated_at, version, position, registered_position, \
                 login_position) \
                 SELECT $1, u.id, u.auth0_id, u.github_id, u.login, u.name, u.avatar, 'active', u.at, u.at, \
                        u.version, u.position, u.position, u.position \
                 FROM unnest($2::uuid[], $3::varchar[], $4::varchar[], $5::varchar[], $6::varchar[], \
                             $7::varchar[], $8::timestamptz[], $9::integer[], $10::bigint[]) \
                      AS u(id, auth0_id, github_id, login, name, avatar, at, version, position)"
            };
        }
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(match existing {
            Existing::Skip => concat!(insert!(), " ON CONFLICT (generation, id) DO NOTHING"),
            Existing::Fail => insert!(),
        })
        .bind(generation)
        .bind(&self.ids)
        .bind(&self.auth0_ids)
        .bind(&self.github_ids)
        .bind(&self.logins)
        .bind(&self.names)
        .bind(&self.avatars)
        .bind(&self.at)
        .bind(&self.versions)
        .bind(&self.positions)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// The columns of a run of refused attempts, as arrays for `unnest`.
#[derive(Default)]
struct FailureRows {
    ids: Vec<uuid::Uuid>,
    auth0_ids: Vec<Option<String>>,
    github_ids: Vec<Option<String>>,
    reasons: Vec<String>,
    at: Vec<DateTime<Utc>>,
    duplicates: Vec<Option<uuid::Uuid>>,
    positions: Vec<Position>,
}

impl FailureRows {
    fn push(&mut self, event: &RecordedEvent, failed: &UserRegistrationFailed) {
        let personal = failed.personal.as_ref();
        self.ids.push(event.aggregate_id);
        self.auth0_ids.push(personal.map(|p| p.auth0_id.to_string()));
        self.github_ids.push(personal.map(|p| p.github_id.to_string()));
        self.reasons.push(refusal_name(failed));
        self.at.push(failed.attempted_at);
        self.duplicates.push(failed.duplicate_user_id.map(|id| id.as_uuid()));
        self.positions.push(event.position);
    }

    /// One insert for all the rows (none: nothing to do).
    async fn insert(&self, conn: &mut PgConnection, generation: i32, existing: Existing) -> Result<(), ApplyError> {
        macro_rules! insert {
            () => {
                "INSERT INTO registration_failures_rows (generation, audit_id, auth0_id, github_id, \
                 reason, attempted_at, duplicate_user_id, position) \
                 SELECT $1, f.id, f.auth0_id, f.github_id, f.reason, f.at, f.duplicate, f.position \
                 FROM unnest($2::uuid[], $3::varchar[], $4::varchar[], $5::varchar[], $6::timestamptz[], \
                             $7::uuid[], $8::bigint[]) AS f(id, auth0_id, github_id, reason, at, duplicate, position)"
            };
        }
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(match existing {
            Existing::Skip => concat!(insert!(), " ON CONFLICT (generation, audit_id) DO NOTHING"),
            Existing::Fail => insert!(),
        })
        .bind(generation)
        .bind(&self.ids)
        .bind(&self.auth0_ids)
        .bind(&self.github_ids)
        .bind(&self.reasons)
        .bind(&self.at)
        .bind(&self.duplicates)
        .bind(&self.positions)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// The refusal's name as the read model stores it (`DUPLICATE_AUTH0_ID`).
fn refusal_name(failed: &UserRegistrationFailed) -> String {
    serde_json::to_value(failed.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", failed.reason))
}

async fn user_registered(
    conn: &mut PgConnection,
    generation: i32,
    event: &RecordedEvent,
    registered: &UserRegistered,
) -> Result<(), ApplyError> {
    let mut rows = UserRows::default();
    rows.push(event, registered);
    rows.insert(conn, generation, Existing::Skip).await
}

async fn profile_updated(
    conn: &mut PgConnection,
    generation: i32,
    event: &RecordedEvent,
    updated: &UserProfileUpdated,
) -> Result<(), ApplyError> {
    let changes = updated.personal.clone().unwrap_or_default();
    let changed = sqlx::query(
        "UPDATE users_read_rows SET github_username = coalesce($4, github_username), \
         display_name = coalesce($5, display_name), avatar_url = coalesce($6, avatar_url), \
         updated_at = $7, version = $3, position = $8, \
         login_position = CASE WHEN $4::varchar IS NULL THEN login_position ELSE $8 END \
         WHERE generation = $1 AND id = $2 AND version = $3 - 1 AND status <> 'erased'",
    )
    .bind(generation)
    .bind(event.aggregate_id)
    .bind(event.version)
    .bind(&changes.github_username)
    .bind(&changes.display_name)
    .bind(&changes.avatar_url)
    .bind(updated.updated_at)
    .bind(event.position)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    next_version_applied(conn, generation, event, changed).await
}

/// Whether an update that matched `changed` rows is applied: it was (now, or already on a redelivery), or its
/// predecessor is missing (never in position order).
async fn next_version_applied(
    conn: &mut PgConnection,
    generation: i32,
    event: &RecordedEvent,
    changed: u64,
) -> Result<(), ApplyError> {
    let version = event.version;
    if changed == 1 {
        return Ok(());
    }
    // Not applied: either it already was (redelivery) or its predecessor is missing (never in position order).
    let current: Option<Version> =
        sqlx::query_scalar("SELECT version FROM users_read_rows WHERE generation = $1 AND id = $2")
            .bind(generation)
            .bind(event.aggregate_id)
            .fetch_optional(conn)
            .await?;
    match current {
        Some(current) if current >= version => Ok(()),
        _ => Err(ApplyError::MissingPredecessor(event.aggregate_id, event.version)),
    }
}

async fn registration_failed(
    conn: &mut PgConnection,
    generation: i32,
    event: &RecordedEvent,
    failed: &UserRegistrationFailed,
) -> Result<(), ApplyError> {
    let mut rows = FailureRows::default();
    rows.push(event, failed);
    rows.insert(conn, generation, Existing::Skip).await
}

async fn status_changed(
    conn: &mut PgConnection,
    generation: i32,
    event: &RecordedEvent,
    status: UserStatus,
    at: DateTime<Utc>,
) -> Result<(), ApplyError> {
    let changed = sqlx::query(
        "UPDATE users_read_rows SET status = $4, updated_at = $5, version = $3, position = $6 \
         WHERE generation = $1 AND id = $2 AND version = $3 - 1 AND status <> 'erased'",
    )
    .bind(generation)
    .bind(event.aggregate_id)
    .bind(event.version)
    .bind(status.as_str())
    .bind(at)
    .bind(event.position)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    next_version_applied(conn, generation, event, changed).await
}

/// The person is erased: their row keeps only the id, status and bookkeeping, and their refused attempts lose
/// their identities, in every generation of the read models (the one this step writes, and any other: a rebuild's
/// half-filled one, which a killed rebuild may have left behind).
///
/// Unlike every other update, the scrub depends on no earlier row: it applies whatever version the row is at, and
/// moves the row to the erasure's version, so that the user's earlier events, should they be applied later (a
/// dead letter replayed, a rebuild catching up), count as applied already and bring nothing back.
async fn erased(conn: &mut PgConnection, event: &RecordedEvent, at: DateTime<Utc>) -> Result<(), ApplyError> {
    sqlx::query(
        "UPDATE users_read_rows SET status = 'erased', auth0_id = NULL, github_id = NULL, github_username = NULL, \
         display_name = NULL, avatar_url = NULL, updated_at = greatest(updated_at, $3), \
         version = greatest(version, $2), position = greatest(position, $4) \
         WHERE id = $1",
    )
    .bind(event.aggregate_id)
    .bind(event.version)
    .bind(at)
    .bind(event.position)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE registration_failures_rows SET auth0_id = NULL, github_id = NULL \
         WHERE duplicate_user_id = $1 AND (auth0_id IS NOT NULL OR github_id IS NOT NULL)",
    )
    .bind(event.aggregate_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Whether an event is an erasure, which applies even while its aggregate is parked (see [`erased`]).
pub(crate) fn is_erasure(event: &RecordedEvent) -> bool {
    event.aggregate_type == UserEvent::AGGREGATE_TYPE && event.event_type == UserErased::EVENT_TYPE
}
