//! Clients in other languages, from their own packages, against the real
//! agent: Python's grpcio on the Unix socket with its defaults (stubs
//! generated from the repository's `.proto` at test time). grpcio sends the
//! socket path as the request authority, which the agent must accept.
//! `cargo xtask setup` installs grpcio; without it the test says so and
//! skips, and under `CI=true` that is a failure.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{Agent, path_str, under_ci, wait_with_timeout};

/// Whether `python3` can import every module named.
fn python_has(modules: &[&str]) -> bool {
    let import = format!("import {}", modules.join(", "));
    Command::new("python3").args(["-c", &import]).output().is_ok_and(|out| out.status.success())
}

#[test]
fn python_grpcio_runs_a_whole_session_on_the_unix_socket() {
    if !python_has(&["grpc", "grpc_tools"]) {
        assert!(!under_ci(), "python3 with grpcio and grpcio-tools is required under CI=true (cargo xtask setup)");
        eprintln!("skipping: python3 has no grpcio or grpcio-tools (cargo xtask setup installs them)");
        return;
    }
    let mut agent = Agent::start("python-grpc", "");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("clients/python_grpc.py");
    let proto = root.join("../dlm-agent/proto");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&agent.socket)
        .arg(path_str(&proto))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let status = wait_with_timeout(&mut child, Duration::from_secs(120)).expect("the client finishes in 2 minutes");
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "the Python client failed:\n{stdout}\n{stderr}\nagent log:\n{}", agent.log());
    let passed = stdout.lines().find_map(|l| l.strip_suffix(" passed, 0 failed")).expect("a count of checks");
    assert!(passed.parse::<u32>().expect("a number") >= 25, "{stdout}");
    println!("python grpcio: {}", stdout.trim());
    assert!(agent.terminate().success());
}
