//! GitHub's REST API: `GET /user/{id}`, with conditional requests and rate limits understood.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiroku_domain::{GitHubId, GitHubProfile};
use kiroku_platform::auth::read_capped;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, ETAG, HeaderMap, IF_NONE_MATCH, RETRY_AFTER, USER_AGENT};
use serde::Deserialize;

use crate::config::GitHubSettings;

/// A profile larger than this is refused (GitHub's are a few KiB).
const MAX_PROFILE_BYTES: usize = 256 * 1024;
/// When GitHub gives no hint, clients are told to retry after this long.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitHubError {
    #[error("GitHub has no such account")]
    NotFound,
    #[error("GitHub is unavailable ({cause})")]
    Unavailable { cause: String, retry_after: Duration },
    /// GitHub refused kiroku itself (a bad `KIROKU_GITHUB_TOKEN`, say): an operator must act.
    #[error("GitHub refused the request with status {0}")]
    Refused(u16),
}

/// The answer to a (conditional) profile request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetched {
    Profile(GitHubProfile),
    NotModified,
}

#[derive(Deserialize)]
struct UserResponse {
    id: u64,
    login: String,
    name: Option<String>,
    avatar_url: Option<String>,
}

pub(crate) struct GitHubClient {
    http: reqwest::Client,
    settings: GitHubSettings,
    /// What GitHub last said of kiroku's rate limit (`x-ratelimit-remaining`, `x-ratelimit-reset`): a budget
    /// shared by every caller (60 an hour without `KIROKU_GITHUB_TOKEN`). Once spent, calls are answered at once
    /// until the reset, without asking GitHub.
    budget: std::sync::Mutex<Option<Budget>>,
}

#[derive(Clone, Copy, Debug)]
struct Budget {
    remaining: u64,
    reset: SystemTime,
}

impl GitHubClient {
    pub(crate) fn new(settings: GitHubSettings, http: reqwest::Client) -> Self {
        GitHubClient { http, settings, budget: std::sync::Mutex::default() }
    }

