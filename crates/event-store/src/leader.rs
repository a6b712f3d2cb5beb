//! Electing one leader among processes that follow the log for the same purpose (the relay of one stream): a
//! PostgreSQL session advisory lock, held on a dedicated connection, keyed by the purpose's name. The lock lives
//! exactly as long as that connection: a leader whose connection dies has lost it, and another process can take
//! over at once.

use sqlx::{Connection, PgConnection};

use crate::EventStore;
use crate::error::StoreError;

/// A dedicated connection that can hold the leader lock of `name`.
pub struct LeaderLock {
    connection: PgConnection,
    name: String,
}

/// The advisory lock key of a name: 64 bits of PostgreSQL's own hash of it, so that every process agrees.
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))";
const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";

impl EventStore {
    /// Opens the connection that will hold the leader lock of `name` (not taken yet).
    pub async fn leader_lock(&self, name: &str) -> Result<LeaderLock, StoreError> {
        let options = (*self.pool.connect_options()).clone();
        let connection = PgConnection::connect_with(&options).await?;
        Ok(LeaderLock { connection, name: name.to_owned() })
    }
}

impl LeaderLock {
    /// Takes the lock if nobody holds it; true when this connection holds it now.
    pub async fn try_acquire(&mut self) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(TRY_LOCK).bind(&self.name).fetch_one(&mut self.connection).await?)
    }

    /// Fails when the lock's connection is gone, in which case another process may already lead.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&mut self.connection).await?;
        Ok(())
    }

    /// Gives the lock up and closes its connection (closing alone would release it too).
    pub async fn release(mut self) {
        let _ = sqlx::query(UNLOCK).bind(&self.name).execute(&mut self.connection).await;
        let _ = self.connection.close().await;
    }
}
