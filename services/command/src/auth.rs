//! Auth0 access tokens: RS256 only, keys from the configured JWKS (never from the token's `jku`, `x5u` or `jwk`
//! headers), issuer and audience checked, `exp`/`nbf` with 30 s of leeway.
//!
//! The JWKS is cached and refreshed in the background once it is 10 minutes old (a known key never waits for
//! Auth0; a set that could not be refreshed for a day is no longer trusted). An unknown `kid` triggers a refetch,
//! at most one per 10 s whatever arrives (so a flood of made-up kids cannot hammer Auth0); keys rotate without a
//! restart, and a key that leaves the JWKS is refused after the next fetch. Tokens are never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use crate::config::Auth0Settings;

/// The least time between two JWKS fetches.
const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a fetched JWKS is used before it is refreshed (a key removed from it is then revoked).
const MAX_KEY_AGE: Duration = Duration::from_secs(600);
/// How long a JWKS that could not be refreshed is still trusted.
const MAX_UNREFRESHED_AGE: Duration = Duration::from_secs(24 * 3600);
/// Allowed clock skew for `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;
/// Longer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("the token has expired")]
    Expired,
    /// The detail is for logs only; clients just learn that the token is invalid.
    #[error("the token is invalid: {0}")]
    Invalid(&'static str),
    #[error("the JWKS endpoint is unreachable")]
    JwksUnavailable,
}

/// What kiroku takes from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VerifiedToken {
    pub subject: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    iss: String,
}

/// The signing keys of the last JWKS fetched.
#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Option<Instant>,
}

impl KeyCache {
    /// Older than [`MAX_KEY_AGE`]: refreshed in the background, so that revoked keys go.
    fn is_stale(&self) -> bool {
        self.fetched_at.is_none_or(|at| at.elapsed() > MAX_KEY_AGE)
    }

    /// Older than [`MAX_UNREFRESHED_AGE`] (Auth0 unreachable all that time): no longer trusted at all.
    fn is_expired(&self) -> bool {
        self.fetched_at.is_none_or(|at| at.elapsed() > MAX_UNREFRESHED_AGE)
    }
}

#[derive(Default)]
struct Refetch {
    last_attempt: Option<Instant>,
    last_succeeded: bool,
}

/// Verifies tokens against one Auth0 tenant.
pub(crate) struct TokenVerifier {
    settings: Auth0Settings,
    keys: Arc<Keys>,
}

/// The JWKS cache and how to refill it; shared with background refreshes.
struct Keys {
    jwks_url: url::Url,
    http: reqwest::Client,
    cache: RwLock<KeyCache>,
    // Held while fetching, so concurrent unknown kids cause one fetch, not many.
    refetch: Mutex<Refetch>,
}

impl TokenVerifier {
    pub(crate) fn new(settings: Auth0Settings, http: reqwest::Client) -> Self {
        let keys = Arc::new(Keys {
            jwks_url: settings.jwks_url.clone(),
            http,
            cache: RwLock::default(),
            refetch: Mutex::default(),
        });
        TokenVerifier { settings, keys }
    }

    pub(crate) async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid("too long"));
        }
        let header = decode_header(token).map_err(|_| TokenError::Invalid("malformed header"))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Invalid("algorithm is not RS256"));
        }
        let kid = header.kid.ok_or(TokenError::Invalid("no kid"))?;
        let key = self.keys.key_for(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_audience(&[self.settings.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let claims = decode::<Claims>(token, &key, &validation)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => TokenError::Invalid("not yet valid"),
                jsonwebtoken::errors::ErrorKind::InvalidAudience => TokenError::Invalid("wrong audience"),
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::Invalid("bad signature"),
                _ => TokenError::Invalid("claims rejected"),
            })?
            .claims;
        if claims.iss.trim_end_matches('/') != self.settings.issuer.trim_end_matches('/') {
            return Err(TokenError::Invalid("wrong issuer"));
        }
        Ok(VerifiedToken { subject: claims.sub })
    }
}

