//! AIP-158 pagination (opaque keyset tokens) and the AIP-160 subset that ListUsers filters with.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::QueryError;

pub(crate) const DEFAULT_PAGE_SIZE: i64 = 50;
pub(crate) const MAX_PAGE_SIZE: i64 = 1000;

/// `page_size` 0 → 50, above 1000 → 1000, negative → INVALID_ARGUMENT.
pub(crate) fn page_size(requested: i32) -> Result<i64, QueryError> {
    match requested {
        n if n < 0 => Err(QueryError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(i64::from(n).min(MAX_PAGE_SIZE)),
    }
}

/// What a page token remembers: where the last page ended, and under which filter.
#[derive(Serialize, Deserialize)]
struct Token<K> {
    /// The request kind, so a token of one RPC is refused by another.
    k: String,
    /// The filter the token was made under.
    f: String,
    /// The last key of the previous page.
    a: K,
}

pub(crate) fn encode_token<K: Serialize>(kind: &str, filter: &str, after: K) -> String {
    let token = Token { k: kind.to_owned(), f: filter.to_owned(), a: after };
    serde_json::to_vec(&token).map(|json| URL_SAFE_NO_PAD.encode(json)).unwrap_or_default()
}

/// The key after which the page starts; `None` for the first page.
pub(crate) fn decode_token<K: DeserializeOwned>(
    kind: &str,
    filter: &str,
    token: &str,
) -> Result<Option<K>, QueryError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || QueryError::invalid("page_token", "is not a page token of this request");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let token: Token<K> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if token.k != kind {
        return Err(invalid());
    }
    if token.f != filter {
        return Err(QueryError::invalid("page_token", "was made for another filter"));
    }
    Ok(Some(token.a))
}

/// A parsed ListUsers filter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct UserFilter {
    /// Only users with this status (as the read model stores it).
    pub status: Option<&'static str>,
    /// An exact login (case-insensitive), or a prefix when the value ended with `*`.
    pub login: Option<LoginMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoginMatch {
    Exact(String),
    Prefix(String),
}

impl UserFilter {
    /// A LIKE pattern for the login (with `%`, `_` and `\` escaped), which the query lower-cases as it does the
    /// logins: PostgreSQL's `lower`, the same as LookupUser's, so that the two agree on every login.
    pub(crate) fn login_pattern(&self) -> Option<String> {
        let escape = |s: &str| s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        match &self.login {
            None => None,
            Some(LoginMatch::Exact(login)) => Some(escape(login)),
            Some(LoginMatch::Prefix(prefix)) => Some(format!("{}%", escape(prefix))),
        }
    }
}

/// Parses `status = "active"` (or `deactivated`, `erased`) and `github_username = "oct*"`, joined by `AND`.
pub(crate) fn parse_user_filter(filter: &str) -> Result<UserFilter, QueryError> {
    let mut parsed = UserFilter::default();
    if filter.trim().is_empty() {
        return Ok(parsed);
    }
    let invalid = |why: &str| QueryError::invalid("filter", why.to_owned());
    for term in filter.split(" AND ") {
        let (field, value) = term
            .split_once('=')
            .ok_or_else(|| invalid("each term must be field = \"value\"; supported: status, github_username"))?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .filter(|v| !v.contains('"'))
            .ok_or_else(|| invalid("values must be double-quoted strings"))?;
        match field.trim() {
            "status" if parsed.status.is_none() => {
                parsed.status = Some(match value {
                    "active" => "active",
                    "deactivated" => "deactivated",
                    "erased" => "erased",
                    _ => return Err(invalid("status takes \"active\", \"deactivated\" or \"erased\"")),
                });
            }
            "status" => return Err(invalid("status may appear once")),
            "github_username" if parsed.login.is_none() => {
                let login = match value.strip_suffix('*') {
                    Some(prefix) => LoginMatch::Prefix(prefix.to_owned()),
                    None => LoginMatch::Exact(value.to_owned()),
                };
                if matches!(&login, LoginMatch::Exact(v) | LoginMatch::Prefix(v) if v.contains('*') || v.len() > 100) {
                    return Err(invalid("github_username takes a login, or a prefix ending in a single *"));
                }
                parsed.login = Some(login);
            }
            "github_username" => return Err(invalid("github_username may appear once")),
            other => {
                let other = kiroku_platform::echo::clip(other);
                return Err(invalid(&format!("unknown field {other:?}; supported: status, github_username")));
            }
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supported_filters_parse_and_everything_else_is_refused() {
        assert_eq!(parse_user_filter("").unwrap(), UserFilter::default());
        let both = parse_user_filter(r#"status = "active" AND github_username = "oct*""#).unwrap();
        assert_eq!(both.status, Some("active"));
        assert_eq!(parse_user_filter(r#"status = "erased""#).unwrap().status, Some("erased"));
        assert_eq!(parse_user_filter(r#"status = "deactivated""#).unwrap().status, Some("deactivated"));
        assert_eq!(both.login, Some(LoginMatch::Prefix("oct".into())));
        assert_eq!(both.login_pattern().as_deref(), Some("oct%"));
        assert_eq!(parse_user_filter(r#"github_username="a_b""#).unwrap().login_pattern().as_deref(), Some("a\\_b"));
        for bad in [
            r#"status = "banned""#,
            r#"name = "x""#,
            "status = active",
            r#"status = "active" OR github_username = "x""#,
            r#"github_username = "o*c*""#,
            r#"status = "active" AND status = "active""#,
        ] {
            assert!(parse_user_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_round_trip_and_refuse_another_filter_or_kind() {
        let token = encode_token("users", "f", 42u64);
        assert_eq!(decode_token::<u64>("users", "f", &token).unwrap(), Some(42));
        assert!(decode_token::<u64>("users", "g", &token).is_err());
        assert!(decode_token::<u64>("history", "f", &token).is_err());
        assert!(decode_token::<u64>("users", "f", "garbage!").is_err());
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert!(page_size(-1).is_err());
    }
}
