//! `cargo xtask overhead`: what the agent's eBPF programs cost, measured
//! with `perf bench sched pipe` pinned to one CPU (nothing but context
//! switches and wake-ups: the worst case for the scheduler programs),
//! alternately without and with a running agent whose programs are
//! attached, in one run. Reports the median slowdown and each program's
//! median ns per event from the kernel's BPF statistics
//! (`kernel.bpf_stats_enabled`, switched on for the run and restored).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Options {
    rounds: usize,
    loops: u64,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options { rounds: 5, loops: 200_000 };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--rounds" => options.rounds = value("--rounds")?.max(1) as usize,
            "--loops" => options.loops = value("--loops")?.max(1000),
            other => return Err(format!("overhead: unknown option {other:?} (--rounds N, --loops N)")),
        }
    }
    Ok(options)
}

/// Runs `perf bench sched pipe` on CPU 0; returns µs per round trip.
fn pipe_bench(loops: u64) -> Result<f64, String> {
    let output = Command::new("taskset")
        .args(["-c", "0", "perf", "bench", "sched", "pipe", "-l", &loops.to_string()])
        .output()
        .map_err(|e| format!("cannot run perf (Debian package linux-perf): {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_suffix("usecs/op")?.trim().parse().ok())
        .ok_or_else(|| format!("unexpected perf output: {text}{}", String::from_utf8_lossy(&output.stderr)))
}

fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response.split_once("\r\n\r\n")?.1.to_owned())
}

/// (run ns, runs) by program, from the agent's metrics.
fn program_stats(address: &str) -> BTreeMap<String, (f64, f64)> {
    let mut stats: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let text = http_get(address, "/metrics").unwrap_or_default();
    for line in text.lines() {
        let (metric, slot) = if let Some(rest) = line.strip_prefix("dlm_ebpf_program_run_seconds_total{program=\"") {
            (rest, 0)
        } else if let Some(rest) = line.strip_prefix("dlm_ebpf_program_runs_total{program=\"") {
            (rest, 1)
        } else {
            continue;
        };
        let Some((program, value)) = metric.split_once("\"} ") else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let entry = stats.entry(program.to_owned()).or_default();
        if slot == 0 {
            entry.0 = value * 1e9;
        } else {
            entry.1 = value;
        }
    }
    stats
}

struct AgentProcess {
    child: Child,
    dir: std::path::PathBuf,
    http: String,
}

