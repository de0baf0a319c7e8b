//! Installs what the workspace's build, tests and benchmarks need,
//! idempotently: rustup components of the installed toolchains, bpf-linker
//! from crates.io, Debian packages, and PyPI packages for the tests of
//! clients in other languages. Nothing else is downloaded.

use std::process::Command;

/// Rustup components of the active toolchain that `cargo xtask test` uses.
const COMPONENTS: &[&str] = &["rustfmt", "clippy"];

/// Debian packages, and why each is needed. The README lists the same
/// (a test checks it), and `cargo xtask provenance` checks that the build
/// and the tests use nothing from any other package but the image's.
pub(crate) const PACKAGES: &[(&str, &str)] = &[
    ("protobuf-compiler", "protoc, for the etcd client the peer benchmark uses"),
    ("libprotobuf-dev", "protobuf's well-known .proto files, for the same"),
    ("redis-server", "the peer benchmark's Redis"),
    ("etcd-server", "the peer benchmark's etcd"),
    ("prometheus", "Prometheus and promtool, for the dashboard and alert rule checks"),
    ("bpftrace", "the test that traces the agent's probe points"),
    ("linux-perf", "perf bench sched pipe, for the eBPF overhead benchmark"),
    ("corosync", "the cluster stack the agent takes membership from, for the cluster tests and `cluster up`"),
    ("libcpg-dev", "corosync's CPG library, which the agent links (membership)"),
    ("libquorum-dev", "corosync's quorum library, which the agent links (membership)"),
    ("libvotequorum-dev", "corosync's votequorum library, which the agent links (quorum, expected votes)"),
    ("libcmap-dev", "corosync's configuration map library, which the agent links (rust-corosync links it)"),
    ("libcfg-dev", "corosync's configuration library, which the agent links (rust-corosync links it)"),
    (
        "libdlm-dev",
        "libdlm's header (libdlm.h), for programs built against dlm's libdlm, and Debian's libdlm3 to check its exports",
    ),
];

/// PyPI packages (pinned), and why each is needed.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("grpcio==1.85.3", "the Python gRPC client test (tests/clients/python_grpc.py)"),
    ("grpcio-tools==1.85.1", "the same test generates its stubs from the .proto with it"),
];

/// The programs installed with `cargo install` (pinned), and why: the
/// bpf-linker that links the eBPF programs with the nightly rustc's own LLVM
/// (see ../shared/design/TOOLCHAIN.md: 0.10.0 emits BTF the kernel rejects,
/// 0.11+ wants a system LLVM), and the cargo-fuzz that builds and runs
/// `tests/fuzz` (with the nightly toolchain).
pub(crate) const CARGO_TOOLS: &[(&str, &str, &str)] = &[
    ("bpf-linker", "0.10.4", "links the eBPF programs; about 2 minutes"),
    ("cargo-fuzz", "0.13.2", "runs the fuzz targets; under a minute"),
];

/// Sets up, with dlm's libdlm built in release.
pub(crate) fn run() -> Result<(), String> {
    run_with("release")
}

/// Sets up, building dlm's libdlm with cargo profile `profile` (the test
/// command builds it with its own, whose artifacts its tests load).
pub(crate) fn run_with(profile: &str) -> Result<(), String> {
    rustup_components()?;
    ebpf_toolchain()?;
    debian_packages()?;
    python_packages()?;
    node_packages()?;
    libdlm(profile)
}

