//! Reading the read models (through the views that show the active generation) and the projection's checkpoint.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kiroku::v1::{RegistrationFailure, User, UserStatus};
use kiroku_event_store::{Position, Version};
use kiroku_platform::Shutdown;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::QueryError;
use crate::paging::UserFilter;
use crate::wire::timestamp;

/// The channel on which projectors announce that a checkpoint moved (after the step's commit).
const PROJECTIONS_CHANNEL: &str = "kiroku_projections";

/// `SELECT <the user columns> FROM users_read <rest>`, as one static string.
macro_rules! select_users {
    ($rest:literal) => {
        concat!(
            "SELECT id, auth0_id, github_id, github_username, display_name, avatar_url, status, created_at, \
             updated_at, version, registered_position FROM users_read ",
            $rest
        )
    };
}

#[derive(Clone)]
pub(crate) struct ReadModels {
    pool: PgPool,
    /// Ticks when a projector announces that a checkpoint moved (see [`ReadModels::listen`]).
    moved: watch::Receiver<u64>,
    /// Kept here so that the channel stays open whatever the listener does: waiters then fall back to their
    /// 250 ms look rather than spin on a closed channel.
    _tick: std::sync::Arc<watch::Sender<u64>>,
}

/// A user lookup key.
pub(crate) enum UserKey<'a> {
    Id(Uuid),
    Auth0Id(&'a str),
    GitHubId(&'a str),
    GitHubUsername(&'a str),
}

impl ReadModels {
    /// The read models, and a task that listens for the projectors' checkpoint announcements until shutdown.
    pub(crate) async fn listen(pool: PgPool, shutdown: Shutdown) -> ReadModels {
        let (tick, moved) = watch::channel(0);
        let tick = std::sync::Arc::new(tick);
        let ticking = tick.clone();
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(PROJECTIONS_CHANNEL).await {
                Ok(()) => {
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                () = shutdown.wait() => return,
                                notification = listener.recv() => match notification {
                                    Ok(_) => ticking.send_modify(|n| *n += 1),
                                    // Reconnects on the next recv; waiters poll meanwhile.
                                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                                },
                            }
                        }
                    });
                }
                Err(error) => tracing::warn!(%error, "cannot LISTEN for checkpoints; GetUser polls"),
            },
            Err(error) => tracing::warn!(%error, "cannot LISTEN for checkpoints; GetUser polls"),
        }
        ReadModels { pool, moved, _tick: tick }
    }

    pub(crate) async fn user(&self, key: UserKey<'_>) -> Result<Option<User>, QueryError> {
        let query = match key {
            UserKey::Id(id) => sqlx::query(select_users!("WHERE id = $1")).bind(id),
            UserKey::Auth0Id(value) => sqlx::query(select_users!("WHERE auth0_id = $1")).bind(value.to_owned()),
            UserKey::GitHubId(value) => sqlx::query(select_users!("WHERE github_id = $1")).bind(value.to_owned()),
            // GitHub recycles logins: of the users whose row shows it (one may not have synced since they renamed),
            // the one who took it last holds it now. Compared as ListUsers' filter compares (`lower` on both sides).
            UserKey::GitHubUsername(value) => sqlx::query(select_users!(
                "WHERE lower(github_username) = lower($1) ORDER BY login_position DESC LIMIT 1"
            ))
            .bind(value.to_owned()),
        };
        let row = query.fetch_optional(&self.pool).await?;
        row.as_ref().map(user).transpose()
    }

    /// One page of users in registration order (the position of their `UserRegistered`), after the one
    /// registered at `after`, at most `limit`, each with its registration position (the next page's cursor).
    ///
    /// Log order, not id order: ids are made before the GitHub call, so a user committed later can have a smaller
    /// id and would land behind a client's cursor. The read model holds a user only once every position below
    /// its own is applied, so nothing can appear behind a position cursor.
    pub(crate) async fn users(
        &self,
        filter: &UserFilter,
        after: Option<Position>,
        limit: i64,
    ) -> Result<Vec<(User, Position)>, QueryError> {
        let rows = sqlx::query(select_users!(
            "WHERE ($1::bigint IS NULL OR registered_position > $1) AND ($2::text IS NULL OR status = $2) \
             AND ($3::text IS NULL OR lower(github_username) LIKE lower($3)) ORDER BY registered_position LIMIT $4"
        ))
        .bind(after)
        .bind(filter.status)
        .bind(filter.login_pattern())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok((user(row)?, row.try_get::<Position, _>("registered_position")?))).collect()
    }

    /// Refused registrations, newest first, before position `before`.
    pub(crate) async fn failures(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RegistrationFailure>, QueryError> {
        let rows = sqlx::query(
            "SELECT audit_id, auth0_id, github_id, reason, attempted_at, duplicate_user_id, position \
             FROM registration_failures_read WHERE ($1::bigint IS NULL OR position < $1) \
             ORDER BY position DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RegistrationFailure {
                    audit_id: row.try_get::<Uuid, _>("audit_id")?.to_string(),
                    // The attempts of an erased person keep no identity (NULL).
                    auth0_id: row.try_get::<Option<String>, _>("auth0_id")?.unwrap_or_default(),
                    github_id: row.try_get::<Option<String>, _>("github_id")?.unwrap_or_default(),
                    reason: row.try_get("reason")?,
                    attempted_at: Some(timestamp(row.try_get("attempted_at")?)),
                    duplicate_user_id: row
                        .try_get::<Option<Uuid>, _>("duplicate_user_id")?
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                    position: row.try_get::<Position, _>("position")?.get(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(QueryError::from)
    }

    /// The active generation's checkpoint: every event at or below it is in the read model.
    pub(crate) async fn checkpoint(&self) -> Result<Position, QueryError> {
        let position: Position = sqlx::query_scalar(
            "SELECT c.position FROM projections p JOIN projection_checkpoints c \
             ON c.projection = p.name AND c.generation = p.active_generation WHERE p.name = 'users'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(position)
    }

    /// Waits until the read model has reached `position`, or `patience` has passed: woken by the projectors'
    /// announcements, and looking every 250 ms in case one is lost.
    pub(crate) async fn wait_for(&self, position: Position, patience: Duration) -> Result<(), QueryError> {
        let deadline = Instant::now() + patience;
        let mut moved = self.moved.clone();
        loop {
            moved.mark_unchanged();
            if self.checkpoint().await? >= position {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QueryError::ProjectionBehind(position.get()));
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), moved.changed()).await;
        }
    }
}

/// A status as the read model stores it (`UserStatus::as_str`), on the wire.
pub(crate) fn status_of(stored: &str) -> UserStatus {
    match stored {
        "active" => UserStatus::Active,
        "deactivated" => UserStatus::Deactivated,
        "erased" => UserStatus::Erased,
        _ => UserStatus::Unspecified,
    }
}

fn user(row: &PgRow) -> Result<User, QueryError> {
    let status: String = row.try_get("status")?;
    let created: DateTime<Utc> = row.try_get("created_at")?;
    let updated: DateTime<Utc> = row.try_get("updated_at")?;
    Ok(User {
        user_id: row.try_get::<Uuid, _>("id")?.to_string(),
        // An erased user's personal columns are empty (NULL).
        auth0_id: row.try_get::<Option<String>, _>("auth0_id")?.unwrap_or_default(),
        github_id: row.try_get::<Option<String>, _>("github_id")?.unwrap_or_default(),
        github_username: row.try_get::<Option<String>, _>("github_username")?.unwrap_or_default(),
        display_name: row.try_get::<Option<String>, _>("display_name")?.unwrap_or_default(),
        avatar_url: row.try_get::<Option<String>, _>("avatar_url")?.unwrap_or_default(),
        status: status_of(&status) as i32,
        erased: status == "erased",
        created_at: Some(timestamp(created)),
        updated_at: Some(timestamp(updated)),
        version: u64::from(row.try_get::<Version, _>("version")?),
    })
}
