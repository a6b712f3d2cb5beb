//! Erasure beyond the live database. A backup taken before an erasure still holds the person's data key, wrapped
//! by a master key that may still exist: restored, it would open their data again. Two things close that:
//!
//! - the erasure ledger (`KIROKU_ERASURE_LEDGER`): a file kept outside the database and its backups, to which every
//!   erasure appends one line (user id, position, time; nothing personal) once it has committed, and again when a
//!   retry is answered, so that a line a failed write lost comes with the retry. Lines may repeat; readers take
//!   each user once;
//! - `kiroku erasure reapply`: after a restore, it erases again everyone the ledger names whom the restored
//!   database still holds readable, exactly as EraseUser does.
//!
//! Master-key retirement (`kiroku keys retire`) makes backups older than the retired key unreadable as a whole.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use kiroku_domain::UserId;
use kiroku_event_store::{EventStore, Position};
use kiroku_vault::Vault;
use serde::{Deserialize, Serialize};

use crate::commands::Call;
use crate::erase_user::erase;
use crate::error::CommandError;
use crate::pipeline::Pipeline;

/// The ledger of erasures (see the module's comment).
#[derive(Debug)]
pub struct ErasureLedger {
    path: PathBuf,
    /// One writer at a time in this process (appends from several processes are whole lines: `O_APPEND`).
    writing: tokio::sync::Mutex<()>,
}

/// One line of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLine {
    pub user_id: UserId,
    pub position: u64,
    pub erased_at: DateTime<Utc>,
}

impl ErasureLedger {
    pub fn new(path: PathBuf) -> Self {
        ErasureLedger { path, writing: tokio::sync::Mutex::new(()) }
    }

    /// Appends the erasure of `user_id` at `position`, and waits until it is on disk.
    pub(crate) async fn record(&self, user_id: UserId, position: Position) -> Result<(), CommandError> {
        let line = LedgerLine { user_id, position: position.get(), erased_at: Utc::now() };
        let mut text = serde_json::to_string(&line).map_err(|e| CommandError::Internal(e.into()))?;
        text.push('\n');
        let _writing = self.writing.lock().await;
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            file.write_all(text.as_bytes())?;
            file.sync_data()
        })
        .await
        .map_err(|e| CommandError::Internal(e.into()))?;
        written.map_err(|error| {
            tracing::error!(%error, %user_id, "the erasure committed, but its ledger line could not be written");
            CommandError::LedgerUnavailable
        })
    }
}

/// The users a ledger names, each once, in the order of their first line. A line that does not parse is an
/// error naming its number (never its text, which could be anything).
pub fn read_ledger(path: &Path) -> anyhow::Result<Vec<UserId>> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| anyhow::anyhow!("read the erasure ledger {}: {error}", path.display()))?;
    let mut seen = HashSet::new();
    let mut users = Vec::new();
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let line: LedgerLine = serde_json::from_str(line)
            .map_err(|_| anyhow::anyhow!("line {} of the erasure ledger is not an erasure", number + 1))?;
        if seen.insert(line.user_id) {
            users.push(line.user_id);
        }
    }
    Ok(users)
}

/// What `kiroku erasure reapply` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reapplied {
    /// Erased now: the restored database still held them readable.
    pub erased: Vec<UserId>,
    /// Erased already in the restored database.
    pub already_erased: usize,
    /// Not in the restored database (registered after the backup).
    pub unknown: usize,
}

/// Erases again, in the database `store` reads (restored from a backup), everyone the ledger at `path` names who
/// is still readable there.
pub async fn reapply(store: &EventStore, vault: &Vault, path: &Path) -> anyhow::Result<Reapplied> {
    let mut reapplied = Reapplied::default();
    let index = vault.blind_index().await?;
    let pipeline = Pipeline { store, vault, index: &index };
    for user_id in read_ledger(path)? {
        // No request id: nothing is stored for a retry, and an erased person is refused as erased.
        let call = Call::new(None, Some(format!("erasure-reapply:{user_id}")), None);
        match erase(pipeline, user_id, "erasure-reapply".to_owned(), &call).await {
            Ok(_) => reapplied.erased.push(user_id),
            Err(CommandError::Refused(kiroku_domain::UserError::Erased)) => reapplied.already_erased += 1,
            Err(CommandError::UserNotFound) => reapplied.unknown += 1,
            Err(error) => anyhow::bail!("erase {user_id} again: {error}"),
        }
    }
    Ok(reapplied)
}