impl AgentProcess {
    fn start(binary: &str, round: usize) -> Result<AgentProcess, String> {
        let dir = std::env::temp_dir().join(format!("dlm-overhead-{}-{round}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let http = format!("127.0.0.1:{port}");
        // The program statistics in /metrics are refreshed with the maps:
        // every second here (5 s by default).
        let config = dir.join("agent.toml");
        std::fs::write(&config, "[ebpf]\ninterval = \"1s\"\n").map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .args(["run", "--node", "overhead", "--http", &http, "--config"])
            .arg(&config)
            .arg("--socket")
            .arg(dir.join("dlm.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {binary}: {e}"))?;
        let agent = AgentProcess { child, dir, http };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = http_get(&agent.http, "/metrics").unwrap_or_default();
            if metrics.contains("dlm_ebpf_enabled 1") {
                return Ok(agent);
            }
            if metrics.contains("dlm_ebpf_enabled 0") {
                return Err("the agent could not attach its eBPF programs (run as root)".into());
            }
            if Instant::now() > deadline {
                return Err("the agent did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let options = parse(args)?;
    crate::run("cargo", &["build", "--release", "--locked", "--package", "dlm-agent"])?;
    let binary = "target/release/dlm-agent";
    let previous = std::fs::read_to_string(BPF_STATS).map_err(|e| format!("{BPF_STATS}: {e}"))?;
    std::fs::write(BPF_STATS, "1").map_err(|e| format!("turning on {BPF_STATS} needs root: {e}"))?;
    let result = measure(binary, &options);
    let _ = std::fs::write(BPF_STATS, previous.trim());
    result
}

fn measure(binary: &str, options: &Options) -> Result<(), String> {
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut per_program: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut events_per_op: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // Warm up the caches and the CPU frequency before the first sample.
    pipe_bench(options.loops / 4)?;
    for round in 0..options.rounds {
        // Alternate which goes first, so drift in the machine's load
        // affects both sides alike.
        for attached in if round % 2 == 0 { [false, true] } else { [true, false] } {
            if attached {
                let agent = AgentProcess::start(binary, round)?;
                // Wait for a refresh of the statistics on each side.
                std::thread::sleep(Duration::from_millis(1300));
                let before = program_stats(&agent.http);
                let us = pipe_bench(options.loops)?;
                std::thread::sleep(Duration::from_millis(1300));
                let after = program_stats(&agent.http);
                with.push(us);
                for (program, (ns, runs)) in &after {
                    let (ns0, runs0) = before.get(program).copied().unwrap_or_default();
                    let runs = runs - runs0;
                    if runs > 0.0 {
                        per_program.entry(program.clone()).or_default().push((ns - ns0) / runs);
                        events_per_op.entry(program.clone()).or_default().push(runs / options.loops as f64);
                    }
                }
            } else {
                without.push(pipe_bench(options.loops)?);
            }
        }
        eprintln!(
            "round {}/{}: without {:.3} µs/op, with {:.3} µs/op",
            round + 1,
            options.rounds,
            without.last().copied().unwrap_or(f64::NAN),
            with.last().copied().unwrap_or(f64::NAN)
        );
    }
    let base = median(&mut without);
    let attached = median(&mut with);
    let slowdown = attached / base - 1.0;
    println!("perf bench sched pipe -l {} on CPU 0, {} rounds, medians", options.loops, options.rounds);
    println!("  without dlm programs   {base:8.3} µs/op");
    println!("  with dlm programs      {attached:8.3} µs/op   ({:+.1}%)", slowdown * 100.0);
    println!("{:<28} {:>12} {:>14}", "program", "ns/event", "events/op");
    let mut medians = Vec::new();
    let mut json_programs = Vec::new();
    for (program, samples) in &mut per_program {
        let ns = median(samples);
        let per_op = median(events_per_op.get_mut(program).map_or(&mut [][..], |v| &mut v[..]));
        medians.push(ns);
        println!("{program:<28} {ns:>12.1} {per_op:>14.2}");
        json_programs
            .push(format!("{{\"program\":\"{program}\",\"ns_per_event\":{ns:.1},\"events_per_op\":{per_op:.3}}}"));
    }
    let median_ns = median(&mut medians);
    // Weighted by how often each program runs per benchmark operation: what
    // one operation pays in program time.
    let mut per_op_ns = 0.0;
    let mut per_op_events = 0.0;
    for (program, samples) in &mut per_program {
        let events = median(events_per_op.get_mut(program).map_or(&mut [][..], |v| &mut v[..]));
        per_op_ns += median(samples) * events;
        per_op_events += events;
    }
    let weighted = per_op_ns / per_op_events;
    println!("median over programs that ran: {median_ns:.1} ns/event (rare programs ran cold, a few times)");
    println!(
        "weighted by events per operation: {weighted:.1} ns/event, {per_op_ns:.0} ns of program time per operation"
    );
    let json = format!(
        "{{\"loops\":{},\"rounds\":{},\"without_us_per_op\":{base:.4},\"with_us_per_op\":{attached:.4},\
         \"slowdown\":{slowdown:.4},\"median_ns_per_event\":{median_ns:.1},\"weighted_ns_per_event\":{weighted:.1},\"programs\":[{}]}}\n",
        options.loops,
        options.rounds,
        json_programs.join(",")
    );
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    std::fs::write("target/bench/ebpf-overhead.json", json).map_err(|e| e.to_string())?;
    println!("written to target/bench/ebpf-overhead.json");
    Ok(())
}
