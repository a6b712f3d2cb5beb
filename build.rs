//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and tonic-prost-build.
//!
//! Two outputs: Rust code for package `kiroku.v1`, and a descriptor set for server reflection that also holds
//! `google/rpc/error_details.proto`, so that grpcurl can decode the error details kiroku sends.

use std::path::PathBuf;

use protox::prost::Message as _;

const KIROKU_PROTOS: &[&str] =
    &["proto/kiroku/v1/event.proto", "proto/kiroku/v1/command.proto", "proto/kiroku/v1/query.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut reflected: Vec<&str> = KIROKU_PROTOS.to_vec();
    reflected.push("proto/google/rpc/error_details.proto");
    let reflection_set = protox::compile(&reflected, ["proto"])?;
    std::fs::write(out_dir.join("kiroku_descriptor.bin"), reflection_set.encode_to_vec())?;

    let codegen_set = protox::compile(KIROKU_PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Prost's codec with a smaller first encode buffer per stream (see `src/lib.rs`, `codec`).
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(codegen_set)?;
    Ok(())
}
