//! Applies `migrations/`, the only place DDL lives. Running it twice is a no-op; concurrent runs serialise on
//! sqlx's advisory lock.

use sqlx::PgPool;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
