//! kiroku's gRPC API, generated from `proto/kiroku/v1/` by `build.rs`.
//!
//! This is the only crate that knows protobuf: services convert between these messages and their own types at
//! their edge.

/// Package `kiroku.v1`.
pub mod v1 {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("kiroku.v1");
}

/// The permission each RPC needs, declared once, by the `(kiroku.v1.permission)` option of its method in the
/// protos (`build.rs` reads it): the servers' caller check and `kiroku dev` use this table.
pub mod permissions {
    include!(concat!(env!("OUT_DIR"), "/permissions.rs"));

    /// The permission the RPC at `path` needs; `None` for a path that is no kiroku RPC (never a default).
    pub fn of(path: &str) -> Option<&'static str> {
        BY_METHOD.iter().find(|(method, _)| *method == path).map(|(_, permission)| *permission)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_rpc_has_the_permission_its_proto_declares_and_nothing_else_has_one() {
            assert_eq!(of("/kiroku.v1.CommandService/RegisterUser"), Some(REGISTER));
            assert_eq!(of("/kiroku.v1.CommandService/SyncGitHubProfile"), Some(REGISTER));
            assert_eq!(of("/kiroku.v1.CommandService/EraseUser"), Some(ADMIN));
            assert_eq!(of("/kiroku.v1.QueryService/GetUser"), Some(READ));
            assert_eq!(of("/kiroku.v1.QueryService/WatchEvents"), Some(WATCH));
            assert_eq!(of("/kiroku.v1.CommandService/ChangeDisplayName"), None, "no default for an unknown RPC");
            assert_eq!(of("/grpc.health.v1.Health/Check"), None);
            assert_eq!(
                (REGISTER, READ, WATCH, ADMIN),
                ("kiroku:register", "kiroku:read", "kiroku:watch", "kiroku:admin")
            );
            assert_eq!(BY_METHOD.len(), 12, "five commands and seven queries");
            assert!(ALL.iter().all(|p| BY_METHOD.iter().any(|(_, q)| q == p)) && ALL.len() == 4);
        }
    }
}

/// The encoded `FileDescriptorSet` of kiroku's protos plus `google/rpc/error_details.proto`, for server
/// reflection: with it, `grpcurl -format-error` prints error details readably.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiroku_descriptor.bin"));

/// The codec of every generated service and client: prost's, with a smaller first encode buffer.
///
/// tonic gives each response stream an encode buffer of `buffer_size` bytes when the stream starts (8 KiB by
/// default), and keeps it while the stream lives. That was most of what an idle WatchEvents subscriber costs the
/// server: measured with `cargo bench --bench watch` (`marginal_bytes_per_subscriber`), 13.2 KB each with 8 KiB,
/// against the goal of 8 KiB. One event's message is well under 1 KiB; the buffer grows when a stream is busy
/// (a replay batches up to the yield threshold, 32 KiB, per write).
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::ProstCodec;

    /// The first encode buffer of a stream, in bytes.
    pub const ENCODE_BUFFER: usize = 1024;
    /// How much a stream encodes before handing it to the transport (tonic's default).
    pub const YIELD_THRESHOLD: usize = 32 * 1024;

    /// See the module documentation.
    #[derive(Debug, Clone, Copy)]
    pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for LeanCodec<T, U> {
        fn default() -> Self {
            LeanCodec(PhantomData)
        }
    }

    impl<T, U> Codec for LeanCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
        type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
        }
    }
}
