//! Load shedding: a server takes at most `in_flight` calls at once, and at most `per_caller` of one caller (the
//! verified caller's subject, which the caller check in front of this layer put in the request); one more is
//! answered at once with RESOURCE_EXHAUSTED `LIMIT_REACHED` and a RetryInfo, never queued (a queue only turns
//! overload into latency for everyone). A stream holds its place until its response starts; WatchEvents streams
//! have caps of their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower_layer::Layer;
use tower_service::Service;

use crate::access::BoxFuture;
use crate::caller::Caller;
use crate::status::limit_reached;

#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    callers: Arc<CallerCounts>,
}

impl ShedLayer {
    pub fn new(in_flight: usize, per_caller: usize) -> Self {
        ShedLayer {
            permits: Arc::new(Semaphore::new(in_flight.max(1))),
            callers: Arc::new(CallerCounts { per_caller: per_caller.max(1), in_flight: Mutex::default() }),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed { inner, permits: self.permits.clone(), callers: self.callers.clone() }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    callers: Arc<CallerCounts>,
}

/// The calls in flight of each caller (only callers with one in flight are kept).
struct CallerCounts {
    per_caller: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

impl CallerCounts {
    /// A place for one more call of `caller`, or `None` at its cap.
    fn take(self: &Arc<Self>, caller: &str) -> Option<CallerPlace> {
        let mut in_flight = self.in_flight.lock().ok()?;
        let count = in_flight.entry(caller.to_owned()).or_default();
        if *count >= self.per_caller {
            return None;
        }
        *count += 1;
        Some(CallerPlace { counts: self.clone(), caller: caller.to_owned() })
    }
}

/// A caller's place in flight, given back when dropped.
struct CallerPlace {
    counts: Arc<CallerCounts>,
    caller: String,
}

impl Drop for CallerPlace {
    fn drop(&mut self) {
        if let Ok(mut in_flight) = self.counts.in_flight.lock()
            && let Some(count) = in_flight.get_mut(&self.caller)
        {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.caller);
            }
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Shed<S>
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

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Health and reflection are never shed: an orchestrator must see an overloaded server as alive.
        if !request.uri().path().starts_with("/kiroku.") {
            return Box::pin(inner.call(request));
        }
        let caller = request.extensions().get::<Caller>().map(|caller| caller.subject.clone());
        let place = match &caller {
            Some(caller) => match self.callers.take(caller) {
                Some(place) => Some(place),
                None => {
                    let status =
                        limit_reached("this caller is at its limit of calls in flight", Duration::from_secs(1));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
            None => None,
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let status = limit_reached("the server is at its limit of calls in flight", Duration::from_secs(1));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        Box::pin(async move {
            let response = inner.call(request).await;
            drop((permit, place));
            response
        })
    }
}
