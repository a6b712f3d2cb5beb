//! A development-only identity provider. It is what `kiroku dev` runs on `127.0.0.1:50053` in place of Auth0
//! and GitHub, and what tests use to mint tokens:
//!
//! - an RSA key pair made at start-up, its JWKS at `/.well-known/jwks.json`;
//! - RS256 tokens for `github|<id>` subjects ([`SigningKey::mint`]), also minted over HTTP by
//!   `POST /dev/tokens {"github_id": N, "login": "L"}` (that is how `kiroku dev token` works);
//! - GitHub's `GET /github/user/{id}` for the accounts it has minted tokens for.
//!
//! Nothing in a production process can reach it: only `kiroku dev` starts it, and it binds loopback only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The address `kiroku dev` serves it on.
pub const DEV_IDENTITY_ADDR: &str = "127.0.0.1:50053";
/// The audience of the end-user tokens it mints (RegisterUser's `auth0_token`).
pub const DEV_AUDIENCE: &str = "kiroku-dev";
/// The audience of the caller tokens it mints (`authorization: Bearer`, every `kiroku.v1` RPC).
pub const DEV_API_AUDIENCE: &str = "kiroku-api";
/// The client its caller tokens are issued to.
pub const DEV_CALLER: &str = "kiroku-dev";

/// An RSA signing key with its key id.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    modulus: String,
    exponent: String,
}

impl SigningKey {
    /// A fresh 2048-bit key.
    pub fn generate() -> Result<SigningKey> {
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).context("generate an RSA key")?;
        let der = private.to_pkcs1_der().context("encode the RSA key")?;
        Ok(SigningKey {
            kid: format!("dev-{}", ulid::Ulid::new().to_string().to_lowercase()),
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            modulus: URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
            exponent: URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// This key as a JWK (public part only).
    pub fn jwk(&self) -> serde_json::Value {
        json!({ "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": self.modulus, "e": self.exponent })
    }

    /// The modulus and exponent, base64url (for tests that forge tokens with the public key).
    pub fn public_components(&self) -> (&str, &str) {
        (&self.modulus, &self.exponent)
    }

    /// Signs `claims` with RS256 under this key's kid.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String> {
        self.sign_as(&self.kid, claims)
    }

    /// Signs `claims` with RS256 but names another kid in the header (for tests of forged tokens).
    pub fn sign_as(&self, kid: &str, claims: &serde_json::Value) -> Result<String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding).context("sign a token")
    }

    /// A caller token (a machine-to-machine client's, Auth0-style: `sub` is `<client>@clients`) for `audience`
    /// with `permissions`, valid from now for `ttl`.
    pub fn mint_caller(
        &self,
        issuer: &str,
        audience: &str,
        client: &str,
        permissions: &[&str],
        ttl: Duration,
    ) -> Result<String> {
        let now = unix_now();
        self.sign(&json!({
            "iss": issuer,
            "aud": audience,
            "sub": format!("{client}@clients"),
            "azp": client,
            // What Auth0 writes into a token of the client-credentials grant, which kiroku requires of callers.
            "gty": "client-credentials",
            "permissions": permissions,
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs(),
        }))
    }

    /// A token for `github|<github_id>`, valid from now for `ttl`.
    pub fn mint(&self, issuer: &str, audience: &str, github_id: u64, ttl: Duration) -> Result<String> {
        let now = unix_now();
        self.sign(&json!({
            "iss": issuer,
            "aud": audience,
            "sub": format!("github|{github_id}"),
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs(),
        }))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A JWKS document holding `keys`.
pub fn jwks(keys: &[&SigningKey]) -> serde_json::Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// A GitHub account the dev provider knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevAccount {
    pub github_id: u64,
    pub login: String,
}

struct Provider {
    issuer: String,
    key: SigningKey,
    accounts: Mutex<HashMap<u64, String>>,
    /// Every permission, for the caller tokens it mints unasked (kiroku's protos declare them, not this crate).
    permissions: Vec<String>,
}

/// The running development identity provider.
pub struct DevIdentityProvider {
    provider: Arc<Provider>,
    local_addr: SocketAddr,
}

/// `{"github_id": N, "login": "L"}` for an end user's token (with a caller token beside it), or
/// `{"caller": true, "permissions": [...]}` for a caller token alone.
#[derive(Deserialize)]
struct MintRequest {
    #[serde(default)]
    github_id: Option<u64>,
    #[serde(default)]
    login: Option<String>,
    #[serde(default)]
    caller: bool,
    #[serde(default)]
    permissions: Option<Vec<String>>,
}

