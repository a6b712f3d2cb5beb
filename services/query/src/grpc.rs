//! The gRPC edge of the query side: validates requests and turns answers and `QueryError`s into responses.

use std::time::Duration;

use kiroku::v1::query_service_server::QueryService;
use kiroku::v1::{
    GetUserAsOfRequest, GetUserAsOfResponse, GetUserHistoryRequest, GetUserHistoryResponse, GetUserRequest,
    GetUserResponse, ListRegistrationFailuresRequest, ListRegistrationFailuresResponse, ListUsersRequest,
    ListUsersResponse, LookupUserRequest, LookupUserResponse, User, WatchEventsRequest, get_user_as_of_request,
    lookup_user_request,
};
use kiroku_domain::{Auth0Subject, UserEvent, UserId};
use kiroku_event_store::{EventStore, Position, RecordedEvent, Version};
use kiroku_platform::caller::Caller;
use kiroku_vault::Vault;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::error::QueryError;
use crate::paging::{decode_token, encode_token, page_size, parse_user_filter};
use crate::read_models::{ReadModels, UserKey};
use crate::watch::{WatchStream, Watcher};
use crate::wire;

/// The longest a GetUser waits for the read model to reach `min_position`.
const MAX_READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(10);
/// Kept back from the caller's deadline, so that our answer (PROJECTION_BEHIND, which says why) still reaches
/// it in time: a quarter of it, within these bounds. The deadline counts from when the caller sent the request,
/// and on a loaded host the last checkpoint query alone can take a good part of 200 ms.
const DEADLINE_MARGIN: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(1));

pub(crate) struct QueryGrpc {
    read_models: ReadModels,
    store: EventStore,
    vault: Vault,
    watcher: Watcher,
}

impl QueryGrpc {
    pub(crate) fn new(read_models: ReadModels, store: EventStore, vault: Vault, watcher: Watcher) -> Self {
        QueryGrpc { read_models, store, vault, watcher }
    }
}

/// A user as their events (opened and upcast) build it, on the wire; `None` before a registration.
fn user_from_events(id: Uuid, events: &[RecordedEvent]) -> Result<Option<User>, QueryError> {
    let decoded = events
        .iter()
        .filter_map(|e| UserEvent::decode(&e.event_type, &e.data))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QueryError::Internal(e.into()))?;
    let Some(user) = kiroku_domain::User::from_events(UserId::from_uuid(id), &decoded) else { return Ok(None) };
    // Once the person is erased, no point of their past shows their data (it cannot be opened): say why.
    let erased = user.personal.is_none()
        && events.iter().any(|e| e.data.get(kiroku_domain::ERASED).and_then(serde_json::Value::as_bool) == Some(true))
        || user.status == kiroku_domain::UserStatus::Erased;
    let personal = user.personal.as_ref();
    Ok(Some(User {
        user_id: id.to_string(),
        auth0_id: personal.map(|p| p.auth0_id.to_string()).unwrap_or_default(),
        github_id: personal.map(|p| p.github_id.to_string()).unwrap_or_default(),
        github_username: personal.map(|p| p.github_username.clone()).unwrap_or_default(),
        display_name: personal.map(|p| p.display_name.clone()).unwrap_or_default(),
        avatar_url: personal.and_then(|p| p.avatar_url.clone()).unwrap_or_default(),
        status: crate::read_models::status_of(user.status.as_str()) as i32,
        created_at: Some(wire::timestamp(user.registered_at)),
        updated_at: Some(wire::timestamp(user.updated_at)),
        version: u64::from(user.version),
        erased,
    }))
}

