//! The data keys of the people whose personal fields the log holds sealed, stored wrapped by a master key (the
//! vault does the cryptography; this is only their storage), and what an erasure does in its transaction.

use std::collections::HashMap;

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::error::StoreError;
use crate::types::{Erasure, StoredKey, WrappedKey};
use crate::{EventStore, RecordedEvent};

impl EventStore {
    /// The keys stored for `owners` (absent: none was ever made).
    pub async fn keys(&self, owners: &[Uuid]) -> Result<HashMap<Uuid, StoredKey>, StoreError> {
        if owners.is_empty() {
            return Ok(HashMap::new());
        }
        // Planned for each call, with its array in hand (not a prepared statement): a connection's cached generic
        // plan, made while `data_keys` was small, scans the whole table and compares every row with every owner
        // asked for; measured with `cargo bench --bench watch`, a replay's 500 owners against 60,000 keys took
        // 120 ms per read that way instead of 1.5 ms through the primary key.
        let rows = sqlx::query("SELECT owner_id, master_key_id, wrapped FROM data_keys WHERE owner_id = ANY($1)")
            .bind(owners)
            .persistent(false)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let owner: Uuid = row.try_get("owner_id")?;
                let key = match (row.try_get::<Option<String>, _>("master_key_id")?, row.try_get("wrapped")?) {
                    (Some(master_key_id), Some(wrapped)) => {
                        StoredKey::Live(WrappedKey { owner, master_key_id, wrapped })
                    }
                    _ => StoredKey::Destroyed,
                };
                Ok((owner, key))
            })
            .collect()
    }

    /// Records `id` as the master key that wraps new data keys from now on (a rotation).
    pub async fn record_current_master_key(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO master_keys (id, current_since) VALUES ($1, now()) \
             ON CONFLICT (id) DO UPDATE SET current_since = coalesce(master_keys.current_since, now())",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks master key `id` retired, unless a live data key is still wrapped by it: then nothing changes and the
    /// count of those keys is returned. Data keys are held still meanwhile (`SHARE` on the table), so that none is
    /// wrapped by it between the count and the mark.
    pub async fn retire_master_key(&self, id: &str) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE data_keys IN SHARE MODE").execute(&mut *tx).await?;
        let needing: i64 =
            sqlx::query_scalar("SELECT count(*) FROM data_keys WHERE master_key_id = $1 AND wrapped IS NOT NULL")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        if needing > 0 {
            tx.rollback().await?;
            return Ok(u64::try_from(needing).unwrap_or(u64::MAX));
        }
        sqlx::query(
            "INSERT INTO master_keys (id, retired_at) VALUES ($1, now()) \
             ON CONFLICT (id) DO UPDATE SET retired_at = coalesce(master_keys.retired_at, now())",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(0)
    }

    /// Those of `ids` that are retired.
    pub async fn retired_master_keys(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT id FROM master_keys WHERE id = ANY($1) AND retired_at IS NOT NULL")
            .bind(ids)
            .fetch_all(&self.pool)
            .await?)
    }

    /// How many live data keys each master key wraps.
    pub async fn keys_by_master_key(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT master_key_id, count(*) FROM data_keys WHERE wrapped IS NOT NULL GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Up to `limit` live data keys: the newest few (the likeliest to be wrapped by a master key just rotated in)
    /// and some from a random place of the table, each read through the primary key's order.
    pub async fn sample_keys(&self, limit: i64) -> Result<Vec<WrappedKey>, StoreError> {
        let rows = sqlx::query(
            "(SELECT owner_id, master_key_id, wrapped FROM data_keys WHERE wrapped IS NOT NULL \
              ORDER BY created_at DESC LIMIT $1) \
             UNION \
             (SELECT owner_id, master_key_id, wrapped FROM data_keys WHERE wrapped IS NOT NULL \
              AND owner_id >= gen_random_uuid() ORDER BY owner_id LIMIT $1)",
        )
        .bind(limit / 2)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(WrappedKey {
                    owner: row.try_get("owner_id")?,
                    master_key_id: row.try_get("master_key_id")?,
                    wrapped: row.try_get("wrapped")?,
                })
            })
            .collect()
    }

    /// Stores `key` unless its owner already has one (or a tombstone), and returns what the owner has now: the
    /// first of two concurrent callers wins, and both then seal under the winner's key.
    pub async fn create_key(&self, key: &WrappedKey) -> Result<StoredKey, StoreError> {
        sqlx::query(
            "INSERT INTO data_keys (owner_id, master_key_id, wrapped) VALUES ($1, $2, $3) \
             ON CONFLICT (owner_id) DO NOTHING",
        )
        .bind(key.owner)
        .bind(&key.master_key_id)
        .bind(&key.wrapped)
        .execute(&self.pool)
        .await?;
        self.keys(&[key.owner]).await?.remove(&key.owner).ok_or_else(|| StoreError::Corrupt {
            table: "data_keys",
            detail: "a key vanished right after it was stored".to_owned(),
        })
    }

    /// The development master key the migrations keep in the database (see `KIROKU_DEV_MASTER_KEY_IN_DATABASE`).
    pub async fn development_master_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query_scalar("SELECT key FROM database_master_key WHERE id = 1").fetch_optional(&self.pool).await?)
    }

    /// Stores live keys wrapped anew (a master key rotation), each only if it is still live and unchanged.
    pub async fn rewrap_keys(&self, rewrapped: &[(WrappedKey, WrappedKey)]) -> Result<u64, StoreError> {
        let mut changed = 0;
        for (old, new) in rewrapped {
            changed += sqlx::query(
                "UPDATE data_keys SET master_key_id = $3, wrapped = $4 \
                 WHERE owner_id = $1 AND wrapped = $2 AND destroyed_at IS NULL",
            )
            .bind(old.owner)
            .bind(&old.wrapped)
            .bind(&new.master_key_id)
            .bind(&new.wrapped)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(changed)
    }

    /// Up to `limit` live keys not wrapped by `master_key_id`, for a rotation.
    pub async fn keys_not_wrapped_by(&self, master_key_id: &str, limit: i64) -> Result<Vec<WrappedKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT owner_id, master_key_id, wrapped FROM data_keys \
             WHERE destroyed_at IS NULL AND master_key_id <> $1 LIMIT $2",
        )
        .bind(master_key_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(WrappedKey {
                    owner: row.try_get("owner_id")?,
                    master_key_id: row.try_get("master_key_id")?,
                    wrapped: row.try_get("wrapped")?,
                })
            })
            .collect()
    }

    /// The refused registrations (audit events) that name `owner` as the user holding the identity.
    pub async fn refusals_naming(&self, owner: Uuid) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(crate::read::READ_REFUSALS_NAMING).bind(owner.to_string()).fetch_all(&self.pool).await?;
        rows.iter().map(crate::read::decode).collect()
    }

    /// Replaces claim values written in clear (before keyed hashes) by `hash(kind, value)`, a thousand per
    /// statement; hashed values start with `hashed_prefix`. A clear claim whose hash some aggregate holds already
    /// (the same identity registered twice, by kiroku versions on either side of keyed hashes) is left as it is
    /// and reported, never a failure: a start-up that failed on it would fail again at every restart.
    pub async fn hash_clear_claims(
        &self,
        hashed_prefix: &str,
        hash: impl Fn(&str, &str) -> String,
    ) -> Result<ClearClaims, StoreError> {
        let mut report = ClearClaims::default();
        // Keyset order, so that a claim left in clear is passed once and the pass ends.
        let (mut last_kind, mut last_value) = (String::new(), String::new());
        loop {
            let clear: Vec<(String, String, Uuid)> = sqlx::query_as(
                "SELECT kind, value, owner_id FROM claims WHERE left(value, length($1)) <> $1 \
                 AND (kind, value) > ($2, $3) ORDER BY kind, value LIMIT 1000",
            )
            .bind(hashed_prefix)
            .bind(&last_kind)
            .bind(&last_value)
            .fetch_all(&self.pool)
            .await?;
            let Some((kind, value, _)) = clear.last() else { return Ok(report) };
            (last_kind, last_value) = (kind.clone(), value.clone());
            let kinds: Vec<&str> = clear.iter().map(|(k, _, _)| k.as_str()).collect();
            let values: Vec<&str> = clear.iter().map(|(_, v, _)| v.as_str()).collect();
            let hashed: Vec<String> = clear.iter().map(|(k, v, _)| hash(k, v)).collect();
            let rehashed: Vec<(String, String)> = sqlx::query_as(
                "UPDATE claims c SET value = u.hashed \
                 FROM unnest($1::varchar[], $2::varchar[], $3::varchar[]) AS u(kind, value, hashed) \
                 WHERE c.kind = u.kind AND c.value = u.value \
                 AND NOT EXISTS (SELECT 1 FROM claims h WHERE h.kind = u.kind AND h.value = u.hashed) \
                 RETURNING u.kind, u.value",
            )
            .bind(&kinds)
            .bind(&values)
            .bind(&hashed)
            .fetch_all(&self.pool)
            .await?;
            report.hashed += rehashed.len() as u64;
            for ((kind, value, owner), hashed) in clear.iter().zip(&hashed) {
                if rehashed.iter().any(|(k, v)| k == kind && v == value) {
                    continue;
                }
                let holder = self.claim_owner(&crate::Claim { kind: kind.clone(), value: hashed.clone() }).await?;
                if let Some(hashed_owner) = holder {
                    report.duplicates.push(ClearDuplicate { kind: kind.clone(), clear_owner: *owner, hashed_owner });
                }
            }
        }
    }
}

