//! Clients in other languages, from their own packages, against the real
//! agent, each on the Unix socket and on TCP over TLS (with a client
//! certificate, which the agent's policy makes an administrator) with its
//! library's defaults and the
//! service taken from the repository's `.proto` at test time: Python's
//! grpcio (grpc-core's HTTP/2; it sends the socket path as the request
//! authority, which the agent must accept) and Node's @grpc/grpc-js (an
//! HTTP/2 stack of its own). Each runs a whole session: admin calls, lock,
//! try-lock, blocking callback, value block, conversion, timeout, cancel,
//! deadlock victim, typed rejection, dump, forced release. And the
//! repository's own Python client (`dlm-agent/clients/python`), installed
//! with pip from its path.
//! `cargo xtask setup` installs both; without one the test says so and
//! skips, and under `CI=true` that is a failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Agent, TestPki, free_port, path_str, under_ci, wait_with_timeout};

/// Whether `python3` can import every module named.
fn python_has(modules: &[&str]) -> bool {
    let import = format!("import {}", modules.join(", "));
    Command::new("python3").args(["-c", &import]).output().is_ok_and(|out| out.status.success())
}

/// Whether `node` runs and the npm packages of `tests/clients` are installed.
fn node_has_grpc_js() -> bool {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/node_modules/@grpc/grpc-js");
    let node = Command::new("node").arg("--version").output().is_ok_and(|out| out.status.success());
    node && modules.exists()
}

/// Runs a client script against a fresh agent, on its Unix socket and then
/// on its TCP listener; the script's closing line counts the checks that
/// passed.
fn run_client(tag: &str, program: &str, script: &str, python_path: Option<&Path>, min_checks: u32) {
    let tcp = format!("127.0.0.1:{}", free_port());
    let pki = TestPki::new(tag);
    let (cert, key) = pki.issue("admin.client");
    let config = format!(
        "tcp = \"{tcp}\"\n[access]\nadmins = [\"uid:0\", \"cert:admin.client\"]\n{}",
        pki.tls_section("agent.test")
    );
    let mut agent = Agent::start(tag, &config);
    let tls = [
        ("DLM_TLS_CA", path_str(&pki.ca()).to_string()),
        ("DLM_TLS_CERT", path_str(&cert).to_string()),
        ("DLM_TLS_KEY", path_str(&key).to_string()),
        ("DLM_TLS_NAME", "agent.test".to_string()),
    ];
    for target in [format!("unix:{}", path_str(&agent.socket)), tcp] {
        run_script(&agent, tag, (program, script, python_path), &target, &tls, min_checks);
    }
    assert!(agent.terminate().success());
}

fn run_script(
    agent: &Agent,
    tag: &str,
    client: (&str, &str, Option<&Path>),
    target: &str,
    tls: &[(&str, String)],
    min_checks: u32,
) {
    let (program, script, python_path) = client;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto = root.join("../dlm-proto/proto");
    let mut command = Command::new(program);
    command.envs(tls.iter().map(|(k, v)| (*k, v.as_str())));
    if let Some(path) = python_path {
        command.env("PYTHONPATH", path);
    }
    let mut child = command
        .arg(root.join("clients").join(script))
        .arg(target)
        .arg(path_str(&proto))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let status = wait_with_timeout(&mut child, Duration::from_secs(120)).expect("the client finishes in 2 minutes");
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "the {tag} client on {target} failed:\n{stdout}\n{stderr}\nagent log:\n{}", agent.log());
    let passed = stdout.lines().find_map(|l| l.strip_suffix(" passed, 0 failed")).expect("a count of checks");
    assert!(passed.parse::<u32>().expect("a number") >= min_checks, "{stdout}");
    println!("{tag} on {target}: {}", stdout.trim());
}

/// Whether a client's runtime and packages are there; if not, says so (a
/// failure under CI).
fn available(what: &str, present: bool) -> bool {
    if !present {
        assert!(!under_ci(), "{what} is required under CI=true (cargo xtask setup installs it)");
        eprintln!("skipping: {what} is not installed (cargo xtask setup installs it)");
    }
    present
}

#[test]
fn python_grpcio_runs_a_whole_session_on_the_unix_socket_and_tcp() {
    if available("python3 with grpcio and grpcio-tools", python_has(&["grpc", "grpc_tools"])) {
        run_client("python-grpcio", "python3", "python_grpc.py", None, 25);
    }
}

#[test]
fn node_grpc_js_runs_a_whole_session_on_the_unix_socket_and_tcp() {
    if available("node with @grpc/grpc-js", node_has_grpc_js()) {
        run_client("node-grpc-js", "node", "node_grpc.js", None, 25);
    }
}

#[test]
fn the_repository_python_client_installs_with_pip_and_runs_a_session() {
    if !available("python3 with grpcio and grpcio-tools", python_has(&["grpc", "grpc_tools", "setuptools"])) {
        return;
    }
    let target = support::Scratch::new("python-client");
    support::python::install_package(&target);
    run_client("python-package", "python3", "python_package.py", Some(target.path()), 17);
}

