//! Compiles `videocall/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "videocall/v1/types.proto",
    "videocall/v1/call.proto",
    "videocall/v1/business.proto",
    "videocall/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=videocall");
    let fds = protox::compile(PROTOS, ["."])?;

    // Kept for gRPC server reflection.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("videocall_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}