fn user_id(field: &'static str, value: &str) -> Result<Uuid, QueryError> {
    if value.is_empty() {
        return Err(QueryError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| QueryError::invalid(field, "must be a UUID"))
}

/// The caller's deadline from the `grpc-timeout` header (e.g. `5S`, `250m`).
fn deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// How long a call may wait for a position: at most [`MAX_READ_YOUR_WRITES_WAIT`], and within its deadline less
/// a margin for the answer.
fn patience<T>(request: &Request<T>) -> Duration {
    deadline(request)
        .map(|d| d.saturating_sub((d / 4).clamp(DEADLINE_MARGIN.0, DEADLINE_MARGIN.1)))
        .unwrap_or(MAX_READ_YOUR_WRITES_WAIT)
        .min(MAX_READ_YOUR_WRITES_WAIT)
}

/// Waits until `position` is final (at or below the safe horizon: nothing can commit at or below it any more), for
/// at most `patience`.
async fn wait_final(store: &EventStore, position: Position, patience: Duration) -> Result<(), QueryError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if store.safe_horizon().await? >= position {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(QueryError::PositionNotFinal(position.get()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The highest position anyone may hold: the highest committed, or the horizon when that is higher (an idle log's
/// horizon passes its last event).
pub(crate) async fn log_head(store: &EventStore) -> Result<Position, QueryError> {
    let (committed, horizon) = tokio::try_join!(store.head(), store.safe_horizon())?;
    Ok(committed.max(horizon))
}

impl QueryGrpc {
    /// Whether `id` is a user's: its stream starts with a User's event.
    async fn is_user(&self, id: Uuid) -> Result<bool, QueryError> {
        let first = self.store.read_stream(id, Version::NONE, 1).await?;
        Ok(first.first().is_some_and(|e| e.aggregate_type == UserEvent::AGGREGATE_TYPE))
    }
}

#[tonic::async_trait]
impl QueryService for QueryGrpc {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
        let patience = patience(&request);
        let message = request.into_inner();
        let id = user_id("user_id", &message.user_id)?;
        if message.min_position > 0 {
            let wanted = Position::new(message.min_position);
            // A position above the head of the log will never be reached: say so now rather than wait.
            let head = log_head(&self.store).await?;
            if wanted > head {
                return Err(QueryError::PositionOutOfRange { requested: wanted.get(), head: head.get() }.into());
            }
            self.read_models.wait_for(wanted, patience).await?;
        }
        let user = self.read_models.user(UserKey::Id(id)).await?.ok_or(QueryError::NotFound("user"))?;
        Ok(Response::new(GetUserResponse { user: Some(user) }))
    }

    async fn lookup_user(&self, request: Request<LookupUserRequest>) -> Result<Response<LookupUserResponse>, Status> {
        // Keys that no user can have are the caller's mistake, not an unknown user.
        let key = match &request.get_ref().key {
            Some(lookup_user_request::Key::Auth0Id(v)) if !v.is_empty() => {
                v.parse::<Auth0Subject>()
                    .map_err(|_| QueryError::invalid("auth0_id", "must be github|<numeric id>"))?;
                UserKey::Auth0Id(v)
            }
            Some(lookup_user_request::Key::GithubId(v)) if !v.is_empty() => {
                if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(QueryError::invalid("github_id", "must be a numeric GitHub account id").into());
                }
                UserKey::GitHubId(v)
            }
            Some(lookup_user_request::Key::GithubUsername(v)) if !v.is_empty() => {
                if v.len() > 100 || v.contains('\0') {
                    return Err(QueryError::invalid("github_username", "must be a GitHub login").into());
                }
                UserKey::GitHubUsername(v)
            }
            _ => {
                return Err(
                    QueryError::invalid("key", "one of auth0_id, github_id, github_username is required").into()
                );
            }
        };
        let user = self.read_models.user(key).await?.ok_or(QueryError::NotFound("user"))?;
        Ok(Response::new(LookupUserResponse { user: Some(user) }))
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let message = request.into_inner();
        let limit = page_size(message.page_size)?;
        let filter = parse_user_filter(&message.filter)?;
        let after: Option<u64> = decode_token("users", &message.filter, &message.page_token)?;
        let mut users = self.read_models.users(&filter, after.map(Position::new), limit + 1).await?;
        let next_page_token = if users.len() as i64 > limit {
            users.truncate(limit as usize);
            users.last().map(|(_, at)| encode_token("users", &message.filter, at.get())).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListUsersResponse {
            users: users.into_iter().map(|(user, _)| user).collect(),
            next_page_token,
        }))
    }

    async fn get_user_history(
        &self,
        request: Request<GetUserHistoryRequest>,
    ) -> Result<Response<GetUserHistoryResponse>, Status> {
        let message = request.into_inner();
        let id = user_id("user_id", &message.user_id)?;
        let limit = page_size(message.page_size)?;
        let after: Version = decode_token("history", &message.user_id, &message.page_token)?.unwrap_or(Version::NONE);
        let mut events = self
            .store
            .read_stream(id, after, u32::try_from(limit + 1).unwrap_or(u32::MAX))
            .await
            .map_err(QueryError::from)?;
        // Ids are unique across aggregates; only a User's stream is a user's history.
        let another_aggregate = events.first().is_some_and(|e| e.aggregate_type != UserEvent::AGGREGATE_TYPE);
        // A page past the end is empty; but the page token of an id that is no user's (tokens are the client's to
        // send) is NOT_FOUND, as its first page is.
        let unknown = events.is_empty() && (after == Version::NONE || !self.is_user(id).await?);
        if another_aggregate || unknown {
            return Err(QueryError::NotFound("user").into());
        }
        let next_page_token = if events.len() as i64 > limit {
            events.truncate(limit as usize);
            events.last().map(|e| encode_token("history", &message.user_id, e.version)).unwrap_or_default()
        } else {
            String::new()
        };
        let events = self.vault.open(events).await.map_err(QueryError::from)?;
        Ok(Response::new(GetUserHistoryResponse {
            events: events.into_iter().map(wire::event).collect(),
            next_page_token,
        }))
    }

    async fn get_user_as_of(
        &self,
        request: Request<GetUserAsOfRequest>,
    ) -> Result<Response<GetUserAsOfResponse>, Status> {
        let patience = patience(&request);
        let message = request.into_inner();
        let id = user_id("user_id", &message.user_id)?;
        let keep: Box<dyn Fn(&RecordedEvent) -> bool + Send> = match message.as_of {
            Some(get_user_as_of_request::AsOf::AsOfPosition(position)) => {
                let head = log_head(&self.store).await?;
                if position > head.get() {
                    return Err(QueryError::PositionOutOfRange { requested: position, head: head.get() }.into());
                }
                // Answered once nothing can commit at or below the position any more: the same question then
                // always gets the same answer.
                wait_final(&self.store, Position::new(position), patience).await?;
                Box::new(move |e| e.position.get() <= position)
            }
            Some(get_user_as_of_request::AsOf::AsOfTime(time)) => {
                let at = chrono::DateTime::from_timestamp(time.seconds, u32::try_from(time.nanos).unwrap_or(u32::MAX))
                    .filter(|_| (0..1_000_000_000).contains(&time.nanos))
                    .ok_or_else(|| QueryError::invalid("as_of_time", "must be a valid timestamp"))?;
                Box::new(move |e| e.occurred_at <= at)
            }
            None => return Err(QueryError::invalid("as_of", "one of as_of_time, as_of_position is required").into()),
        };
        let events = self.store.read_stream(id, Version::NONE, u32::MAX).await.map_err(QueryError::from)?;
        if events.first().is_some_and(|e| e.aggregate_type != UserEvent::AGGREGATE_TYPE) {
            return Err(QueryError::NotFound("user").into());
        }
        // The events up to the point asked for, in version order (positions grow with versions).
        let upto: Vec<RecordedEvent> = events.into_iter().take_while(|e| keep(e)).collect();
        let opened = self.vault.open(upto).await.map_err(QueryError::from)?;
        let user = user_from_events(id, &opened)?.ok_or(QueryError::NotFound("user"))?;
        Ok(Response::new(GetUserAsOfResponse { user: Some(user) }))
    }

    async fn list_registration_failures(
        &self,
        request: Request<ListRegistrationFailuresRequest>,
    ) -> Result<Response<ListRegistrationFailuresResponse>, Status> {
        let message = request.into_inner();
        let limit = page_size(message.page_size)?;
        let before: Option<i64> = decode_token("failures", "", &message.page_token)?;
        let mut failures = self.read_models.failures(before, limit + 1).await?;
        let next_page_token = if failures.len() as i64 > limit {
            failures.truncate(limit as usize);
            failures.last().map(|f| encode_token("failures", "", f.position as i64)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListRegistrationFailuresResponse { failures, next_page_token }))
    }

    type WatchEventsStream = WatchStream;

    async fn watch_events(&self, request: Request<WatchEventsRequest>) -> Result<Response<WatchStream>, Status> {
        // Streams are capped per caller; without a caller check (none configured), all share one cap.
        let caller = request.extensions().get::<Caller>().map(|c| c.subject.clone()).unwrap_or_default();
        let stream = self.watcher.watch(request.into_inner(), &caller).await?;
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let with = |value: &str| {
            let mut request = Request::new(());
            request.metadata_mut().insert("grpc-timeout", value.parse().unwrap());
            deadline(&request)
        };
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("2M"), Some(Duration::from_secs(120)));
        assert_eq!(with("x"), None);
        assert_eq!(deadline(&Request::new(())), None);
    }
}
