//! Compiles `proto/amalgam.proto` (needs `protoc`: Debian `protobuf-compiler` + `libprotobuf-dev`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = proto_dir.join("amalgam.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[file], &[proto_dir])?;
    Ok(())
}
