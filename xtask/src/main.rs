//! `cargo xtask`: the developer and CI entry points of the dlm workspace.
//!
//! Each command first sets up what it needs on a fresh machine (rustup
//! components, the nightly `rust-src` and bpf-linker for the eBPF programs,
//! Debian packages), then runs.

use std::process::{Command, ExitCode};

mod cluster;
mod fuzz;
mod overhead;
mod provenance;
mod setup;

const HELP: &str = "\
cargo xtask <COMMAND> [ARGS]

Commands:
  run [ARGS]   set up, build the agent (release) and run it: `dlm-agent run ARGS`
               (no ARGS: single node on the embedded default configuration)
  setup        install what the build, tests and benchmarks need (rustup components: rustfmt,
               clippy, nightly rust-src; bpf-linker and cargo-fuzz from crates.io; the Debian
               packages listed below; grpcio from PyPI and @grpc/grpc-js from npm)
  provenance   set up, build, and check that every library the build links and every program
               the tests start comes from a Debian package the set-up installs (or pulls in) or
               the machine image ships; fails naming the package otherwise
  test         set up, then check formatting, run clippy, check provenance, run every test of
               the workspace and build the docs (warnings are errors)
  bench [ARGS] set up, then run every benchmark: the engine's (criterion, memory; recovery
               of 100,000 and 1,000,000 locks) and dlm side by side with Redis and etcd, unpinned
               and on one CPU, each cell 3 times (table on stdout, JSON in
               target/bench/peers.json), and a 3-node cluster against a single node
               (target/bench/cluster.json), and failover with corosync beside Redis and etcd
               (target/bench/failover.json; needs root), and 3, 5 and 8 nodes with corosync
               (target/bench/scale.json; needs root), and lock+unlock pairs through each client:
               Rust, dlm's libdlm, Python sync and asyncio (target/bench/clients.json);
               ARGS go to `cargo bench`
  dashboards   set up, run the dashboard check against a live Prometheus with a longer workload,
               and plot each dashboard from the real results to dashboards/pictures/<uid>.png
               (needs matplotlib: installed from PyPI if missing)
  overhead [--rounds N] [--loops N] [--families LIST]
               set up, then measure what the agent's eBPF programs cost: `perf bench sched pipe`
               pinned to CPU 0, in turn without the agent, with it idle, and with it while a
               client holds a lock (default 9 rounds of 200000 loops; --families locks,sched,...
               overrides the agent's default set); prints the slowdowns and each program's
               ns/event (BPF run statistics) beside what an empty program reads there (bpftrace),
               JSON in target/bench/ebpf-overhead.json; needs root
  sim [--seeds N] [--start S] [--record FILE] | --seed S
               run the deterministic cluster simulation over many seeds (default 10000 from 0;
               the test command runs 1000); a failure prints the seed, `--seed S` replays it;
               --record writes each seed's report (counts and a digest of every effect and
               message), the form of dlm-core/testdata/sim-reports.txt
  cluster up [--nodes N] [--token MS] [--static [--base-port P]] [--ebpf] | down | status
               start N nodes (default 3), each in its own network namespace (10.77.0.i) on a
               bridge with its own corosync (token MS, default 1000) and an agent taking its
               membership from it (needs root); prints how to reach each node and how to fail
               one. --static: agents on loopback with a static member list instead (ports P+i
               for peers, P+100+i for HTTP; default P 17400; no root, no recovery). `down`
               stops everything and removes the namespaces (eBPF off unless --ebpf)
  nemesis [--duration D] [--seed S]
               set up, then run the nemesis (tests/nemesis.rs) for D (90s, 30m, 2h; default 10m):
               clients on 3 corosync nodes while agents are killed, links cut, agents paused;
               prints what was injected and checked (needs root; the test command runs 60 s)
  fuzz [--time T] [--runs N] [--sanitizer none|address]
               set up, then run each fuzz target of tests/fuzz (framed frames, client messages
               through to the engine, the peer wire format with its hello, the TOML configuration)
               for T (default 60s) or N inputs, from the seed corpus; prints executions and
               crashes per target (the test command runs each for 10 s). --sanitizer address:
               with ASan (slower; default none)
  help         print this help

