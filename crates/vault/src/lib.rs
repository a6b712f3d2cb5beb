//! Personal data in an immutable log: crypto-shredding.
//!
//! Every person has a data key (AES-256-GCM) of their own, stored in the event store wrapped by the master key
//! (`KIROKU_MASTER_KEY`). The `personal` member of every payload (see `kiroku_domain::upcast`) is stored sealed
//! under its person's key, as `sealed`; readers open it while the key exists. Erasing a person destroys their key:
//! every copy of their personal fields (the log, the Redis stream, dead letters) becomes ciphertext nobody can
//! open, and readers show those events with `personal` absent and `"erased": true`. Identities that must stay
//! unique (claims) and idempotency keys are stored as keyed hashes ([`BlindIndex`]), never in clear.
//!
//! Master keys have ids (a digest of the key), stored with every wrapped key, so a master key can rotate:
//! `KIROKU_MASTER_KEY` wraps new keys, `KIROKU_PREVIOUS_MASTER_KEYS` still unwrap old ones, and
//! [`Vault::rewrap`] moves every key to the current master key.

mod crypto;
mod master;

pub use crypto::{BlindIndex, DataKey};
pub use master::{MasterKeys, generate_master_key};

use std::collections::HashMap;
use std::sync::Arc;

use kiroku_domain::{ERASED, PERSONAL, upcast};
use kiroku_event_store::{EventStore, NewEvent, RecordedEvent, StoreError, StoredKey, WrappedKey};
use kiroku_platform::config::{self, ConfigError, Source};
use serde_json::Value;
use uuid::Uuid;

/// The member that holds a sealed `personal` in the log.
pub const SEALED: &str = "sealed";

