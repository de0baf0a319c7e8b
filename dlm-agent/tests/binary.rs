//! The binary on its own, no agent running. The tests that run agents are
//! the workspace's `tests/` package; they run the binary cargo builds for
//! this package's tests and benchmarks, so this file also makes every
//! `cargo test` that includes dlm-agent build it.

use std::process::Command;

#[test]
fn the_binary_says_its_version() {
    let output = Command::new(env!("CARGO_BIN_EXE_dlm-agent")).arg("--version").output().expect("run");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.trim(), format!("dlm-agent {}", env!("CARGO_PKG_VERSION")));
}
