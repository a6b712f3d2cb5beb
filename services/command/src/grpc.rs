//! The gRPC edge of the command side: validates requests, records the request id in the RPC's span (opened by
//! the platform's access log), and turns the result into a response or a status (through
//! `From<CommandError> for Status`).

use std::sync::Arc;

use kiroku::v1::command_service_server::CommandService;
use kiroku::v1::{
    DeactivateUserRequest, DeactivateUserResponse, EraseUserRequest, EraseUserResponse, ReactivateUserRequest,
    ReactivateUserResponse, RegisterUserRequest, RegisterUserResponse, SyncGitHubProfileRequest,
    SyncGitHubProfileResponse,
};
use kiroku_domain::UserId;
use kiroku_platform::access::CORRELATION_HEADER;
use kiroku_platform::caller::Caller;
use kiroku_platform::trace::TraceParent;
use tonic::{Request, Response, Status};

use crate::commands::{Call, Commands};
use crate::error::CommandError;

/// The longest deactivation reason kiroku records.
const MAX_REASON_CHARS: usize = 500;

pub(crate) struct CommandGrpc {
    commands: Arc<Commands>,
}

impl CommandGrpc {
    pub(crate) fn new(commands: Arc<Commands>) -> Self {
        CommandGrpc { commands }
    }
}

/// AIP-155: optional, at most 128 printable ASCII characters.
fn request_id(value: &str) -> Result<Option<String>, CommandError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > 128 || !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(CommandError::InvalidArgument {
            field: "request_id",
            description: "must be at most 128 printable ASCII characters".to_owned(),
        });
    }
    Ok(Some(value.to_owned()))
}

fn token(value: &str) -> Result<&str, CommandError> {
    if value.is_empty() {
        return Err(CommandError::InvalidArgument { field: "auth0_token", description: "is required".to_owned() });
    }
    Ok(value)
}

fn user_id(value: &str) -> Result<UserId, CommandError> {
    if value.is_empty() {
        return Err(CommandError::InvalidArgument { field: "user_id", description: "is required".to_owned() });
    }
    value
        .parse()
        .map_err(|_| CommandError::InvalidArgument { field: "user_id", description: "must be a UUID".to_owned() })
}

/// At most [`MAX_REASON_CHARS`], without control characters (it is shown to people and written to logs of
/// audits, never to kiroku's own).
fn reason(value: &str) -> Result<String, CommandError> {
    if value.chars().count() > MAX_REASON_CHARS || value.chars().any(char::is_control) {
        return Err(CommandError::InvalidArgument {
            field: "reason",
            description: format!("must be at most {MAX_REASON_CHARS} characters, without control characters"),
        });
    }
    Ok(value.to_owned())
}

/// The call of an administrator's RPC, with its user.
fn admin_call<T>(request: Request<T>, request_id: impl Fn(&T) -> &str) -> Result<(Call, T), CommandError> {
    let correlation = correlation_id(&request);
    let caller = request.extensions().get::<Caller>().cloned();
    let trace = request.extensions().get::<TraceParent>().cloned();
    let message = request.into_inner();
    let call = start_call(request_id(&message), correlation, caller, trace)?;
    Ok((call, message))
}

/// A correlation id the caller passed in the `x-correlation-id` header, if it is sane.
fn correlation_id<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get(CORRELATION_HEADER)?.to_str().ok()?;
    request_id(value).ok().flatten()
}

/// The call's identity, checked, and recorded in the current span (the RPC's, opened by the access log).
fn start_call(
    raw_request_id: &str,
    correlation: Option<String>,
    caller: Option<Caller>,
    trace: Option<TraceParent>,
) -> Result<Call, CommandError> {
    let mut call = Call::new(request_id(raw_request_id)?, correlation, caller);
    call.traceparent = trace.map(|t| t.0);
    let span = tracing::Span::current();
    span.record("command_id", tracing::field::display(call.command_id));
    if let Some(request_id) = &call.request_id {
        span.record("request_id", request_id.as_str());
    }
    Ok(call)
}

#[tonic::async_trait]
impl CommandService for CommandGrpc {
    async fn register_user(
        &self,
        request: Request<RegisterUserRequest>,
    ) -> Result<Response<RegisterUserResponse>, Status> {
        let correlation = correlation_id(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let trace = request.extensions().get::<TraceParent>().cloned();
        let message = request.into_inner();
        let call = start_call(&message.request_id, correlation, caller, trace)?;
        let token = token(&message.auth0_token)?;
        let registered = self.commands.register_user(token, &call).await?;
        Ok(Response::new(RegisterUserResponse {
            user_id: registered.user_id.to_string(),
            position: registered.position.get(),
        }))
    }

    async fn sync_git_hub_profile(
        &self,
        request: Request<SyncGitHubProfileRequest>,
    ) -> Result<Response<SyncGitHubProfileResponse>, Status> {
        let correlation = correlation_id(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let trace = request.extensions().get::<TraceParent>().cloned();
        let message = request.into_inner();
        let call = start_call(&message.request_id, correlation, caller, trace)?;
        let token = token(&message.auth0_token)?;
        let synced = self.commands.sync_github_profile(token, message.expected_version, &call).await?;
        Ok(Response::new(SyncGitHubProfileResponse {
            user_id: synced.user_id.to_string(),
            version: u64::from(synced.version),
            position: synced.position.get(),
            changed: synced.changed,
        }))
    }

    async fn deactivate_user(
        &self,
        request: Request<DeactivateUserRequest>,
    ) -> Result<Response<DeactivateUserResponse>, Status> {
        let (call, message) = admin_call(request, |m| &m.request_id)?;
        let user = user_id(&message.user_id)?;
        let reason = reason(&message.reason)?;
        let changed = self.commands.deactivate_user(user, reason, message.expected_version, &call).await?;
        Ok(Response::new(DeactivateUserResponse {
            version: u64::from(changed.version),
            position: changed.position.get(),
        }))
    }

    async fn reactivate_user(
        &self,
        request: Request<ReactivateUserRequest>,
    ) -> Result<Response<ReactivateUserResponse>, Status> {
        let (call, message) = admin_call(request, |m| &m.request_id)?;
        let user = user_id(&message.user_id)?;
        let changed = self.commands.reactivate_user(user, message.expected_version, &call).await?;
        Ok(Response::new(ReactivateUserResponse {
            version: u64::from(changed.version),
            position: changed.position.get(),
        }))
    }

    async fn erase_user(&self, request: Request<EraseUserRequest>) -> Result<Response<EraseUserResponse>, Status> {
        let (call, message) = admin_call(request, |m| &m.request_id)?;
        let user = user_id(&message.user_id)?;
        let changed = self.commands.erase_user(user, &call).await?;
        Ok(Response::new(EraseUserResponse { position: changed.position.get() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_optional_and_at_most_128_printable_ascii_characters() {
        assert_eq!(request_id("").unwrap(), None);
        assert_eq!(request_id("abc-123").unwrap().as_deref(), Some("abc-123"));
        assert!(request_id(&"x".repeat(128)).is_ok());
        assert!(request_id(&"x".repeat(129)).is_err());
        assert!(request_id("tab\there").is_err());
        assert!(request_id("ünïcode").is_err());
    }
}
