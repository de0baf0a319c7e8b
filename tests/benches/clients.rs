//! Lock+unlock pairs per second through each client, side by side in one
//! run against one agent: the Rust client (`dlm-client`, a framed session,
//! in this process), dlm's libdlm (`tests/libdlm/pairs.c`, linked -ldlm_lt,
//! `dlm_ls_lock_wait` + `dlm_ls_unlock_wait`), the Python package's
//! synchronous API and its asyncio API (`dlm_client.aio`). One client at a
//! time, one resource, EX, each pair waiting for its grant and its unlock.
//!
//! `cargo bench -p dlm-tests --bench clients` (part of `cargo xtask bench`)
//! runs each for 2 s, 5 times, interleaved, and prints the medians with
//! their spread (min–max) and each as a ratio to the Rust client's; JSON in
//! `target/bench/clients.json`. Every process is unpinned: on this 2-CPU
//! machine the agent and the client share both CPUs (a pair is two
//! round trips between two processes: the cross-CPU wake-ups dominate).
//! Without `--bench` (as `cargo test --benches` runs it) each client runs
//! once for 0.2 s: a check that the harness works, not a measurement.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dlm_agent::client::{Client, LockOptions, Target};
use dlm_core::Mode;
use serde_json::json;
use support::Agent;

/// Python's pairs loop, synchronous API: `SECONDS TARGET`.
const PYTHON_SYNC: &str = r#"
import sys, time, dlm_client
seconds, target = float(sys.argv[1]), sys.argv[2]
with dlm_client.connect(target) as client, client.session() as session:
    pairs, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        session.lock("pairs", "ex").unlock()
        pairs += 1
print(pairs)
"#;

/// The same with `dlm_client.aio`.
const PYTHON_AIO: &str = r#"
import asyncio, sys, time
from dlm_client import aio
async def main(seconds, target):
    async with aio.connect(target) as client:
        async with await client.session() as session:
            pairs, until = 0, time.monotonic() + seconds
            while time.monotonic() < until:
                await (await session.lock("pairs", "ex")).unlock()
                pairs += 1
    print(pairs)
asyncio.run(main(float(sys.argv[1]), sys.argv[2]))
"#;

struct Plan {
    runs: usize,
    seconds: f64,
}

/// Pairs the Rust client does in `seconds`.
fn rust_pairs(agent: &Agent, seconds: f64) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = Client::connect(&Target::Unix(agent.socket.clone())).await.expect("connect");
        let session = client.session().await.expect("session");
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        let mut pairs = 0;
        while Instant::now() < until {
            let guard = session.lock("default", "pairs", Mode::Ex, LockOptions::default()).await.expect("lock");
            guard.unlock().await.expect("unlock");
            pairs += 1;
        }
        pairs
    })
}

/// Runs a client program that prints its count of pairs.
fn program_pairs(command: &mut Command) -> u64 {
    let out = command.output().expect("the client runs");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{command:?}: {printed}{}", String::from_utf8_lossy(&out.stderr));
    printed.trim().parse().unwrap_or_else(|_| panic!("{command:?} printed {printed:?}"))
}

fn median_and_spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn main() {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let plan = if bench { Plan { runs: 5, seconds: 2.0 } } else { Plan { runs: 1, seconds: 0.2 } };
    if !support::libdlm::available() {
        return;
    }
    let pairs_c = support::libdlm::compile("pairs", "dlm_lt");
    let python = support::Scratch::new("bench-python");
    support::python::install_package(&python);
    let agent = Agent::start("bench-clients", "");
    let target = format!("unix:{}", agent.socket.display());
    let seconds = plan.seconds.to_string();
    let python_run = |script: &str| {
        let mut command = Command::new("python3");
        command.args(["-c", script, &seconds, &target]).env("PYTHONPATH", python.path());
        program_pairs(&mut command) as f64
    };
    type Measure<'a> = Box<dyn Fn() -> f64 + 'a>;
    let clients: Vec<(&str, Measure)> = vec![
        ("rust (dlm-client, framed)", Box::new(|| rust_pairs(&agent, plan.seconds) as f64)),
        (
            "c (dlm's libdlm_lt)",
            Box::new(|| {
                let mut command = Command::new(&pairs_c);
                command
                    .args(["default", &seconds])
                    .env("DLM_SOCKET", &agent.socket)
                    .env("LD_LIBRARY_PATH", support::libdlm::library_dir());
                program_pairs(&mut command) as f64
            }),
        ),
        ("python sync (grpcio)", Box::new(|| python_run(PYTHON_SYNC))),
        ("python asyncio (grpc.aio)", Box::new(|| python_run(PYTHON_AIO))),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
    // Interleaved: each run measures every client once, so a noisy moment
    // of the machine falls on all of them.
    for _ in 0..plan.runs {
        for (i, (_, measure)) in clients.iter().enumerate() {
            rates[i].push(measure() / plan.seconds);
        }
    }
    let medians: Vec<(f64, f64, f64)> = rates.iter_mut().map(|r| median_and_spread(r)).collect();
    let reference = medians[0].0;
    println!("lock+unlock pairs per second, one client at a time, one resource; {} runs of {seconds} s", plan.runs);
    println!("{:<28} {:>10} {:>21} {:>8}", "client", "median", "spread", "vs rust");
    let mut rows = Vec::new();
    for ((name, _), (median, low, high)) in clients.iter().zip(&medians) {
        println!("{name:<28} {median:>10.0} {:>21} {:>7.2}x", format!("{low:.0}–{high:.0}"), median / reference);
        rows.push(
            json!({"client": name, "median": median, "min": low, "max": high, "ratio_to_rust": median / reference}),
        );
    }
    if bench {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        std::fs::create_dir_all(&dir).expect("target/bench");
        let report = json!({"runs": plan.runs, "seconds": plan.seconds, "placement": "unpinned", "clients": rows});
        std::fs::write(dir.join("clients.json"), serde_json::to_string_pretty(&report).expect("json")).expect("write");
    }
}
