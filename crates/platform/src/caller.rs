//! Callers: every `kiroku.v1` RPC carries `authorization: Bearer <token>`, an RS256 token of the configured Auth0
//! tenant for the audience `KIROKU_API_AUDIENCE` (what Auth0 issues to a machine-to-machine client), whose
//! `permissions` (or `scope`) must hold the permission the RPC needs. Health and reflection stay open.
//!
//! A tower layer checks it before the service sees the call: no or a bad token is UNAUTHENTICATED
//! `CALLER_UNAUTHENTICATED`, a missing permission PERMISSION_DENIED `PERMISSION_MISSING` (metadata `permission`).
//! The verified [`Caller`] goes into the request's extensions, for the handlers (event metadata) and into the
//! RPC's span (the access log). The end user's token in RegisterUser's body is a different token, for another
//! audience: a user token is never a caller token, nor the reverse. A caller is a machine: its token must be one
//! that Auth0 issued by the client-credentials grant (`gty: client-credentials`). In a tenant without RBAC on the
//! API, any signed-in user could otherwise ask Auth0 for a token of the API's audience with any scope, and call
//! kiroku as an administrator.
//!
//! A service calls with the same token for as long as it lives (Auth0's machine-to-machine tokens last hours), so
//! a verified caller token is remembered for up to a minute (never past its `exp`): the signature is checked
//! once, not on every call. A key withdrawn from the JWKS stops its tokens up to a minute after the JWKS is next
//! fetched (see `auth.rs`). At most `CACHED_TOKENS` are remembered; only tokens that verified are, and expired
//! ones are dropped whenever one is added.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::access::BoxFuture;
use crate::auth::{TokenError, TokenVerifier, VerifiedToken};
use crate::status::{self, reason};

/// How long a verified caller token is trusted without checking its signature again.
const REMEMBER_FOR: Duration = Duration::from_secs(60);
/// Verified caller tokens remembered at most (a few per calling service is the normal case).
const CACHED_TOKENS: usize = 1024;

/// The `gty` of a token that Auth0 issued to a machine-to-machine client.
pub const MACHINE_GRANT: &str = "client-credentials";

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `sub`: for a machine-to-machine client, `<client id>@clients`.
    pub subject: String,
    /// `azp`: the client the token was issued to.
    pub authorized_party: Option<String>,
}

/// The caller check of one service: the verifier for caller tokens. The permission each RPC needs is the one its
/// proto declares (`kiroku::permissions`).
#[derive(Clone)]
pub struct CallerAuth {
    verifier: Arc<TokenVerifier>,
    /// Verified tokens, with when to stop trusting them.
    verified: Arc<Mutex<HashMap<String, (VerifiedToken, Instant)>>>,
}

impl CallerAuth {
    pub fn new(verifier: TokenVerifier) -> Self {
        CallerAuth { verifier: Arc::new(verifier), verified: Arc::default() }
    }

    /// `token`, verified: from memory when it verified less than [`REMEMBER_FOR`] ago (and has not expired).
    async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let now = Instant::now();
        if let Ok(verified) = self.verified.lock()
            && let Some((claims, until)) = verified.get(token)
            && now < *until
        {
            return Ok(claims.clone());
        }
        let claims = self.verifier.verify(token).await?;
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let remaining = Duration::from_secs(claims.expires_at.saturating_sub(epoch));
        if let Ok(mut verified) = self.verified.lock() {
            // Expired entries go as soon as anything is added: bearer tokens are not kept longer than needed.
            verified.retain(|_, (_, until)| now < *until);
            if verified.len() >= CACHED_TOKENS {
                verified.clear();
            }
            verified.insert(token.to_owned(), (claims.clone(), now + remaining.min(REMEMBER_FOR)));
        }
        Ok(claims)
    }

    /// The caller of a request with these headers, or the status that refuses it.
    async fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<Caller, tonic::Status> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| unauthenticated("an `authorization: Bearer <token>` header is required"))?;
        let verified =
            self.verify(token).instrument(tracing::info_span!("caller.verify")).await.map_err(|error| match error {
                TokenError::JwksUnavailable => status::refusal(
                    Code::Unavailable,
                    reason::JWKS_UNAVAILABLE,
                    "the identity provider's keys cannot be fetched",
                )
                .retry_after(Duration::from_secs(10))
                .into(),
                TokenError::Expired => unauthenticated("the caller token has expired"),
                TokenError::Invalid(why) => {
                    // The reason is for the log only; the token itself never is.
                    tracing::debug!(why, "caller token refused");
                    unauthenticated("the caller token is invalid")
                }
            })?;
        if verified.grant_type.as_deref() != Some(MACHINE_GRANT) {
            return Err(unauthenticated("the caller token is not a machine-to-machine token (gty client-credentials)"));
        }
        // A path that is no kiroku RPC needs a permission nobody holds: no default grants one.
        let Some(needed) = kiroku::permissions::of(path) else {
            return Err(tonic::Status::unimplemented(format!("{} is not a kiroku RPC", crate::echo::clip(path))));
        };
        if !verified.permissions.iter().any(|p| p == needed) {
            let message = format!("the caller lacks the permission {needed}");
            return Err(status::refusal(Code::PermissionDenied, reason::PERMISSION_MISSING, message)
                .with("permission", needed)
                .into());
        }
        Ok(Caller { subject: verified.subject, authorized_party: verified.authorized_party })
    }
}

fn unauthenticated(message: &str) -> tonic::Status {
    status::refusal(Code::Unauthenticated, reason::CALLER_UNAUTHENTICATED, message).into()
}

/// The layer: with no [`CallerAuth`] (the projector, which serves only health), it lets everything through.
#[derive(Clone, Default)]
pub struct CallerLayer {
    auth: Option<CallerAuth>,
}

impl CallerLayer {
    pub fn new(auth: Option<CallerAuth>) -> Self {
        CallerLayer { auth }
    }
}

impl<S> Layer<S> for CallerLayer {
    type Service = CallerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerCheck { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone)]
pub struct CallerCheck<S> {
    inner: S,
    auth: Option<CallerAuth>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallerCheck<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(auth) = self.auth.clone().filter(|_| request.uri().path().starts_with("/kiroku.")) else {
            return Box::pin(inner.call(request));
        };
        Box::pin(async move {
            match auth.check(request.uri().path(), request.headers()).await {
                Ok(caller) => {
                    let span = tracing::Span::current();
                    span.record("caller", caller.subject.as_str());
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
