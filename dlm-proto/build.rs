//! Generates the gRPC messages, client and server from `proto/` with
//! protox, a protobuf compiler in Rust, so the build needs no `protoc` on
//! the machine. No transport: the client and the agent bring their own.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["dlm/v1/dlm.proto"], ["proto"])?;
    tonic_prost_build::configure().build_transport(false).compile_fds(descriptors)?;
    Ok(())
}
