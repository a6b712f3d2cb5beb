//! Master keys: `KIROKU_MASTER_KEY` (32 bytes, base64) wraps data keys; `KIROKU_PREVIOUS_MASTER_KEYS` (the same,
//! comma-separated) only unwraps, during a rotation. A key's id is a digest of the key, stored with what it wraps.
//! Without `KIROKU_MASTER_KEY`, a service whose database is on loopback uses a key kept in the database, loaded by
//! [`crate::Vault::check`] at start-up (see the migration that makes its table).

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kiroku_event_store::WrappedKey;
use uuid::Uuid;

use crate::VaultError;
use crate::crypto::{DataKey, decrypt, encrypt, key_aad};

struct MasterKey {
    id: String,
    key: DataKey,
}

/// The current master key and the previous ones.
pub struct MasterKeys {
    /// Set when configured; for a key kept in the database, once loaded (until then, empty).
    keys: std::sync::OnceLock<Loaded>,
    /// The development key kept in the database, rather than a configured one.
    in_database: bool,
}

struct Loaded {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("MasterKeys");
        match self.keys.get() {
            Some(loaded) => {
                let previous: Vec<&str> = loaded.previous.iter().map(|k| k.id.as_str()).collect();
                debug.field("current", &loaded.current.id).field("previous", &previous)
            }
            None => debug.field("current", &"in the database, not loaded yet"),
        }
        .finish()
    }
}

/// A new master key, base64, as `KIROKU_MASTER_KEY` takes it.
pub fn generate_master_key() -> Result<String, VaultError> {
    Ok(STANDARD.encode(DataKey::generate()?.bytes()))
}

fn parse_key(text: &str) -> Result<MasterKey, String> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| "must be base64".to_owned())?;
    let key = DataKey::from_bytes(&bytes).ok_or_else(|| format!("must be 32 bytes, not {}", bytes.len()))?;
    Ok(MasterKey { id: key_id(&key), key })
}

/// A master key's id: a digest of it (stored with what it wraps; reveals nothing of a random 256-bit key).
fn key_id(key: &DataKey) -> String {
    let digest = digest::digest(&digest::SHA256, &[b"kiroku master key id\0".as_slice(), key.bytes()].concat());
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl MasterKeys {
    /// Parses the current key and the comma-separated previous ones; the error says what is wrong, never the key.
    pub fn parse(current: &str, previous: Option<&str>) -> Result<MasterKeys, String> {
        let current = parse_key(current)?;
        let previous = previous
            .unwrap_or_default()
            .split(',')
            .filter(|k| !k.trim().is_empty())
            .map(|k| parse_key(k).map_err(|e| format!("a previous key {e}")))
            .collect::<Result<_, _>>()?;
        Ok(MasterKeys { keys: Loaded { current, previous }.into(), in_database: false })
    }

    /// A master key kept in the database, to be loaded (or made) by [`crate::Vault::check`].
    pub fn in_database() -> MasterKeys {
        MasterKeys { keys: std::sync::OnceLock::new(), in_database: true }
    }

    /// Whether this is the development key kept in the database (see [`MasterKeys::in_database`]).
    pub fn kept_in_database(&self) -> bool {
        self.in_database
    }

    /// Whether the key is the one kept in the database, and not loaded yet (configured keys are set from the start).
    pub(crate) fn needs_loading(&self) -> bool {
        self.keys.get().is_none()
    }

    /// Sets the key kept in the database (the first caller's wins; later ones are the same key).
    pub(crate) fn load(&self, key: &[u8]) -> Result<(), VaultError> {
        let current = DataKey::from_bytes(key)
            .map(|key| MasterKey { id: key_id(&key), key })
            .ok_or_else(|| VaultError::Corrupt("the master key kept in the database is not 32 bytes".to_owned()))?;
        let _ = self.keys.set(Loaded { current, previous: Vec::new() });
        Ok(())
    }

    fn loaded(&self) -> Result<&Loaded, VaultError> {
        self.keys.get().ok_or_else(|| {
            VaultError::Corrupt("the master key kept in the database was not loaded (Vault::check)".to_owned())
        })
    }

    /// The ids of every key given (the current one first).
    pub fn ids(&self) -> Result<Vec<String>, VaultError> {
        let loaded = self.loaded()?;
        Ok(std::iter::once(&loaded.current).chain(&loaded.previous).map(|k| k.id.clone()).collect())
    }

    /// The id of the key that wraps new data keys.
    pub fn current_id(&self) -> Result<&str, VaultError> {
        Ok(&self.loaded()?.current.id)
    }

    pub(crate) fn wrap(&self, owner: Uuid, key: &DataKey) -> Result<WrappedKey, VaultError> {
        let current = &self.loaded()?.current;
        let wrapped = encrypt(current.key.bytes(), &key_aad(owner), key.bytes().to_vec())?;
        Ok(WrappedKey { owner, master_key_id: current.id.clone(), wrapped })
    }

    pub(crate) fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, VaultError> {
        let loaded = self.loaded()?;
        let master = std::iter::once(&loaded.current)
            .chain(&loaded.previous)
            .find(|k| k.id == wrapped.master_key_id)
            .ok_or_else(|| VaultError::UnknownMasterKey(wrapped.master_key_id.clone()))?;
        decrypt(master.key.bytes(), &key_aad(wrapped.owner), wrapped.wrapped.clone())
            .as_deref()
            .and_then(DataKey::from_bytes)
            .ok_or_else(|| VaultError::Corrupt(format!("the data key of {} does not unwrap", wrapped.owner)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_key_unwraps_with_its_master_key_current_or_previous() {
        let old = generate_master_key().unwrap();
        let new = generate_master_key().unwrap();
        let before = MasterKeys::parse(&old, None).unwrap();
        let owner = Uuid::now_v7();
        let key = DataKey::generate().unwrap();
        let wrapped = before.wrap(owner, &key).unwrap();
        assert_eq!(before.unwrap(&wrapped).unwrap().bytes(), key.bytes());
        let rotated = MasterKeys::parse(&new, Some(&old)).unwrap();
        assert_eq!(rotated.unwrap(&wrapped).unwrap().bytes(), key.bytes());
        assert_ne!(rotated.wrap(owner, &key).unwrap().master_key_id, wrapped.master_key_id);
        assert!(MasterKeys::in_database().wrap(owner, &key).is_err(), "a key kept in the database must be loaded");
        let without = MasterKeys::parse(&new, None).unwrap();
        assert!(matches!(without.unwrap(&wrapped), Err(VaultError::UnknownMasterKey(_))));
        let moved = WrappedKey { owner: Uuid::now_v7(), ..wrapped };
        assert!(matches!(before.unwrap(&moved), Err(VaultError::Corrupt(_))), "a key is bound to its owner");
    }

    #[test]
    fn a_bad_master_key_is_refused_without_being_echoed() {
        for bad in ["", "not base64!", "c2hvcnQ="] {
            let error = MasterKeys::parse(bad, None).unwrap_err();
            assert!(!error.contains("c2hvcnQ"), "{error}");
        }
        assert!(!format!("{:?}", MasterKeys::parse(&generate_master_key().unwrap(), None).unwrap()).contains('='));
    }
}
