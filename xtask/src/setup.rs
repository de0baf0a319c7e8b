//! Installs what the workspace's build and tests need, idempotently, from
//! rustup components only (later also Debian packages and crates.io tools).

use std::process::Command;

/// Rustup components of the active toolchain that `cargo xtask test` uses.
const COMPONENTS: &[&str] = &["rustfmt", "clippy"];

pub(crate) fn run() -> Result<(), String> {
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
