//! Named checkpoints of followers of the log (the relay): the position at or below which everything is handled.

use crate::EventStore;
use crate::error::StoreError;
use crate::types::Position;

impl EventStore {
    /// The checkpoint saved under `name`, or [`Position::ZERO`] when there is none.
    pub async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError> {
        let position: Option<Position> = sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(position.unwrap_or(Position::ZERO))
    }

    /// Saves a checkpoint. It only moves forward: a stale writer (a leader that lost its lock) cannot move it back.
    pub async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now() \
             WHERE checkpoints.position < excluded.position",
        )
        .bind(name)
        .bind(position)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