/// The owner of the blind index's key in `data_keys` (no user has the nil UUID).
const INDEX_KEY_OWNER: Uuid = Uuid::nil();

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A key is wrapped by a master key this process was not given: a configuration error, never data loss.
    #[error("a data key is wrapped by master key {0}, which is neither KIROKU_MASTER_KEY nor a previous one")]
    UnknownMasterKey(String),
    /// A sealed member or a wrapped key that does not open with its key: tampering or corruption.
    #[error("{0}")]
    Corrupt(String),
    /// A master key given to this process was retired (`kiroku keys retire`): its material must go.
    #[error("master key {0} is retired: delete it from KIROKU_MASTER_KEY / KIROKU_PREVIOUS_MASTER_KEYS and destroy it")]
    Retired(String),
    /// The current master key cannot be retired.
    #[error("master key {0} is KIROKU_MASTER_KEY, the current one: make another current and rotate first")]
    Current(String),
    /// A master key cannot be retired while data keys are wrapped by it.
    #[error("master key {id} still wraps {keys} data keys: rotate first (`kiroku keys rotate`)")]
    StillNeeded { id: String, keys: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VaultError {
    /// See [`StoreError::is_transient`].
    pub fn is_transient(&self) -> bool {
        matches!(self, VaultError::Store(error) if error.is_transient())
    }
}

/// The key to seal a person's new events with.
pub enum SealingKey {
    Live(DataKey),
    /// The person was erased: nothing personal may be written about them again.
    Erased,
}

/// Seals and opens personal data; cheap to clone.
#[derive(Clone)]
pub struct Vault {
    store: EventStore,
    master: Arc<MasterKeys>,
}

/// The master keys from `KIROKU_MASTER_KEY` and `KIROKU_PREVIOUS_MASTER_KEYS`; a bad one is a [`ConfigError`]
/// naming the setting (never its value).
///
/// Without `KIROKU_MASTER_KEY`, and only with `KIROKU_DEV_MASTER_KEY_IN_DATABASE=true` (which `kiroku dev` sets)
/// and a database on this machine, the services share a key kept in the database ([`MasterKeys::in_database`]):
/// development only, since whoever reads the database (or a backup of it) can then open its personal data.
pub fn master_keys(source: &dyn Source) -> Result<Arc<MasterKeys>, ConfigError> {
    let Some(current) = config::MASTER_KEY.get(source) else {
        if !config::bool(source, &config::DEV_MASTER_KEY_IN_DATABASE)? {
            return Err(ConfigError::new(
                config::MASTER_KEY.name,
                "is required (`kiroku keys new` makes one; development alone may use \
                 KIROKU_DEV_MASTER_KEY_IN_DATABASE=true instead)",
            ));
        }
        let local = config::DATABASE_URL.get(source).is_some_and(|url| config::database_is_local(&url));
        if !local {
            return Err(ConfigError::new(
                config::DEV_MASTER_KEY_IN_DATABASE.name,
                "is for a database on this machine only; set KIROKU_MASTER_KEY",
            ));
        }
        return Ok(Arc::new(MasterKeys::in_database()));
    };
    let previous = config::PREVIOUS_MASTER_KEYS.get(source);
    MasterKeys::parse(&current, previous.as_deref())
        .map(Arc::new)
        .map_err(|problem| ConfigError::new(config::MASTER_KEY.name, problem))
}

impl Vault {
    pub fn new(store: EventStore, master: Arc<MasterKeys>) -> Self {
        Vault { store, master }
    }

    /// Checks that the master keys open the keys already stored (the blind index's key, and a sample of the
    /// people's): a service given the wrong master key, or not given one that a rotation half done still needs,
    /// stops at start-up instead of failing on every read.
    /// Without `KIROKU_MASTER_KEY`, it first loads (or, the first to start, makes) the key kept in the database.
    pub async fn check(&self) -> Result<(), VaultError> {
        if self.master.needs_loading() {
            let key = self.store.development_master_key().await?.ok_or_else(|| {
                VaultError::Corrupt("the database holds no development master key: apply the migrations".to_owned())
            })?;
            self.master.load(&key)?;
            // Once per process (`kiroku dev` runs three services in one).
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!(
                "KIROKU_DEV_MASTER_KEY_IN_DATABASE: personal data is sealed under a master key kept in the database, \
                 readable by whoever can read the database or a backup of it. Development only: set \
                 KIROKU_MASTER_KEY (`kiroku keys new`) anywhere else"
            ));
        }
        if let Some(retired) = self.store.retired_master_keys(&self.master.ids()?).await?.pop() {
            return Err(VaultError::Retired(retired));
        }
        if let Some(StoredKey::Live(wrapped)) = self.store.keys(&[INDEX_KEY_OWNER]).await?.remove(&INDEX_KEY_OWNER) {
            self.master.unwrap(&wrapped)?;
        }
        self.check_sample().await
    }

    /// The keyed hash of identities, its key made on first use.
    pub async fn blind_index(&self) -> Result<BlindIndex, VaultError> {
        match self.key_or_create(INDEX_KEY_OWNER).await? {
            SealingKey::Live(key) => Ok(BlindIndex::new(&key)),
            SealingKey::Erased => Err(VaultError::Corrupt("the blind index's key was destroyed".to_owned())),
        }
    }

    /// A fresh data key for a new person, and its wrapped form to store with their first events.
    pub fn new_key(&self, owner: Uuid) -> Result<(DataKey, WrappedKey), VaultError> {
        let key = DataKey::generate()?;
        let wrapped = self.master.wrap(owner, &key)?;
        Ok((key, wrapped))
    }

    /// The key to seal `owner`'s new events with: theirs, made now if they have none yet (a person registered
    /// before encryption), or [`SealingKey::Erased`].
    pub async fn key_or_create(&self, owner: Uuid) -> Result<SealingKey, VaultError> {
        let stored = match self.store.keys(&[owner]).await?.remove(&owner) {
            Some(stored) => stored,
            None => {
                let (_, wrapped) = self.new_key(owner)?;
                self.store.create_key(&wrapped).await?
            }
        };
        match stored {
            StoredKey::Live(wrapped) => Ok(SealingKey::Live(self.master.unwrap(&wrapped)?)),
            StoredKey::Destroyed => Ok(SealingKey::Erased),
        }
    }

    /// Seals the `personal` member of each event under `owner`'s key (or, for an erased person, drops it).
    pub fn seal(&self, owner: Uuid, key: &SealingKey, events: &mut [NewEvent]) -> Result<(), VaultError> {
        for event in events {
            let Value::Object(payload) = &mut event.data else { continue };
            let Some(personal) = payload.remove(PERSONAL) else { continue };
            match key {
                SealingKey::Live(key) => {
                    let sealed = key.seal(owner, &event.event_type, &personal)?;
                    payload.insert(SEALED.to_owned(), sealed);
                }
                SealingKey::Erased => {
                    payload.insert(ERASED.to_owned(), Value::Bool(true));
                }
            }
        }
        Ok(())
    }

    /// Events as today's schema reads them: `sealed` opened into `personal` while its key exists (else
    /// `"erased": true`), then upcast from the schema version that wrote them.
    pub async fn open(&self, mut events: Vec<RecordedEvent>) -> Result<Vec<RecordedEvent>, VaultError> {
        self.open_in_place(&mut events).await?;
        Ok(events)
    }

    /// [`Vault::open`] in place, all or nothing: on an error no event has changed, so a reader can keep the batch
    /// and try again without having copied it first.
    pub async fn open_in_place(&self, events: &mut [RecordedEvent]) -> Result<(), VaultError> {
        let personal = self.personal_of(events).await?;
        let personal: Vec<Option<Value>> = personal.into_iter().collect::<Result<_, _>>()?;
        for (event, personal) in events.iter_mut().zip(personal) {
            apply_opened(event, personal);
        }
        Ok(())
    }

    /// [`Vault::open_in_place`] for a reader that serves everyone (the projector, the live feed): an event whose
    /// person's data key does not unwrap (a corrupt row; a master key this process was not given, a rotation half
    /// done) is left as stored and listed, and every other event is opened. One bad key then stops one person's
    /// events, not everyone's. Only a failure of the store is an error. Counted in
    /// `kiroku_vault_unopenable_events_total`.
    pub async fn open_what_opens(&self, events: &mut [RecordedEvent]) -> Result<Vec<Unopened>, VaultError> {
        let personal = self.personal_of(events).await?;
        let mut unopened = Vec::new();
        for (event, personal) in events.iter_mut().zip(personal) {
            match personal {
                Ok(personal) => apply_opened(event, personal),
                Err(error) => unopened.push(Unopened {
                    position: event.position,
                    owner: crypto::sealed_owner(&event.data).unwrap_or_default(),
                    reason: format!("its personal data does not open: {error}"),
                }),
            }
        }
        if !unopened.is_empty() {
            metrics::counter!("kiroku_vault_unopenable_events_total").increment(unopened.len() as u64);
            tracing::error!(
                events = unopened.len(),
                reason = %unopened[0].reason,
                "events whose data key does not unwrap were set aside (the rest opened)"
            );
        }
        Ok(unopened)
    }

    /// The opened `personal` of each event (see [`open_personal`]), or why it does not open; a failure of the
    /// store fails the whole.
    async fn personal_of(
        &self,
        events: &[RecordedEvent],
    ) -> Result<Vec<Result<Option<Value>, VaultError>>, VaultError> {
        let owners: Vec<Uuid> = {
            let mut owners: Vec<Uuid> = events.iter().filter_map(|e| crypto::sealed_owner(&e.data)).collect();
            owners.sort_unstable();
            owners.dedup();
            owners
        };
        let stored = self.store.keys(&owners).await?;
        let mut keys: HashMap<Uuid, Result<Option<DataKey>, String>> = HashMap::with_capacity(stored.len());
        for (owner, key) in stored {
            let key = match key {
                StoredKey::Live(wrapped) => self.master.unwrap(&wrapped).map(Some).map_err(|e| e.to_string()),
                StoredKey::Destroyed => Ok(None),
            };
            keys.insert(owner, key);
        }
        Ok(events.iter().map(|e| open_personal(&keys, &e.event_type, &e.data)).collect())
    }

    /// Checks a sample of the stored data keys besides the blind index's (a master key that opens the index key
    /// but not the people's, after a rotation half done, would otherwise start and then fail on every read).
    ///
    /// A key wrapped by a master key this process lacks refuses the start; one wrapped by a master key it has that
    /// still does not unwrap is a corrupt row, one person's problem: it is logged, and readers set that person's
    /// events aside (see [`Vault::open_what_opens`]).
    async fn check_sample(&self) -> Result<(), VaultError> {
        for wrapped in self.store.sample_keys(CHECKED_KEYS).await? {
            match self.master.unwrap(&wrapped) {
                Ok(_) => {}
                Err(VaultError::Corrupt(why)) => {
                    tracing::error!(owner = %wrapped.owner, why, "a data key does not unwrap; its person's events will be set aside");
                }
                Err(other) => return Err(other),
            }
        }
        Ok(())
    }

    /// A rotation: every live data key wrapped under the current master key, which is recorded as current; then
    /// how many data keys each master key wraps (the old ones at zero may be retired).
    pub async fn rotate(&self) -> Result<(u64, Vec<(String, i64)>), VaultError> {
        let moved = self.rewrap().await?;
        self.store.record_current_master_key(self.master.current_id()?).await?;
        Ok((moved, self.store.keys_by_master_key().await?))
    }

    /// Retires master key `id` (see `kiroku keys retire`): refused for the current key, and while a data key is
    /// wrapped by it.
    pub async fn retire(&self, id: &str) -> Result<(), VaultError> {
        if id == self.master.current_id()? {
            return Err(VaultError::Current(id.to_owned()));
        }
        match self.store.retire_master_key(id).await? {
            0 => Ok(()),
            keys => Err(VaultError::StillNeeded { id: id.to_owned(), keys }),
        }
    }

    /// Wraps every live key under the current master key (after a rotation); returns how many moved.
    pub async fn rewrap(&self) -> Result<u64, VaultError> {
        let mut moved = 0;
        loop {
            let batch = self.store.keys_not_wrapped_by(self.master.current_id()?, 500).await?;
            if batch.is_empty() {
                return Ok(moved);
            }
            let mut pairs = Vec::with_capacity(batch.len());
            for old in batch {
                let key = self.master.unwrap(&old)?;
                let new = self.master.wrap(old.owner, &key)?;
                pairs.push((old, new));
            }
            moved += self.store.rewrap_keys(&pairs).await?;
        }
    }
}

