//! kiroku's gRPC API, generated from `proto/kiroku/v1/` by `build.rs`.
//!
//! This is the only crate that knows protobuf: services convert between these messages and their own types at
//! their edge.

/// Package `kiroku.v1`.
pub mod v1 {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("kiroku.v1");
}

/// The encoded `FileDescriptorSet` of kiroku's protos plus `google/rpc/error_details.proto`, for server
/// reflection: with it, `grpcurl -format-error` prints error details readably.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiroku_descriptor.bin"));
