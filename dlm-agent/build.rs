//! Generates the gRPC client and server from `proto/` with protox, a protobuf
//! compiler in Rust, so the build needs no `protoc` on the machine; and builds
//! the eBPF programs of `../dlm-ebpf` for the BPF target with aya-build
//! (nightly `rust-src` and `bpf-linker`, which `cargo xtask setup` installs).

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["dlm/v1/dlm.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;

    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../dlm-ebpf").canonicalize()?;
    let ebpf_dir = ebpf_dir.to_str().ok_or("the dlm-ebpf path is not UTF-8")?;
    let package = aya_build::Package { name: "dlm-ebpf", root_dir: ebpf_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .map_err(|error| format!("building the eBPF programs failed ({error:#}); run `cargo xtask setup`"))?;
    Ok(())
}