/// The Python package's asyncio API (`dlm_client.aio`), installed with pip
/// from a wheel built from the repository (as a user would ship it), on
/// the Unix socket and TCP; then its example (`examples/asyncio_lock.py`).
#[test]
fn the_python_clients_asyncio_api_runs_from_a_built_wheel() {
    if !available("python3 with grpcio and grpcio-tools", python_has(&["grpc", "grpc_tools", "setuptools"])) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let package = root.join("../dlm-agent/clients/python");
    let scratch = support::Scratch::new("python-wheel");
    let (wheels, target) = (scratch.join("wheels"), scratch.join("site"));
    let pip = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("python3")
            .args(["-m", "pip", "--disable-pip-version-check", "--quiet"])
            .args(args)
            .output()
            .expect("pip runs");
        assert!(out.status.success(), "pip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let one_build = support::python::one_build();
    pip(&[
        "wheel".as_ref(),
        "--no-deps".as_ref(),
        "--no-build-isolation".as_ref(),
        "-w".as_ref(),
        wheels.as_os_str(),
        package.as_os_str(),
    ]);
    let wheel = std::fs::read_dir(&wheels)
        .expect("the wheel directory")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "whl"))
        .expect("a wheel was built");
    drop(one_build);
    pip(&[
        "install".as_ref(),
        "--no-deps".as_ref(),
        "--root-user-action=ignore".as_ref(),
        "--target".as_ref(),
        target.as_os_str(),
        wheel.as_os_str(),
    ]);
    assert!(target.join("dlm_client/py.typed").exists(), "the wheel ships its type hints");
    run_client("python-asyncio", "python3", "python_asyncio.py", Some(&target), 16);

    let mut agent = Agent::start("python-example", "");
    let example = Command::new("python3")
        .arg(package.join("examples/asyncio_lock.py"))
        .arg(format!("unix:{}", path_str(&agent.socket)))
        .env("PYTHONPATH", &target)
        .output()
        .expect("the example runs");
    let printed = String::from_utf8_lossy(&example.stdout);
    assert!(example.status.success(), "{printed}{}", String::from_utf8_lossy(&example.stderr));
    for line in
        ["held orders/42 under fencing token", "a try-lock meanwhile gets None", "raises TimedOut", "holds it in pr"]
    {
        assert!(printed.contains(line), "the example prints {line:?}:\n{printed}");
    }
    assert!(agent.terminate().success());
}

/// The quotas a client meets, from a client in another language
/// (`python_quota.py`, `node_quota.js`): connections past
/// `connections_per_client_max` and sessions past `sessions_per_uid_max`
/// are refused at once, typed, naming the limit; sessions multiplexed on
/// one connection go past HTTP/2's stream limit of old (1,024, where the
/// 1,025th waited for ever). Each refusal is counted; each episode logged
/// once.
fn run_quota_script(tag: &str, program: &str, script: &str) {
    const SESSIONS: u32 = 1100;
    const CONNECTIONS: u32 = 12;
    let config = format!("[limits]\nsessions_per_uid_max = {SESSIONS}\nconnections_per_client_max = {CONNECTIONS}\n");
    let mut agent = Agent::start(tag, &config);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(program)
        .arg(root.join("clients").join(script))
        .arg(format!("unix:{}", path_str(&agent.socket)))
        .arg(root.join("../dlm-proto/proto"))
        .args([SESSIONS.to_string(), CONNECTIONS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let status = wait_with_timeout(&mut child, Duration::from_secs(120)).expect("the client finishes in 2 minutes");
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "the {tag} client failed:\n{stdout}\n{stderr}\nagent log:\n{}", agent.log());
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    let (_, metrics) = support::http_get(&agent.http, "/metrics").expect("metrics");
    let refused = |limit: &str| {
        let line = format!("dlm_client_refused_total{{limit=\"{limit}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(line.as_str())).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    let connections_refused = refused("connections_per_client_max");
    assert!(connections_refused >= 4, "every refused connection counted:\n{metrics}");
    assert_eq!(refused("sessions_per_uid_max"), 3, "every refused session counted");
    let log = agent.log();
    assert_eq!(log.matches("refusing new sessions of a uid").count(), 1, "one episode, one warning:\n{log}");
    // One episode while the 16 connect; the second part may start one
    // more while the first part's connections close.
    let warned = log.matches("refusing new client connections").count() as u64;
    assert!((1..=2).contains(&warned) && warned < connections_refused, "{warned} warnings:\n{log}");
    println!("{tag}: {}", stdout.trim());
    assert!(agent.terminate().success());
}

#[test]
fn python_grpcio_is_told_at_once_when_it_goes_past_a_session_or_connection_quota() {
    if available("python3 with grpcio and grpcio-tools", python_has(&["grpc", "grpc_tools"])) {
        run_quota_script("python-quota", "python3", "python_quota.py");
    }
}

#[test]
fn node_grpc_js_is_told_at_once_when_it_goes_past_a_session_or_connection_quota() {
    if available("node with @grpc/grpc-js", node_has_grpc_js()) {
        run_quota_script("node-quota", "node", "node_quota.js");
    }
}

/// The Rust client crate's example (`dlm-client/examples/lock.rs`), its
/// code compiled into this test (an example `cargo test` builds is a test
/// harness, not the program), against a real agent.
#[path = "../dlm-client/examples/lock.rs"]
#[expect(dead_code, reason = "the example's `main` is the program's, not the test's")]
mod lock_example;

#[tokio::test]
async fn the_rust_client_crates_example_takes_a_lock_on_a_real_agent() {
    let mut agent = Agent::start("rust-example", "");
    let token = lock_example::take_lock(path_str(&agent.socket), "orders/42").await.expect("the example's lock");
    assert!(token > 0, "token {token}");
    assert!(agent.terminate().success());
}