Environment:
  CI=true      tests that need something this machine lacks fail instead of skipping
";

/// The help text, with the Debian packages the set-up installs.
fn help() -> String {
    let mut text = HELP.to_string();
    text.push_str("\nDebian packages the set-up installs:\n");
    for (package, why) in setup::PACKAGES {
        text.push_str(&format!("  {package:<19}{why}\n"));
    }
    text
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| "help".to_string());
    let rest: Vec<String> = args.collect();
    let result = match command.as_str() {
        "setup" => setup::run(),
        "run" => setup::run().and_then(|()| run_agent(&rest)),
        "test" => setup::run_with("ci-test").and_then(|()| test()),
        "bench" => setup::run().and_then(|()| bench(&rest)),
        "dashboards" => setup::run().and_then(|()| dashboards()),
        "overhead" => setup::run().and_then(|()| overhead::run(&rest)),
        "sim" => sim(&rest),
        "nemesis" => setup::run().and_then(|()| nemesis(&rest)),
        "fuzz" => setup::run().and_then(|()| fuzz::run(&rest)),
        "cluster" => cluster::run(&rest),
        "provenance" => setup::run().and_then(|()| provenance()),
        "help" | "-h" | "--help" => {
            print!("{}", help());
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n\n{}", help())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a step, echoing it first so a CI log shows what failed.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), String> {
    eprintln!("xtask: $ {program} {}", args.join(" "));
    let mut command = if program == "cargo" { cargo() } else { Command::new(program) };
    let status = command.args(args).status().map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`{program} {}` failed ({status})", args.join(" "))) }
}

/// A cargo command. Under CI (`CI` set) without incremental compilation:
/// a clean clone's build gains nothing from it, and its state would be
/// about 3 GB more on the disk that the whole run shares (a full disk
/// failed a CI run).
pub(crate) fn cargo() -> Command {
    let mut command = Command::new("cargo");
    if std::env::var_os("CI").is_some() {
        command.env("CARGO_INCREMENTAL", "0");
    }
    command
}

/// The simulation runs with the test profile: optimised, with the engine's
/// full invariant checks (debug assertions) after every event.
fn sim(args: &[String]) -> Result<(), String> {
    let mut full = vec![
        "run",
        "--locked",
        "--profile",
        "ci-test",
        "--package",
        "dlm-core",
        "--features",
        "sim",
        "--example",
        "sim",
        "--",
    ];
    full.extend(args.iter().map(String::as_str));
    run("cargo", &full)
}

fn test() -> Result<(), String> {
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    let accounted = provenance::Accounted::read()?;
    // clippy runs the build scripts, whose `-l` flags the guard checks
    // before anything links: a missing library is named, not left to the
    // linker.
    let clippy = provenance::cargo_messages(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--message-format=json",
        "--",
        "-D",
        "warnings",
    ])?;
    provenance::guard_sources(&clippy, &accounted)?;
    // Release mode: the property tests and the simulation run many cases,
    // and debug assertions stay on through the test profile below.
    // --all-targets also runs the benchmarks once each as tests (the memory
    // benchmark checks its target then); doc tests need their own run.
    provenance::guard_binaries(&accounted)?;
    run("cargo", &["test", "--workspace", "--all-targets", "--locked", "--profile", "ci-test"])?;
    run("cargo", &["test", "--workspace", "--doc", "--locked", "--profile", "ci-test"])?;
    // A short smoke of every fuzz target: each decoder of untrusted input
    // takes 10 s of coverage-guided inputs without a crash.
    let smoke: Vec<fuzz::Outcome> =
        fuzz::TARGETS.iter().map(|t| fuzz::run_target(t, &fuzz::SMOKE)).collect::<Result<_, _>>()?;
    fuzz::report(&smoke)?;
    // The crate docs must build without broken links.
    eprintln!("xtask: $ RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps --locked");
    let status = cargo()
        .args(["doc", "--workspace", "--no-deps", "--locked"])
        .env("RUSTDOCFLAGS", "-D warnings")
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err("cargo doc reported warnings".into()) }
}