impl Keys {
    async fn key_for(self: &Arc<Self>, kid: &str) -> Result<Arc<DecodingKey>, TokenError> {
        {
            let cache = self.cache.read().await;
            if let Some(key) = cache.keys.get(kid) {
                // A known key never waits for Auth0: a stale set is refreshed in the background, and only a set
                // that could not be refreshed for a day stops being trusted.
                if cache.is_stale() {
                    self.refresh_in_background();
                }
                if !cache.is_expired() {
                    return Ok(key.clone());
                }
            }
        }
        let mut refetch = self.refetch.lock().await;
        // Another caller may have fetched while we waited for the lock.
        {
            let cache = self.cache.read().await;
            if let Some(key) = cache.keys.get(kid)
                && !cache.is_expired()
            {
                return Ok(key.clone());
            }
        }
        if let Some(last) = refetch.last_attempt
            && last.elapsed() < REFETCH_INTERVAL
        {
            return Err(if refetch.last_succeeded {
                TokenError::Invalid("unknown kid")
            } else {
                TokenError::JwksUnavailable
            });
        }
        refetch.last_attempt = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                refetch.last_succeeded = true;
                tracing::info!(keys = keys.len(), "fetched the JWKS");
                let found = keys.get(kid).cloned();
                *self.cache.write().await = KeyCache { keys, fetched_at: Some(Instant::now()) };
                // A key that left the JWKS is revoked: its tokens fail from now on.
                found.ok_or(TokenError::Invalid("unknown kid"))
            }
            Err(error) => {
                refetch.last_succeeded = false;
                tracing::warn!(error = %error, "could not fetch the JWKS");
                Err(TokenError::JwksUnavailable)
            }
        }
    }

    /// Refetches the JWKS unless a fetch is under way or happened in the last 10 s; keeps the old set on failure.
    fn refresh_in_background(self: &Arc<Self>) {
        let keys = self.clone();
        tokio::spawn(async move {
            let Ok(mut refetch) = keys.refetch.try_lock() else { return };
            if refetch.last_attempt.is_some_and(|last| last.elapsed() < REFETCH_INTERVAL) {
                return;
            }
            refetch.last_attempt = Some(Instant::now());
            match keys.fetch().await {
                Ok(fetched) => {
                    refetch.last_succeeded = true;
                    *keys.cache.write().await = KeyCache { keys: fetched, fetched_at: Some(Instant::now()) };
                }
                Err(error) => {
                    refetch.last_succeeded = false;
                    tracing::warn!(error = %error, "could not refresh the JWKS; keeping the keys fetched before");
                }
            }
        });
    }

    /// The RS256 signing keys of the JWKS, by kid.
    async fn fetch(&self) -> anyhow::Result<HashMap<String, Arc<DecodingKey>>> {
        let response =
            self.http.get(self.jwks_url.clone()).timeout(Duration::from_secs(5)).send().await?.error_for_status()?;
        let set: JwkSet = response.json().await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let usable = matches!(jwk.algorithm, AlgorithmParameters::RSA(_))
                && matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256))
                && matches!(jwk.common.public_key_use, None | Some(PublicKeyUse::Signature));
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            if usable && let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, Arc::new(key));
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetched_key_set_goes_stale_after_its_maximum_age() {
        let fresh = KeyCache { keys: HashMap::new(), fetched_at: Some(Instant::now()) };
        assert!(!fresh.is_stale());
        let old = Instant::now().checked_sub(MAX_KEY_AGE + Duration::from_secs(1)).unwrap();
        assert!(KeyCache { keys: HashMap::new(), fetched_at: Some(old) }.is_stale());
        assert!(KeyCache::default().is_stale(), "never fetched");
        assert!(!KeyCache { keys: HashMap::new(), fetched_at: Some(old) }.is_expired(), "stale is still trusted");
        let ancient = Instant::now().checked_sub(MAX_UNREFRESHED_AGE + Duration::from_secs(1));
        if let Some(ancient) = ancient {
            assert!(KeyCache { keys: HashMap::new(), fetched_at: Some(ancient) }.is_expired());
        }
    }
}
