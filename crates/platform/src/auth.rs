//! Auth0 access tokens, for both kinds kiroku receives: the end user's token in RegisterUser's body (audience
//! `KIROKU_AUTH0_AUDIENCE`) and the calling service's token in every RPC's metadata (audience
//! `KIROKU_API_AUDIENCE`). RS256 only, keys from the configured JWKS (never from the token's `jku`, `x5u` or `jwk`
//! headers), issuer and audience checked, `exp`/`nbf` with 30 s of leeway; one JWKS cache serves both.
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

/// The least time between two JWKS fetches.
const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a fetched JWKS is used before it is refreshed (a key removed from it is then revoked).
const MAX_KEY_AGE: Duration = Duration::from_secs(600);
/// How long a JWKS that could not be refreshed is still trusted.
const MAX_UNREFRESHED_AGE: Duration = Duration::from_secs(24 * 3600);
/// Allowed clock skew for `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;
/// A JWKS larger than this is refused (a handful of keys is a few KiB).
const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Longer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
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
pub struct VerifiedToken {
    pub subject: String,
    /// `azp`: the client the token was issued to (a machine-to-machine client's id).
    pub authorized_party: Option<String>,
    /// Auth0 RBAC's `permissions` array, or else the space-separated `scope`.
    pub permissions: Vec<String>,
    /// `exp`, in seconds since the epoch.
    pub expires_at: u64,
    /// `gty`, the grant that issued the token: Auth0 writes `client-credentials` into a machine-to-machine token,
    /// and nothing (or another grant) into a user's.
    pub grant_type: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    exp: u64,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    gty: Option<String>,
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

/// An Auth0 tenant's signing keys, cached; cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct Jwks {
    keys: Arc<Keys>,
}

impl Jwks {
    pub fn new(jwks_url: url::Url, http: reqwest::Client) -> Self {
        Jwks { keys: Arc::new(Keys { jwks_url, http, cache: RwLock::default(), refetch: Mutex::default() }) }
    }
}

/// Verifies tokens of one issuer for one audience.
pub struct TokenVerifier {
    jwks: Jwks,
    issuer: String,
    audience: String,
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
    /// `issuer` compares equal with or without a trailing slash.
    pub fn new(jwks: Jwks, issuer: String, audience: String) -> Self {
        TokenVerifier { jwks, issuer, audience }
    }

    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid("too long"));
        }
        let header = decode_header(token).map_err(|_| TokenError::Invalid("malformed header"))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Invalid("algorithm is not RS256"));
        }
        let kid = header.kid.ok_or(TokenError::Invalid("no kid"))?;
        let key = self.jwks.keys.key_for(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_audience(&[self.audience.as_str()]);
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
        if claims.iss.trim_end_matches('/') != self.issuer.trim_end_matches('/') {
            return Err(TokenError::Invalid("wrong issuer"));
        }
        let permissions = match (claims.permissions, claims.scope) {
            (Some(permissions), _) => permissions,
            (None, Some(scope)) => scope.split_whitespace().map(str::to_owned).collect(),
            (None, None) => Vec::new(),
        };
        Ok(VerifiedToken {
            subject: claims.sub,
            authorized_party: claims.azp,
            permissions,
            expires_at: claims.exp,
            grant_type: claims.gty,
        })
    }
}

/// A response's body, refused as soon as it passes `limit` bytes (never buffered whole): a misbehaving peer cannot
/// make kiroku allocate without bound.
pub async fn read_capped(mut response: reqwest::Response, limit: usize) -> anyhow::Result<Vec<u8>> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        anyhow::bail!("the response is larger than {limit} bytes");
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            anyhow::bail!("the response is larger than {limit} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// One HTTP client for Auth0 and GitHub: connection pooling, rustls with ring, no redirects to other hosts.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a default crypto provider; ring is installed once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|error| anyhow::anyhow!("build the HTTP client: {error}"))
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

    /// The RS256 signing keys of the JWKS, by kid (the call counted in the dependency metrics).
    async fn fetch(&self) -> anyhow::Result<HashMap<String, Arc<DecodingKey>>> {
        let started = Instant::now();
        let fetched = self.fetch_once().await;
        crate::metrics::dependency_call("jwks", if fetched.is_ok() { "ok" } else { "error" }, started.elapsed());
        fetched
    }

    async fn fetch_once(&self) -> anyhow::Result<HashMap<String, Arc<DecodingKey>>> {
        let response =
            self.http.get(self.jwks_url.clone()).timeout(Duration::from_secs(5)).send().await?.error_for_status()?;
        let set: JwkSet = serde_json::from_slice(&read_capped(response, MAX_JWKS_BYTES).await?)?;
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
