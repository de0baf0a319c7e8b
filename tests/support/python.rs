//! The repository's Python client package, installed for the tests and
//! benchmarks that run it.

use std::path::Path;
use std::process::Command;

/// Builds of the Python package one at a time: a build writes its
/// generated messages and `build/` into the package's directory.
pub fn one_build() -> std::sync::MutexGuard<'static, ()> {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    BUILD.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Installs the repository's Python client package (`dlm-agent/clients/python`)
/// into `target` with pip, as a user would from a checkout (without build
/// isolation: the build needs grpcio-tools, which the set-up installed, and
/// nothing is fetched).
pub fn install_package(target: &Path) {
    let _one_build = one_build();
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dlm-agent/clients/python");
    let _ = std::fs::remove_dir_all(target);
    let installed = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"])
        .args(["--disable-pip-version-check", "--root-user-action=ignore", "--target"])
        .arg(target)
        .arg(&package)
        .output()
        .expect("pip runs");
    assert!(installed.status.success(), "pip install failed: {}", String::from_utf8_lossy(&installed.stderr));
}
