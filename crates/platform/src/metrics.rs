//! Prometheus metrics: one recorder per process (the `metrics` facade's global one), served as text on
//! `GET /metrics` at `KIROKU_METRICS_ADDR`.
//!
//! Code anywhere in kiroku records with the `metrics` macros (`counter!`, `gauge!`, `histogram!`); until a
//! service installs the recorder those are no-ops, which is what "off" costs. Names follow Prometheus'
//! conventions (`kiroku_` prefix, base units, `_total` for counters, `_seconds` for durations) and every label
//! takes a bounded set of values (never a user id). Histograms are rendered as real histograms (buckets from
//! 0.5 ms to 10 s), so that latency quantiles can be aggregated across instances.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::Shutdown;

/// Latency buckets, in seconds: the range between a cached read and a timeout.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same handle) and describes kiroku's shared
/// metrics. Several services in one process (`kiroku dev`) share it.
pub fn install() -> Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new().set_buckets(&BUCKETS).context("histogram buckets")?.build_recorder();
    let handle = recorder.handle();
    // Losing the race to another thread of the same process leaves that thread's recorder in place.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle.clone());
        describe();
        // Histogram samples wait in per-metric buffers until drained; without a scraper they would pile up.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .context("start the metrics upkeep thread")?;
    }
    HANDLE.get().cloned().context("a metrics recorder of another kind is installed")
}

/// Scrapers served at once; a connection past it is closed at once.
const MAX_CONNECTIONS: usize = 16;
/// The longest one connection may live: a client that never reads its answer cannot hold it for ever.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` on `listener` until `shutdown` (HTTP/1.1, one task per connection, at most
/// `MAX_CONNECTIONS` of them, each for at most `CONNECTION_TIMEOUT`).
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: Shutdown) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(respond(&request, &handle)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

fn respond<B>(request: &http::Request<B>, handle: &PrometheusHandle) -> http::Response<Full<Bytes>> {
    let reply = |status: http::StatusCode, content_type: &'static str, body: String| {
        let mut response = http::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        response
    };
    match (request.method(), request.uri().path()) {
        (&http::Method::GET, "/metrics") => {
            reply(http::StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", handle.render())
        }
        (_, "/metrics") => reply(http::StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".to_owned()),
        _ => reply(http::StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n".to_owned()),
    }
}

/// The bound metrics endpoint of a service, served once the service runs.
pub struct MetricsEndpoint {
    listener: TcpListener,
    handle: PrometheusHandle,
}

impl MetricsEndpoint {
    /// Binds `addr` and installs the recorder (so that what happens during start-up is counted too); `None` when
    /// metrics are off.
    pub async fn bind(addr: Option<SocketAddr>) -> Result<Option<MetricsEndpoint>> {
        let Some(addr) = addr else { return Ok(None) };
        let listener = TcpListener::bind(addr).await.with_context(|| format!("bind KIROKU_METRICS_ADDR {addr}"))?;
        Ok(Some(MetricsEndpoint { listener, handle: install()? }))
    }

    /// The bound address (it differs from the setting's when that asked for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves in a task of its own until `shutdown`.
    pub fn spawn(self, shutdown: Shutdown) {
        if let Ok(address) = self.listener.local_addr() {
            tracing::info!(%address, "metrics on http://{address}/metrics");
        }
        tokio::spawn(serve(self.listener, self.handle, shutdown));
    }
}

/// Samples the PostgreSQL pool (connections in use and idle) every `interval` until `shutdown`.
pub async fn sample_pool(pool: sqlx::PgPool, interval: Duration, shutdown: Shutdown) {
    loop {
        let idle = pool.num_idle() as f64;
        let size = f64::from(pool.size());
        metrics::gauge!("kiroku_postgres_pool_connections", "state" => "idle").set(idle);
        metrics::gauge!("kiroku_postgres_pool_connections", "state" => "in_use").set((size - idle).max(0.0));
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// The help text of the metrics every service shares; each crate describes its own next to where it records
/// them.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("kiroku_grpc_server_handled_total", "RPCs finished, by service, method and gRPC code");
    describe_histogram!(
        "kiroku_grpc_server_handling_seconds",
        Unit::Seconds,
        "time from an RPC's headers to its status (a stream's whole life for WatchEvents)"
    );
    describe_gauge!("kiroku_postgres_pool_connections", "PostgreSQL pool connections, by state (in_use, idle)");
    describe_gauge!("kiroku_postgres_up", "1 when PostgreSQL answered the last health probe");
    describe_gauge!("kiroku_redis_up", "1 when Redis answered the last health probe");
    describe_counter!("kiroku_dependency_requests_total", "calls to GitHub and the JWKS endpoint, by outcome");
    describe_gauge!(
        "kiroku_github_ratelimit_remaining",
        "GitHub calls left in its rate-limit window, as GitHub last said (x-ratelimit-remaining)"
    );
    describe_histogram!(
        "kiroku_dependency_request_seconds",
        Unit::Seconds,
        "latency of calls to GitHub and the JWKS endpoint"
    );
}

/// Records one call to an HTTP dependency (`github`, `jwks`): its outcome (a short, fixed word) and latency.
pub fn dependency_call(dependency: &'static str, outcome: &'static str, elapsed: Duration) {
    metrics::counter!("kiroku_dependency_requests_total", "dependency" => dependency, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("kiroku_dependency_request_seconds", "dependency" => dependency).record(elapsed.as_secs_f64());
}
