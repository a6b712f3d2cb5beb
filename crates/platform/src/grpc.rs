//! The one way kiroku serves gRPC: a service's own `kiroku.v1` services, `grpc.health.v1` driven by dependency
//! probes, and server reflection (v1 and v1alpha) that lists exactly what the port serves, with
//! `google/rpc/error_details.proto` so `grpcurl -format-error` decodes details. Every RPC runs inside a span
//! and ends with one access-log line (see [`access`](crate::access)).

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tower_service::Service;

use crate::Shutdown;
use crate::access::AccessLogLayer;
use crate::caller::{CallerAuth, CallerLayer};
use crate::config::ServerLimits;
use crate::health::{Dependencies, health_service};
use crate::shed::ShedLayer;
use crate::tls::TlsSettings;

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// A gRPC server under construction: the services it will serve and the names its health entries report.
#[derive(Default)]
pub struct GrpcServer {
    routes: RoutesBuilder,
    /// What reflection lists besides health and reflection itself.
    services: Vec<&'static str>,
    /// Health entries besides `""`.
    health_entries: Vec<&'static str>,
    /// Who may call the `kiroku.v1` services (none: nobody is checked, for a server of health only).
    callers: Option<CallerAuth>,
    limits: Option<ServerLimits>,
    /// TLS (and mTLS) when configured; plaintext otherwise (config allows that on loopback, or when asked).
    tls: Option<TlsSettings>,
}

impl GrpcServer {
    pub fn new() -> Self {
        GrpcServer::default()
    }

    /// Serves `service`, lists it in reflection, and gives it a health entry of its own name.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.services.push(S::NAME);
        self.health_entries.push(S::NAME);
        self
    }

    /// Requires a caller token with the right permission on every `kiroku.v1` RPC (see `caller.rs`).
    pub fn callers(mut self, auth: CallerAuth) -> Self {
        self.callers = Some(auth);
        self
    }

    /// Caps what clients may take (see `shed.rs`); without them, the defaults of `ServerLimits`' settings.
    pub fn limits(mut self, limits: ServerLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Serves over TLS when `tls` is set (see `tls.rs`).
    pub fn tls(mut self, tls: Option<TlsSettings>) -> Self {
        self.tls = tls;
        self
    }

    /// A health entry that names no gRPC service (the projector reports its own state this way).
    pub fn health_entry(mut self, name: &'static str) -> Self {
        self.health_entries.push(name);
        self
    }

    /// Serves on `listener` until `shutdown`: health goes NOT_SERVING, new calls are refused, in-flight calls
    /// finish. HTTP/2 keepalive keeps idle connections and streams alive through proxies and notices dead peers.
    pub async fn serve(self, listener: TcpListener, dependencies: Dependencies, shutdown: Shutdown) -> Result<()> {
        let GrpcServer { mut routes, services, health_entries, callers, limits, tls } = self;
        let limits = limits.unwrap_or(ServerLimits {
            in_flight: 1024,
            in_flight_per_caller: 256,
            request_timeout: Duration::from_secs(30),
            streams_per_connection: 256,
        });
        let (health, probe) = health_service(health_entries, dependencies, shutdown.clone()).await;
        let listed: Vec<&str> = services.iter().copied().chain([HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA]).collect();
        let (reflection_v1, reflection_v1alpha) = reflection(&listed)?;
        routes.add_service(health).add_service(reflection_v1).add_service(reflection_v1alpha);
        let stopping = shutdown.clone();
        let stopped = async move { stopping.wait().await };
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(limits.streams_per_connection))
            // Unary calls only: a stream's handler returns once its response starts.
            .timeout(limits.request_timeout)
            .layer(AccessLogLayer::new(served_methods(&listed)?))
            // The caller first: a call without a valid caller token is refused before it can take a place in
            // flight, so that unauthenticated calls cannot crowd out the callers'.
            .layer(CallerLayer::new(callers))
            .layer(ShedLayer::new(limits.in_flight, limits.in_flight_per_caller))
            .add_routes(routes.routes());
        let served = match tls {
            Some(tls) => {
                let acceptor = crate::tls::acceptor(&tls, shutdown.clone())?;
                router.serve_with_incoming_shutdown(crate::tls::incoming(listener, acceptor), stopped).await
            }
            None => router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped).await,
        }
        .context("serve gRPC");
        // The probe sets NOT_SERVING once shutdown begins; it ends by itself right after.
        let _ = tokio::time::timeout(Duration::from_secs(2), probe).await;
        served
    }
}

/// The paths (`/package.Service/Method`) of every method of `services`, from the descriptor sets the port
/// reflects.
fn served_methods(services: &[&str]) -> Result<HashSet<String>> {
    use prost::Message;
    let mut methods = HashSet::new();
    for set in [kiroku::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let set = prost_types::FileDescriptorSet::decode(set).context("decode a descriptor set")?;
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                if services.contains(&name.as_str()) {
                    methods.extend(service.method.iter().map(|m| format!("/{name}/{}", m.name())));
                }
            }
        }
    }
    // Reflection's descriptors come with tonic-reflection, which does not export them; its one method is known.
    for reflection in [REFLECTION_V1, REFLECTION_V1ALPHA] {
        methods.insert(format!("/{reflection}/ServerReflectionInfo"));
    }
    Ok(methods)
}

/// Server reflection, both versions grpcurl may ask for, listing `services` only: the descriptor set holds
/// every kiroku service, and a port must not advertise one it does not serve.
fn reflection(
    services: &[&str],
) -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let configure = || {
        services.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(kiroku::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let v1 = configure().build_v1().context("build reflection v1")?;
    let v1alpha = configure().build_v1alpha().context("build reflection v1alpha")?;
    Ok((v1, v1alpha))
}
