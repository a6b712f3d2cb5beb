//! The cryptography: AES-256-GCM for data keys and sealed members, HMAC-SHA256 for keyed hashes (aws-lc-rs).
//!
//! A sealed member is `{"key": <owner>, "alg": "A256GCM", "data": base64(nonce ‖ ciphertext ‖ tag)}`. Its
//! additional data binds it to its owner and event type, so a sealed member copied into another person's event
//! or another type of event does not open.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::VaultError;

const ALGORITHM: &str = "A256GCM";

/// A data key (or any 256-bit key): never printed.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(***)")
    }
}

impl DataKey {
    pub(crate) fn generate() -> Result<DataKey, VaultError> {
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| VaultError::Corrupt("the system has no randomness".to_owned()))?;
        Ok(DataKey(key))
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<DataKey> {
        Some(DataKey(bytes.try_into().ok()?))
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `personal` sealed under this key, for `owner`'s event of `event_type`.
    pub(crate) fn seal(&self, owner: Uuid, event_type: &str, personal: &Value) -> Result<Value, VaultError> {
        let plaintext = serde_json::to_vec(personal).map_err(|e| VaultError::Corrupt(format!("seal: {e}")))?;
        let data = encrypt(&self.0, &personal_aad(owner, event_type), plaintext)?;
        Ok(json!({ "key": owner.to_string(), "alg": ALGORITHM, "data": STANDARD.encode(data) }))
    }

    /// The `personal` member sealed in `sealed`.
    pub(crate) fn open(&self, owner: Uuid, event_type: &str, sealed: &Value) -> Result<Value, VaultError> {
        let corrupt = || VaultError::Corrupt(format!("a sealed member of a {event_type} event does not open"));
        if sealed.get("alg").and_then(Value::as_str) != Some(ALGORITHM) {
            return Err(corrupt());
        }
        let data = sealed.get("data").and_then(Value::as_str).ok_or_else(corrupt)?;
        let data = STANDARD.decode(data).map_err(|_| corrupt())?;
        let plaintext = decrypt(&self.0, &personal_aad(owner, event_type), data).ok_or_else(corrupt)?;
        serde_json::from_slice(&plaintext).map_err(|_| corrupt())
    }
}

fn personal_aad(owner: Uuid, event_type: &str) -> Vec<u8> {
    [b"kiroku personal\0".as_slice(), owner.as_bytes(), b"\0", event_type.as_bytes()].concat()
}

pub(crate) fn key_aad(owner: Uuid) -> Vec<u8> {
    [b"kiroku data key\0".as_slice(), owner.as_bytes()].concat()
}

/// The owner named by a payload's sealed member, if it has one.
pub(crate) fn sealed_owner(data: &Value) -> Option<Uuid> {
    envelope_owner(data.get(crate::SEALED)?)
}

pub(crate) fn envelope_owner(sealed: &Value) -> Option<Uuid> {
    sealed.get("key")?.as_str()?.parse().ok()
}

/// nonce ‖ ciphertext ‖ tag, under a fresh random nonce (at most a few billion messages per key, far beyond one
/// person's events or one master key's data keys).
pub(crate) fn encrypt(key: &[u8; 32], aad: &[u8], mut plaintext: Vec<u8>) -> Result<Vec<u8>, VaultError> {
    let failed = || VaultError::Corrupt("encryption failed".to_owned());
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| failed())?);
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| failed())?;
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut plaintext)
        .map_err(|_| failed())?;
    let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len());
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&plaintext);
    Ok(sealed)
}

/// The plaintext of [`encrypt`]'s output, if it opens with this key and additional data.
pub(crate) fn decrypt(key: &[u8; 32], aad: &[u8], sealed: Vec<u8>) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().ok()?;
    let mut in_out = sealed[NONCE_LEN..].to_vec();
    let plaintext = key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut in_out).ok()?;
    Some(plaintext.to_vec())
}

/// Keyed hashes of identities (HMAC-SHA256): equal identities hash equal, so claims stay unique, while the
/// stored value tells nothing to whoever lacks the key (a database dump, a backup).
#[derive(Clone)]
pub struct BlindIndex(hmac::Key);

impl BlindIndex {
    /// What every hashed value starts with (and a value in clear never does: identities have no `~`).
    pub const PREFIX: &'static str = "h1~";

    pub(crate) fn new(key: &DataKey) -> Self {
        BlindIndex(hmac::Key::new(hmac::HMAC_SHA256, key.bytes()))
    }

    /// The hash of `value` of `kind` (kinds hash apart: the same digits as a GitHub id and as part of a subject
    /// give different values).
    pub fn hash(&self, kind: &str, value: &str) -> String {
        let message = [kind.as_bytes(), b"\0", value.as_bytes()].concat();
        let tag = hmac::sign(&self.0, &message);
        format!("{}{}", Self::PREFIX, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_member_opens_only_with_its_key_owner_and_event_type() {
        let key = DataKey::generate().unwrap();
        let owner = Uuid::now_v7();
        let personal = json!({ "github_username": "octocat" });
        let sealed = key.seal(owner, "UserRegistered", &personal).unwrap();
        assert!(!sealed.to_string().contains("octocat"));
        assert_eq!(key.open(owner, "UserRegistered", &sealed).unwrap(), personal);
        assert!(key.open(Uuid::now_v7(), "UserRegistered", &sealed).is_err(), "another owner");
        assert!(key.open(owner, "UserProfileUpdated", &sealed).is_err(), "another event type");
        assert!(DataKey::generate().unwrap().open(owner, "UserRegistered", &sealed).is_err(), "another key");
        let again = key.seal(owner, "UserRegistered", &personal).unwrap();
        assert_ne!(again["data"], sealed["data"], "every seal has its own nonce");
    }

    #[test]
    fn keyed_hashes_are_stable_per_key_and_kind() {
        let index = BlindIndex::new(&DataKey::generate().unwrap());
        let hashed = index.hash("github_id", "583231");
        assert_eq!(hashed, index.hash("github_id", "583231"));
        assert!(hashed.starts_with(BlindIndex::PREFIX) && !hashed.contains("583231"));
        assert_ne!(hashed, index.hash("auth0_subject", "583231"));
        assert_ne!(hashed, BlindIndex::new(&DataKey::generate().unwrap()).hash("github_id", "583231"));
    }
}
