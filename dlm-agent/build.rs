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
    let log = Path::new(&std::env::var("OUT_DIR")?).join("ebpf-build.log");
    let built = quietly(&log, || aya_build::build_ebpf([package], aya_build::Toolchain::default()))?;
    if let Err(error) = built {
        // Only now does the nested build's output matter: show it.
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        print!("{output}");
        return Err(format!("building the eBPF programs failed ({error:#}); run `cargo xtask setup`").into());
    }
    Ok(())
}

/// Runs `build` with this script's standard output going to `log`, then
/// passes on to cargo only the instructions in it that are not warnings.
/// aya-build relays every line of the nested eBPF build (each "Compiling
/// ...") as a `cargo:warning`, which cargo shows on every build; they are
/// kept in `log` and shown only when the build fails.
fn quietly<T>(log: &Path, build: impl FnOnce() -> T) -> std::io::Result<T> {
    use std::io::Write as _;
    use std::os::fd::AsFd as _;
    let file = std::fs::File::create(log)?;
    std::io::stdout().flush()?;
    let saved = rustix::io::dup(std::io::stdout().as_fd())?;
    rustix::stdio::dup2_stdout(&file)?;
    let result = build();
    std::io::stdout().flush()?;
    rustix::stdio::dup2_stdout(&saved)?;
    for line in std::fs::read_to_string(log)?.lines() {
        if line.starts_with("cargo:") && !line.starts_with("cargo:warning=") {
            println!("{line}");
        }
    }
    Ok(result)
}