/// `cargo xtask provenance`: the guard of the test command on its own,
/// over a build of the agent and the tests.
fn provenance() -> Result<(), String> {
    let accounted = provenance::Accounted::read()?;
    let checked =
        provenance::cargo_messages(&["check", "--workspace", "--all-targets", "--locked", "--message-format=json"])?;
    provenance::guard_sources(&checked, &accounted)?;
    provenance::guard_binaries(&accounted)
}

fn run_agent(args: &[String]) -> Result<(), String> {
    let mut full = vec!["run", "--release", "--locked", "--package", "dlm-agent", "--", "run"];
    full.extend(args.iter().map(String::as_str));
    run("cargo", &full)
}

fn dashboards() -> Result<(), String> {
    let has_matplotlib = Command::new("python3").args(["-c", "import matplotlib"]).status().is_ok_and(|s| s.success());
    if !has_matplotlib {
        run("python3", &["-m", "pip", "install", "--quiet", "matplotlib"])?;
    }
    let data = "target/dashboards";
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create {data}: {e}"))?;
    // The test runs in its package's directory: give it an absolute path.
    let absolute = std::fs::canonicalize(data).map_err(|e| format!("{data}: {e}"))?;
    // The test runs the agent binary, which only a build of dlm-agent's
    // own targets makes (see `tests/support.rs`): build it first.
    run("cargo", &["build", "--locked", "--package", "dlm-agent", "--bin", "dlm-agent"])?;
    let status = cargo()
        .args(["test", "--locked", "--package", "dlm-tests", "--test", "dashboards", "every_panel"])
        .env("DLM_DASHBOARD_DATA", absolute)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("the dashboard check failed".into());
    }
    run("python3", &["dashboards/render.py", data, "dashboards/pictures"])
}

/// The seconds in a flag's value: `90`, `90s`, `30m`, `2h`.
pub(crate) fn seconds_of(flag: &str, value: Option<&String>) -> Result<u64, String> {
    let text = value.ok_or_else(|| format!("{flag} needs a value (90s, 30m, 2h)"))?;
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let number: u64 = number.parse().map_err(|_| format!("{flag} {text}: not a duration"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{flag} {text}: use s, m or h")),
    };
    Ok(number * scale)
}

/// Runs the nemesis test for `--duration D` (`90s`, `30m`, `2h`; default 10m).
fn nemesis(args: &[String]) -> Result<(), String> {
    let mut seconds = 600u64;
    let mut seed = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--duration" => seconds = seconds_of("--duration", args.next())?,
            "--seed" => seed = Some(args.next().ok_or("--seed needs a number")?.clone()),
            other => {
                return Err(format!("unknown option {other:?}; usage: cargo xtask nemesis [--duration D] [--seed S]"));
            }
        }
    }
    // The test runs the agent binary a build of dlm-agent's own targets makes.
    run("cargo", &["build", "--locked", "--package", "dlm-agent", "--bin", "dlm-agent"])?;
    let mut command = cargo();
    command
        .args(["test", "--locked", "--package", "dlm-tests", "--test", "nemesis", "--", "--nocapture"])
        .env("DLM_NEMESIS_SECONDS", seconds.to_string());
    if let Some(seed) = seed {
        command.env("DLM_NEMESIS_SEED", seed);
    }
    let status = command.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err("the nemesis found a violation (see above)".into()) }
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut full =
        vec!["bench", "--package", "dlm-core", "--package", "dlm-agent", "--package", "dlm-tests", "--locked"];
    full.extend(args.iter().map(String::as_str));
    run("cargo", &full)
}