/// What [`EventStore::hash_clear_claims`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClearClaims {
    pub hashed: u64,
    /// Claims left in clear: their identity's hash is held already.
    pub duplicates: Vec<ClearDuplicate>,
}

/// A claim in clear whose keyed hash another claim holds: one identity, two owners (or one owner, twice). Names
/// no identity, only the owners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClearDuplicate {
    pub kind: String,
    pub clear_owner: Uuid,
    pub hashed_owner: Uuid,
}

impl EventStore {
    /// Replaces the callers of idempotency records written before keyed hashes (`<rpc>:github|<id>`, a person's
    /// subject in clear) by `hash(caller)`, a thousand per statement; returns how many changed. A record whose
    /// hashed key exists already (answered twice, across versions) is left, to be pruned with its age.
    pub async fn hash_clear_idempotency_callers(&self, hash: impl Fn(&str) -> String) -> Result<u64, StoreError> {
        let mut changed = 0;
        let (mut last_caller, mut last_request) = (String::new(), String::new());
        loop {
            let clear: Vec<(String, String)> = sqlx::query_as(
                "SELECT caller, request_id FROM idempotency_records WHERE caller LIKE '%:github|%' \
                 AND (caller, request_id) > ($1, $2) ORDER BY caller, request_id LIMIT 1000",
            )
            .bind(&last_caller)
            .bind(&last_request)
            .fetch_all(&self.pool)
            .await?;
            let Some((caller, request)) = clear.last() else { return Ok(changed) };
            (last_caller, last_request) = (caller.clone(), request.clone());
            let callers: Vec<&str> = clear.iter().map(|(c, _)| c.as_str()).collect();
            let requests: Vec<&str> = clear.iter().map(|(_, r)| r.as_str()).collect();
            let hashed: Vec<String> = clear.iter().map(|(c, _)| hash(c)).collect();
            changed += sqlx::query(
                "UPDATE idempotency_records i SET caller = u.hashed \
                 FROM unnest($1::varchar[], $2::varchar[], $3::varchar[]) AS u(caller, request_id, hashed) \
                 WHERE i.caller = u.caller AND i.request_id = u.request_id \
                 AND NOT EXISTS (SELECT 1 FROM idempotency_records h \
                                 WHERE h.caller = u.hashed AND h.request_id = u.request_id)",
            )
            .bind(&callers)
            .bind(&requests)
            .bind(&hashed)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
    }
}

/// An erasure's writes, inside its append's transaction.
pub(crate) async fn erase(tx: &mut PgConnection, erasure: &Erasure) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO data_keys (owner_id, master_key_id, wrapped, destroyed_at) VALUES ($1, NULL, NULL, now()) \
         ON CONFLICT (owner_id) DO UPDATE SET master_key_id = NULL, wrapped = NULL, \
         destroyed_at = coalesce(data_keys.destroyed_at, now())",
    )
    .bind(erasure.owner)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM claims WHERE owner_id = $1").bind(erasure.owner).execute(&mut *tx).await?;
    if !erasure.forget_callers.is_empty() {
        sqlx::query(
            "DELETE FROM idempotency_records WHERE outcome ->> 'user_id' = $1 \
             AND EXISTS (SELECT 1 FROM unnest($2::text[]) AS p(prefix) WHERE starts_with(caller, p.prefix))",
        )
        .bind(erasure.owner.to_string())
        .bind(&erasure.forget_callers)
        .execute(&mut *tx)
        .await?;
    }
    if !erasure.redactions.is_empty() {
        let positions: Vec<i64> =
            erasure.redactions.iter().map(|(p, _)| i64::try_from(p.get()).unwrap_or(i64::MAX)).collect();
        let payloads: Vec<&serde_json::Value> = erasure.redactions.iter().map(|(_, d)| d).collect();
        sqlx::query("SELECT kiroku_redact_events($1::bigint[], $2::jsonb[])")
            .bind(&positions)
            .bind(&payloads)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}