/// Builds dlm's libdlm-compatible libraries (with `profile`) and installs them as
/// shared libraries under their sonames in a directory of their own
/// (`/usr/local/lib/dlm`, or `~/.local/lib/dlm` for a user), with a
/// pkg-config file each (`dlm-libdlm`, `dlm-libdlm_lt`): a program built
/// with `pkg-config --libs dlm-libdlm` uses dlm's library; the others keep
/// the system's (the kernel DLM's) unless pointed at it by `LD_LIBRARY_PATH`.
fn libdlm(profile: &str) -> Result<(), String> {
    crate::run(
        "cargo",
        &["build", "--profile", profile, "--locked", "-p", "dlm-libdlm-threaded", "-p", "dlm-libdlm-lite"],
    )?;
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    let target =
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let root =
        Command::new("id").arg("-u").output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    let prefix = if root {
        std::path::PathBuf::from("/usr/local")
    } else {
        std::path::PathBuf::from(std::env::var("HOME").map_err(|_| "HOME is not set")?).join(".local")
    };
    let libdir = prefix.join("lib/dlm");
    let pkgconfig = prefix.join("lib/pkgconfig");
    for dir in [&libdir, &pkgconfig] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for (library, what) in [("dlm", "threaded"), ("dlm_lt", "without threads")] {
        let built = std::path::Path::new(&target).join(format!("{profile_dir}/lib{library}.so"));
        let soname = format!("lib{library}.so.3");
        let installed = libdir.join(&soname);
        let new = std::fs::read(&built).map_err(|e| format!("{}: {e}", built.display()))?;
        if std::fs::read(&installed).ok().as_deref() != Some(new.as_slice()) {
            // A new file, then renamed: programs running on the old one keep it.
            let next = libdir.join(format!(".{soname}.new"));
            std::fs::write(&next, &new).map_err(|e| format!("{}: {e}", next.display()))?;
            std::fs::rename(&next, &installed).map_err(|e| format!("{}: {e}", installed.display()))?;
            eprintln!("xtask: installed {}", installed.display());
        }
        let link = libdir.join(format!("lib{library}.so"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&soname, &link).map_err(|e| format!("{}: {e}", link.display()))?;
        let pc = format!(
            "libdir={}\n\nName: dlm-lib{library}\nDescription: dlm's libdlm-compatible library ({what}), over the local dlm agent\n\
             Version: 4.2.0\nCflags:\nLibs: -L${{libdir}} -Wl,-rpath,${{libdir}} -l{library} -lpthread\n",
            libdir.display()
        );
        let file = pkgconfig.join(format!("dlm-lib{library}.pc"));
        std::fs::write(&file, pc).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(())
}

/// Installs the npm packages of the Node client test, as its lock file pins
/// them (`tests/clients/package-lock.json`), when they are not there yet.
fn node_packages() -> Result<(), String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients");
    let lock =
        std::fs::read(format!("{dir}/package-lock.json")).map_err(|e| format!("{dir}/package-lock.json: {e}"))?;
    let installed = std::fs::read(format!("{dir}/node_modules/.package-lock.json")).unwrap_or_default();
    // npm ci records what it installed; a lock file that changed since means
    // installing again.
    let marker = format!("{dir}/node_modules/.dlm-lock");
    if !installed.is_empty() && std::fs::read(&marker).is_ok_and(|m| m == lock) {
        return Ok(());
    }
    eprintln!("xtask: installing @grpc/grpc-js and @grpc/proto-loader from npm: the Node gRPC client test");
    crate::run("npm", &["ci", "--prefix", dir, "--no-audit", "--no-fund", "--loglevel=error"])?;
    std::fs::write(&marker, lock).map_err(|e| format!("{marker}: {e}"))
}

/// Installs the pinned PyPI packages that are missing, with the `python3`
/// on the path (the one the tests run).
fn python_packages() -> Result<(), String> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|spec| {
            let (name, version) = spec.split_once("==").expect("pinned");
            let shown = Command::new("python3").args(["-m", "pip", "show", name]).output();
            !shown.is_ok_and(|out| {
                String::from_utf8_lossy(&out.stdout).lines().any(|l| l == format!("Version: {version}"))
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (package, why) in PYTHON_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("xtask: installing {package} from PyPI: {why}");
    }
    let mut args = vec!["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"];
    args.extend(&missing);
    crate::run("python3", &args)
}

/// What aya-build needs to build the eBPF programs: the nightly toolchain's
/// `rust-src` (for `-Z build-std=core`) and bpf-linker; and cargo-fuzz.
fn ebpf_toolchain() -> Result<(), String> {
    let nightly = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map_err(|e| format!("rustup not found ({e})"))?;
    if !nightly.status.success() {
        return Err("the eBPF programs build with the nightly toolchain, which is not installed \
                    (`rustup toolchain install nightly`)"
            .into());
    }
    if !String::from_utf8_lossy(&nightly.stdout).lines().any(|line| line.starts_with("rust-src")) {
        crate::run("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"])?;
    }
    for (tool, version, why) in CARGO_TOOLS {
        // cargo-fuzz answers `cargo fuzz --version`, bpf-linker its own.
        let shown = match tool.strip_prefix("cargo-") {
            Some(sub) => crate::cargo().args([sub, "--version"]).output(),
            None => Command::new(tool).arg("--version").output(),
        };
        if !shown.as_ref().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(version)) {
            eprintln!("xtask: installing {tool} {version} from crates.io ({why})");
            crate::run("cargo", &["install", &format!("{tool}@{version}"), "--locked"])?;
        }
    }
    Ok(())
}

fn rustup_components() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup not found ({e}): install Rust with rustup first"))?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    for component in COMPONENTS {
        if !installed.lines().any(|line| line.starts_with(component)) {
            crate::run("rustup", &["component", "add", component])?;
        }
    }
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn debian_packages() -> Result<(), String> {
    let missing: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (package, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("xtask: installing {package}: {why}");
    }
    let root =
        Command::new("id").arg("-u").output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    let sudo: &[&str] = if root { &[] } else { &["sudo", "--non-interactive"] };
    let apt = |args: &[&str]| {
        let mut full: Vec<&str> = sudo.to_vec();
        full.extend(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y"]);
        full.extend(args);
        crate::run(full[0], &full[1..])
    };
    apt(&["update"])?;
    let mut install = vec!["install", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install).map_err(|e| format!("{e}\n(the packages {missing:?} are needed; install them as root)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in backquotes on the README's line that starts with `label`.
    fn readme_names(label: &str) -> Vec<String> {
        let readme = include_str!("../../README.md");
        let line = readme.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no README line {label:?}"));
        line.split('`').skip(1).step_by(2).map(str::to_string).collect()
    }

    #[test]
    fn the_readme_lists_exactly_what_the_set_up_installs() {
        let mut components: Vec<&str> = COMPONENTS.to_vec();
        components.push("rust-src");
        assert_eq!(readme_names("- rustup components:"), components);
        let tools: Vec<&str> = CARGO_TOOLS.iter().map(|(name, ..)| *name).collect();
        assert_eq!(readme_names("- from crates.io"), tools);
        for (tool, version, _) in CARGO_TOOLS {
            assert!(include_str!("../../README.md").contains(&format!("`{tool}` {version}")), "{tool} {version}");
        }
        let packages: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        assert_eq!(readme_names("- Debian packages:"), packages);
        let python: Vec<&str> = PYTHON_PACKAGES.iter().map(|(p, _)| p.split("==").next().expect("name")).collect();
        assert_eq!(readme_names("- from PyPI"), python);
        let manifest = include_str!("../../tests/clients/package.json");
        let npm: Vec<String> = readme_names("- from npm").into_iter().filter(|n| n.starts_with('@')).collect();
        for name in &npm {
            assert!(manifest.contains(&format!("\"{name}\"")), "{name} is not in tests/clients/package.json");
        }
        assert_eq!(npm.len(), manifest.matches("\"@").count(), "npm packages: README {npm:?}");
    }
}