impl DevIdentityProvider {
    /// Binds `addr` (loopback only) and serves in the background until the process ends; a caller token that
    /// names no permissions holds `permissions`.
    pub async fn start(addr: SocketAddr, permissions: &[&str]) -> Result<DevIdentityProvider> {
        anyhow::ensure!(addr.ip().is_loopback(), "the development identity provider binds loopback addresses only");
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
        let local_addr = listener.local_addr()?;
        let provider = Arc::new(Provider {
            issuer: format!("http://{local_addr}/"),
            key: SigningKey::generate()?,
            accounts: Mutex::new(HashMap::new()),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        });
        let app = Router::new()
            .route("/.well-known/jwks.json", get(serve_jwks))
            .route("/github/user/{id}", get(serve_user))
            .route("/dev/tokens", post(serve_mint))
            .with_state(provider.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "the development identity provider stopped");
            }
        });
        Ok(DevIdentityProvider { provider, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn issuer(&self) -> &str {
        &self.provider.issuer
    }

    /// What to set as `KIROKU_GITHUB_API_URL`.
    pub fn github_api_url(&self) -> String {
        format!("http://{}/github", self.local_addr)
    }

    /// Remembers the account and mints a token for it.
    pub fn mint(&self, account: &DevAccount, ttl: Duration) -> Result<String> {
        mint(&self.provider, account, ttl)
    }

    /// A caller token with `permissions`.
    pub fn mint_caller(&self, permissions: &[&str], ttl: Duration) -> Result<String> {
        self.provider.key.mint_caller(&self.provider.issuer, DEV_API_AUDIENCE, DEV_CALLER, permissions, ttl)
    }
}

fn mint(provider: &Provider, account: &DevAccount, ttl: Duration) -> Result<String> {
    if let Ok(mut accounts) = provider.accounts.lock() {
        accounts.insert(account.github_id, account.login.clone());
    }
    provider.key.mint(&provider.issuer, DEV_AUDIENCE, account.github_id, ttl)
}

async fn serve_jwks(State(provider): State<Arc<Provider>>) -> impl IntoResponse {
    Json(jwks(&[&provider.key]))
}

async fn serve_user(State(provider): State<Arc<Provider>>, Path(id): Path<String>) -> impl IntoResponse {
    let login = id.parse::<u64>().ok().and_then(|id| provider.accounts.lock().ok()?.get(&id).cloned());
    match (id.parse::<u64>(), login) {
        (Ok(id), Some(login)) => (
            StatusCode::OK,
            Json(json!({
                "id": id,
                "login": login,
                "name": null,
                "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}"),
            })),
        ),
        _ => (StatusCode::NOT_FOUND, Json(json!({ "message": "Not Found" }))),
    }
}

async fn serve_mint(State(provider): State<Arc<Provider>>, Json(request): Json<MintRequest>) -> impl IntoResponse {
    let ttl = Duration::from_secs(24 * 3600);
    let caller = |permissions: &[&str]| {
        provider.key.mint_caller(&provider.issuer, DEV_API_AUDIENCE, DEV_CALLER, permissions, ttl)
    };
    let answer = if request.caller {
        let permissions = request.permissions.unwrap_or_else(|| provider.permissions.clone());
        let permissions: Vec<&str> = permissions.iter().map(String::as_str).collect();
        caller(&permissions).map(|token| json!({ "token": token }))
    } else {
        let (Some(github_id), Some(login)) = (request.github_id, request.login.as_deref().map(str::trim)) else {
            return (StatusCode::BAD_REQUEST, Json(json!({ "message": "github_id and login are required" })));
        };
        if login.is_empty() || login.len() > 39 {
            return (StatusCode::BAD_REQUEST, Json(json!({ "message": "login must be 1 to 39 characters" })));
        }
        let account = DevAccount { github_id, login: login.to_owned() };
        let all: Vec<&str> = provider.permissions.iter().map(String::as_str).collect();
        mint(&provider, &account, ttl).and_then(|token| Ok(json!({ "token": token, "caller_token": caller(&all)? })))
    };
    match answer {
        Ok(body) => (StatusCode::OK, Json(body)),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "message": error.to_string() }))),
    }
}
