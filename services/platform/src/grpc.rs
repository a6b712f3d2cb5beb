//! What both gRPC servers carry besides their own service: reflection (v1 and v1alpha, with
//! `google/rpc/error_details.proto` so `grpcurl -format-error` decodes details) and the server's settings.

use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::Server;
use tonic_reflection::server::v1::ServerReflectionServer as ReflectionV1;
use tonic_reflection::server::v1alpha::ServerReflectionServer as ReflectionV1Alpha;

/// Server reflection, both versions grpcurl may ask for.
pub fn reflection() -> Result<(
    ReflectionV1<impl tonic_reflection::server::v1::ServerReflection>,
    ReflectionV1Alpha<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kiroku::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("build reflection v1")?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kiroku::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("build reflection v1alpha")?;
    Ok((v1, v1alpha))
}

/// A server builder with HTTP/2 keepalive, so idle connections and streams survive proxies and dead peers are
/// noticed.
pub fn server() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}
