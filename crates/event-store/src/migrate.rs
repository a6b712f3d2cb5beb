//! Applies `migrations/`, the only place DDL lives. Running it twice is a no-op; concurrent runs serialise on
//! sqlx's advisory lock.

use sqlx::PgPool;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The role prefix of a deployment that does not set one: the roles the migrations create.
pub const DEFAULT_ROLE_PREFIX: &str = "kiroku";

/// Applies every pending migration, for the default roles (`kiroku_command`, …).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrate_with_roles(pool, DEFAULT_ROLE_PREFIX).await
}

/// Applies every pending migration, then gives this database's privileges to the deployment's roles
/// (`<prefix>_command`, `<prefix>_query`, `<prefix>_projector`; see `kiroku_apply_role_prefix`), one migrator at a
/// time (concurrent GRANTs on one object can fail).
pub async fn migrate_with_roles(pool: &PgPool, prefix: &str) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('kiroku roles', 0))").execute(&mut *tx).await?;
    sqlx::query("SELECT kiroku_apply_role_prefix($1)").bind(prefix).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}