    /// `Err` with the time left until GitHub's reset while the budget is spent.
    fn spent(&self) -> Result<(), GitHubError> {
        let budget = self.budget.lock().ok().and_then(|b| *b);
        match budget {
            Some(Budget { remaining: 0, reset }) => match reset.duration_since(SystemTime::now()) {
                Ok(left) if !left.is_zero() => Err(GitHubError::Unavailable {
                    cause: "rate limit spent".to_owned(),
                    retry_after: left.max(Duration::from_secs(1)),
                }),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Remembers what a response said of the budget, and shows it in `kiroku_github_ratelimit_remaining`.
    fn note_budget(&self, headers: &HeaderMap, rate_limited: bool) {
        let header = |name| headers.get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok());
        let remaining = header("x-ratelimit-remaining").and_then(|v| v.trim().parse::<u64>().ok());
        let reset = header("x-ratelimit-reset")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|epoch| UNIX_EPOCH + Duration::from_secs(epoch));
        let budget = match (remaining, reset, rate_limited) {
            (Some(remaining), Some(reset), _) => Budget { remaining, reset },
            // Refused for the rate without the headers: spent until Retry-After (or a minute).
            (_, _, true) => Budget {
                remaining: 0,
                reset: SystemTime::now() + retry_after(headers).unwrap_or(Duration::from_secs(60)),
            },
            _ => return,
        };
        metrics::gauge!("kiroku_github_ratelimit_remaining").set(budget.remaining as f64);
        if let Ok(mut kept) = self.budget.lock() {
            *kept = Some(budget);
        }
    }

    /// Fetches an account's profile; with `etag`, a 304 answer is [`Fetched::NotModified`]. Each call is counted
    /// in the dependency metrics, by outcome.
    pub(crate) async fn fetch_user(&self, id: GitHubId, etag: Option<&str>) -> Result<Fetched, GitHubError> {
        let started = std::time::Instant::now();
        let fetched = self.fetch_user_once(id, etag).await;
        let outcome = match &fetched {
            Ok(Fetched::Profile(_)) => "ok",
            Ok(Fetched::NotModified) => "not_modified",
            Err(GitHubError::NotFound) => "not_found",
            Err(GitHubError::Unavailable { cause, .. }) if cause == "timeout" => "timeout",
            Err(GitHubError::Unavailable { cause, .. }) if cause == "rate limited" => "rate_limited",
            Err(GitHubError::Unavailable { cause, .. }) if cause == "rate limit spent" => "budget_spent",
            Err(GitHubError::Unavailable { .. }) => "unavailable",
            Err(GitHubError::Refused(_)) => "refused",
        };
        kiroku_platform::metrics::dependency_call("github", outcome, started.elapsed());
        fetched
    }

    async fn fetch_user_once(&self, id: GitHubId, etag: Option<&str>) -> Result<Fetched, GitHubError> {
        self.spent()?;
        let url = format!("{}/user/{id}", self.settings.api_url.as_str().trim_end_matches('/'));
        let mut request = self
            .http
            .get(url)
            .timeout(self.settings.timeout)
            .header(USER_AGENT, concat!("kiroku/", env!("CARGO_PKG_VERSION")))
            .header(ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28");
        if let Some(token) = &self.settings.token {
            request = request.bearer_auth(token.expose());
        }
        if let Some(etag) = etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        let response = request.send().await.map_err(|error| GitHubError::Unavailable {
            cause: if error.is_timeout() { "timeout".to_owned() } else { "connection failed".to_owned() },
            retry_after: DEFAULT_RETRY,
        })?;
        let status = response.status();
        let limited = status == StatusCode::TOO_MANY_REQUESTS
            || (status == StatusCode::FORBIDDEN && rate_limited(response.headers()));
        self.note_budget(response.headers(), limited);
        match status {
            StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
            StatusCode::NOT_FOUND => Err(GitHubError::NotFound),
            s if s.is_success() => {
                let etag = response.headers().get(ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let body = read_capped(response, MAX_PROFILE_BYTES).await;
                let user: UserResponse = body.ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or_else(|| {
                    GitHubError::Unavailable { cause: "malformed profile".to_owned(), retry_after: DEFAULT_RETRY }
                })?;
                Ok(Fetched::Profile(GitHubProfile {
                    id: GitHubId::new(user.id),
                    login: user.login,
                    name: user.name,
                    avatar_url: user.avatar_url,
                    etag,
                }))
            }
            _ if limited => Err(GitHubError::Unavailable {
                cause: "rate limited".to_owned(),
                retry_after: retry_after(response.headers()).unwrap_or(Duration::from_secs(60)),
            }),
            s if s.is_server_error() => Err(GitHubError::Unavailable {
                cause: format!("status {}", s.as_u16()),
                retry_after: retry_after(response.headers()).unwrap_or(DEFAULT_RETRY),
            }),
            s => Err(GitHubError::Refused(s.as_u16())),
        }
    }
}

fn rate_limited(headers: &HeaderMap) -> bool {
    headers.get("x-ratelimit-remaining").and_then(|v| v.to_str().ok()) == Some("0") || headers.contains_key(RETRY_AFTER)
}

/// From `Retry-After` (seconds), else from `x-ratelimit-reset` (epoch seconds).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name| headers.get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok());
    if let Some(seconds) = header(RETRY_AFTER.as_str()).and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(seconds));
    }
    let reset = header("x-ratelimit-reset").and_then(|v| v.trim().parse::<u64>().ok())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(reset.saturating_sub(now).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_the_header_and_falls_back_to_the_reset_time() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let mut headers = HeaderMap::new();
        let reset = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 120;
        headers.insert("x-ratelimit-reset", reset.to_string().parse().unwrap());
        let delay = retry_after(&headers).unwrap();
        assert!(delay > Duration::from_secs(100) && delay <= Duration::from_secs(120), "{delay:?}");
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
