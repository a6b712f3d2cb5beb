//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and tonic-prost-build.
//!
//! Three outputs: Rust code for package `kiroku.v1`; a descriptor set for server reflection that also holds
//! `google/rpc/error_details.proto`, so that grpcurl can decode the error details kiroku sends; and the table of
//! each RPC's permission, read from its `(kiroku.v1.permission)` option (an RPC without one fails the build).

use std::path::PathBuf;

use protox::prost::Message as _;

const KIROKU_PROTOS: &[&str] = &[
    "proto/kiroku/v1/options.proto",
    "proto/kiroku/v1/event.proto",
    "proto/kiroku/v1/command.proto",
    "proto/kiroku/v1/query.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut reflected: Vec<&str> = KIROKU_PROTOS.to_vec();
    reflected.push("proto/google/rpc/error_details.proto");
    let reflection_set = protox::compile(&reflected, ["proto"])?;
    std::fs::write(out_dir.join("kiroku_descriptor.bin"), reflection_set.encode_to_vec())?;

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true);
    compiler.open_files(KIROKU_PROTOS)?;
    std::fs::write(out_dir.join("permissions.rs"), permissions(&compiler.descriptor_pool())?)?;

    let codegen_set = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Prost's codec with a smaller first encode buffer per stream (see `src/lib.rs`, `codec`).
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(codegen_set)?;
    Ok(())
}

/// `permissions.rs`: each RPC's path with its permission, every permission once, and a constant for each
/// (`kiroku:register` is `REGISTER`).
fn permissions(pool: &protox::prost_reflect::DescriptorPool) -> Result<String, Box<dyn std::error::Error>> {
    let option = pool.get_extension_by_name("kiroku.v1.permission").ok_or("no (kiroku.v1.permission) option")?;
    let mut by_method = String::new();
    let mut all: Vec<String> = Vec::new();
    for service in pool.services().filter(|s| s.package_name() == "kiroku.v1") {
        for method in service.methods() {
            let options = method.options();
            let value = options.get_extension(&option);
            let permission = value
                .as_str()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format!("{} declares no (kiroku.v1.permission)", method.full_name()))?;
            by_method.push_str(&format!("    (\"/{}/{}\", {permission:?}),\n", service.full_name(), method.name()));
            if !all.iter().any(|p| p == permission) {
                all.push(permission.to_owned());
            }
        }
    }
    let mut out = String::from("/// Each RPC's path (`/kiroku.v1.QueryService/GetUser`) with its permission.\n");
    out.push_str(&format!("pub const BY_METHOD: &[(&str, &str)] = &[\n{by_method}];\n"));
    out.push_str("/// Every permission (for development tokens).\n");
    out.push_str(&format!("pub const ALL: [&str; {}] = {all:?};\n", all.len()));
    for permission in &all {
        let name = permission.rsplit(':').next().unwrap_or(permission).to_uppercase().replace('-', "_");
        let methods: Vec<&str> = by_method
            .lines()
            .filter(|line| line.contains(&format!("{permission:?}")))
            .filter_map(|line| line.split('/').nth(2)?.split('"').next())
            .collect();
        out.push_str(&format!("/// {}.\npub const {name}: &str = {permission:?};\n", methods.join(", ")));
    }
    Ok(out)
}