/// The schema version an event was written with (1 when its metadata predates the field).
pub fn schema_version(metadata: &Value) -> u32 {
    metadata.get("schema_version").and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok()).unwrap_or(1)
}

/// The opened `personal` of a payload's sealed member: `None` when its key is destroyed (or, which only a
/// hand-edited database can produce, was never stored) and when there is no sealed member.
fn open_personal(
    keys: &HashMap<Uuid, Result<Option<DataKey>, String>>,
    event_type: &str,
    data: &Value,
) -> Result<Option<Value>, VaultError> {
    let Some(sealed) = data.get(SEALED) else { return Ok(None) };
    let owner = crypto::envelope_owner(sealed)
        .ok_or_else(|| VaultError::Corrupt(format!("a {event_type} event's sealed member names no key")))?;
    match keys.get(&owner) {
        Some(Ok(Some(key))) => key.open(owner, event_type, sealed).map(Some),
        Some(Err(unwrapping)) => Err(VaultError::Corrupt(unwrapping.clone())),
        _ => Ok(None),
    }
}

/// An event opened: `sealed` replaced by `personal` (or, its key destroyed, by `"erased": true`), then upcast.
fn apply_opened(event: &mut RecordedEvent, personal: Option<Value>) {
    if let Value::Object(payload) = &mut event.data
        && payload.remove(SEALED).is_some()
    {
        match personal {
            Some(personal) => payload.insert(PERSONAL.to_owned(), personal),
            None => payload.insert(ERASED.to_owned(), Value::Bool(true)),
        };
    }
    let version = schema_version(&event.metadata);
    event.data = upcast(&event.event_type, version, std::mem::take(&mut event.data));
}

/// An event left sealed by [`Vault::open_what_opens`], and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unopened {
    pub position: kiroku_event_store::Position,
    /// The person whose key it is sealed under.
    pub owner: Uuid,
    pub reason: String,
}

/// The member that marks an event whose personal data could not be opened, for a feed that must go on (its
/// `sealed` member removed: the person's data is not erased, only unreadable here until an operator repairs the
/// key).
pub const UNREADABLE: &str = "personal_unavailable";

/// Marks an event [`Vault::open_what_opens`] left sealed as [`UNREADABLE`], and upcasts it.
pub fn mark_unreadable(event: &mut RecordedEvent) {
    if let Value::Object(payload) = &mut event.data
        && payload.remove(SEALED).is_some()
    {
        payload.insert(UNREADABLE.to_owned(), Value::Bool(true));
    }
    let version = schema_version(&event.metadata);
    event.data = upcast(&event.event_type, version, std::mem::take(&mut event.data));
}

/// Data keys the start-up check unwraps besides the blind index's.
const CHECKED_KEYS: i64 = 32;
