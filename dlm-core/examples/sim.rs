//! Runs the cluster simulation over many seeds: `cargo xtask sim` (or
//! `cargo run --release -p dlm-core --features sim --example sim -- [--static] [--seeds N] [--start S] [--seed S] [--record FILE]`).
//! `--static` runs the seeds with static membership (no views; links cut
//! on every seed) instead of membership faults.
//!
//! `--record FILE` writes one line per seed (`seed S: <report>`, the form of
//! `dlm-core/testdata/sim-reports.txt`), so two versions of the code can be
//! compared step for step: the report's trace digest covers every effect and
//! every envelope in order.

use std::fmt::Write as _;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut start, mut seeds) = (0u64, 10_000u64);
    let mut record: Option<String> = None;
    let mut fixed = false;
    while let Some(arg) = args.next() {
        if arg == "--static" {
            fixed = true;
            continue;
        }
        if arg == "--record" {
            record = Some(args.next().unwrap_or_else(|| usage(&arg)));
            continue;
        }
        let mut value = || args.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| usage(&arg));
        match arg.as_str() {
            "--seeds" => seeds = value(),
            "--start" => start = value(),
            "--seed" => {
                start = value();
                seeds = 1;
            }
            "-h" | "--help" => usage(""),
            _ => usage(&arg),
        }
    }
    // Everything that shapes a run, so that any failure replays from this line.
    eprintln!(
        "sim: seeds {start}..{} ({seeds}); membership faults on every seed, link faults on odd seeds; three \
         nodes on seeds 0 and 1 modulo 4, five on 2 and 3; views from the real agreement over a model of corosync \
         on seeds 0 and 3 modulo 4, from the scripted layer on 1 and 2 (seed 0's shape: {:?}; seed 2's: {:?})",
        start.saturating_add(seeds),
        dlm_core::sim::seed_config(0),
        dlm_core::sim::seed_config(2)
    );
    let began = Instant::now();
    let (mut grants, mut deadlocks, mut messages, mut unavailable, mut lost) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut requests, mut faults) = (0u64, dlm_core::sim::Faults::default());
    let mut paths = dlm_core::sim::RecoveryPaths::default();
    let mut lines = String::new();
    for (i, seed) in (start..start.saturating_add(seeds)).enumerate() {
        let run = if fixed { dlm_core::sim::run_static_seed } else { dlm_core::sim::run_seed };
        match run(seed) {
            Ok(report) => {
                grants += u64::from(report.grants);
                deadlocks += u64::from(report.deadlocks);
                messages += report.messages;
                unavailable += u64::from(report.unavailable);
                lost += report.lost;
                requests += u64::from(report.requests);
                faults += report.faults;
                paths += report.paths;
                if record.is_some() {
                    let _ = writeln!(lines, "{}seed {seed}: {report}", if fixed { "static " } else { "" });
                }
            }
            Err(error) => {
                let how = if fixed { "--static " } else { "" };
                eprintln!("FAILED {error}\nreplay: cargo xtask sim {how}--seed {seed}");
                std::process::exit(1);
            }
        }
        if (i + 1) % 1000 == 0 {
            eprintln!("{} seeds ok ({:.1}s)", i + 1, began.elapsed().as_secs_f64());
        }
    }
    if let Some(path) = record {
        if let Err(error) = std::fs::write(&path, lines) {
            eprintln!("cannot write {path}: {error}");
            std::process::exit(1);
        }
        eprintln!("reports written to {path}");
    }
    println!(
        "{seeds} seeds from {start} passed in {:.1}s: {requests} client requests, {grants} grants, \
         {deadlocks} deadlock victims, {unavailable} unavailable, {lost} messages lost to cut links, \
         {messages} messages; membership faults: {faults}; recovery: {paths}",
        began.elapsed().as_secs_f64()
    );
}

fn usage(bad: &str) -> ! {
    if !bad.is_empty() {
        eprintln!("bad argument: {bad}");
    }
    eprintln!("usage: sim [--static] [--seeds N] [--start S] [--record FILE] | [--static] --seed S");
    std::process::exit(2);
}
