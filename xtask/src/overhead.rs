//! `cargo xtask overhead`: what the agent's eBPF programs cost, measured
//! with `perf bench sched pipe` pinned to one CPU (nothing but context
//! switches and wake-ups: the worst case for the scheduler programs),
//! alternately without and with a running agent whose programs are
//! attached (idle, then with a client holding a lock, so that its process is
//! tracked), and with an empty bpftrace program on the same event instead
//! (what attaching anything there costs), in one run. Reports the median
//! slowdowns, timed with the BPF statistics off, and each program's median
//! ns per event from a second run with them on (`kernel.bpf_stats_enabled`,
//! restored at the end), beside the floor of those statistics: what the
//! empty program reads there.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Options {
    rounds: usize,
    loops: u64,
    /// `[ebpf] families` for the agent (a comma-separated list); `None`
    /// keeps its default.
    families: Option<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options { rounds: 9, loops: 200_000, families: None };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--rounds" => options.rounds = value("--rounds")?.max(1) as usize,
            "--loops" => options.loops = value("--loops")?.max(1000),
            "--families" => {
                let list = args.next().ok_or("--families needs a list, such as locks,holders,memory")?;
                if list.is_empty()
                    || !list.split(',').all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_lowercase()))
                {
                    return Err(format!("--families: {list:?} is not a comma-separated list of family names"));
                }
                options.families = Some(list.clone());
            }
            other => {
                return Err(format!("overhead: unknown option {other:?} (--rounds N, --loops N, --families LIST)"));
            }
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

/// An empty program on the same event, a bpftrace
/// `tracepoint:sched:sched_switch {}`: the benchmark timed with it attached
/// (what attaching anything there costs), then its program-statistics
/// reading, measured as the agent's are (run time over runs across one
/// benchmark run), pushed to `floors`. The kernel times each run with a
/// clock read, so even a program that does nothing shows a cost there; what
/// a program shows above this floor is its own work.
fn empty_program(loops: u64, floors: &mut Vec<f64>) -> Result<f64, String> {
    let child = Command::new("bpftrace")
        .args(["-e", "tracepoint:sched:sched_switch { }"])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run bpftrace (Debian package bpftrace): {e}"))?;
    let bpftrace = ChildGuard(child);
    let pid = bpftrace.0.id();
    // (run ns, runs) summed over the programs bpftrace has loaded.
    let stats = || -> Option<(f64, f64)> {
        let mut found = None;
        for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if !text.contains("prog_type:") {
                continue;
            }
            let field =
                |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0);
            let (ns, runs) = found.unwrap_or((0.0, 0.0));
            found = Some((ns + field("run_time_ns:"), runs + field("run_cnt:")));
        }
        found
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if stats().is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err("bpftrace did not load its program".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let us = pipe_bench(loops)?;
    set_bpf_stats("1")?;
    let before = stats().ok_or("bpftrace went away")?;
    pipe_bench(loops)?;
    let after = stats().ok_or("bpftrace went away");
    set_bpf_stats("0")?;
    let after = after?;
    let runs = after.1 - before.1;
    if runs <= 0.0 {
        return Err("bpftrace's program did not run".into());
    }
    floors.push((after.0 - before.0) / runs);
    Ok(us)
}

struct AgentProcess {
    child: Child,
    dir: std::path::PathBuf,
    http: String,
}

impl AgentProcess {
    fn start(binary: &str, round: usize, options: &Options) -> Result<AgentProcess, String> {
        let dir = std::env::temp_dir().join(format!("dlm-overhead-{}-{round}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let http = format!("127.0.0.1:{port}");
        // The program statistics in /metrics are refreshed with the maps:
        // every second here (5 s by default).
        let config = dir.join("agent.toml");
        let mut text = String::from("[ebpf]\ninterval = \"1s\"\n");
        if let Some(families) = &options.families {
            let quoted: Vec<String> = families.split(',').map(|f| format!("{f:?}")).collect();
            text.push_str(&format!("families = [{}]\n", quoted.join(", ")));
        }
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .args(["run", "--node", "overhead", "--http", &http, "--config"])
            .arg(&config)
            .arg("--socket")
            .arg(dir.join("dlm.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
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

impl AgentProcess {
    /// Starts a client that takes a lock and holds it until dropped.
    fn hold_lock(&self, binary: &str) -> Result<ChildGuard, String> {
        let child = Command::new(binary)
            .arg("lock")
            .arg("--socket")
            .arg(self.dir.join("dlm.sock"))
            .args(["overhead-holder", "--", "sleep", "3600"])
            // Its own process group, so the `sleep` goes with it.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {binary} lock: {e}"))?;
        let holder = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !http_get(&self.http, "/metrics").unwrap_or_default().lines().any(|line| {
            line.starts_with("dlm_lock_granted{") && line.rsplit(' ').next().is_some_and(|v| v.trim() != "0")
        }) {
            if Instant::now() > deadline {
                return Err("the holder's lock was not granted".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(holder)
    }
}

/// A process killed with its process group when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The smallest sample (infinity for none).
fn fastest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
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
    set_bpf_stats("0")?;
    let result = measure(binary, &options);
    let _ = std::fs::write(BPF_STATS, previous.trim());
    result
}

fn set_bpf_stats(value: &str) -> Result<(), String> {
    std::fs::write(BPF_STATS, value).map_err(|e| format!("writing {BPF_STATS} needs root: {e}"))
}

/// What runs beside the benchmark in one sample.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// No agent: the baseline.
    Without,
    /// No agent, an empty bpftrace program on `sched_switch`: what
    /// attaching anything there costs.
    EmptyProgram,
    /// The agent with its programs attached and no client.
    Idle,
    /// The same with one client holding a lock (so its process is tracked
    /// and the programs look at every switch): the usual state of a node.
    Holding,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Without, Mode::EmptyProgram, Mode::Idle, Mode::Holding];

    fn name(self) -> &'static str {
        match self {
            Mode::Without => "without dlm programs",
            Mode::EmptyProgram => "an empty bpftrace program",
            Mode::Idle => "with, agent idle",
            Mode::Holding => "with, a lock held",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Mode::Without => "without",
            Mode::EmptyProgram => "empty_program",
            Mode::Idle => "idle",
            Mode::Holding => "holding",
        }
    }
}

/// Per-program samples of one mode: ns per event and events per operation.
#[derive(Default)]
struct ProgramSamples {
    ns_per_event: BTreeMap<String, Vec<f64>>,
    events_per_op: BTreeMap<String, Vec<f64>>,
}

fn sample(
    binary: &str,
    mode: Mode,
    round: usize,
    options: &Options,
    programs: &mut ProgramSamples,
    floors: &mut Vec<f64>,
) -> Result<f64, String> {
    match mode {
        Mode::Without => return pipe_bench(options.loops),
        Mode::EmptyProgram => return empty_program(options.loops, floors),
        Mode::Idle | Mode::Holding => {}
    }
    let agent = AgentProcess::start(binary, round, options)?;
    let _holder = if mode == Mode::Holding { Some(agent.hold_lock(binary)?) } else { None };
    // The slowdown is timed with the BPF statistics off: when on, the
    // kernel reads the clock twice around every program run, which costs
    // more than the programs here.
    let us = pipe_bench(options.loops)?;
    // Then a second run with them on, for each program's run time; wait
    // for a refresh of the agent's statistics on each side.
    set_bpf_stats("1")?;
    std::thread::sleep(Duration::from_millis(1300));
    let before = program_stats(&agent.http);
    pipe_bench(options.loops)?;
    std::thread::sleep(Duration::from_millis(1300));
    let after = program_stats(&agent.http);
    set_bpf_stats("0")?;
    for (program, (ns, runs)) in &after {
        let (ns0, runs0) = before.get(program).copied().unwrap_or_default();
        let runs = runs - runs0;
        if runs > 0.0 {
            programs.ns_per_event.entry(program.clone()).or_default().push((ns - ns0) / runs);
            programs.events_per_op.entry(program.clone()).or_default().push(runs / options.loops as f64);
        }
    }
    Ok(us)
}

fn measure(binary: &str, options: &Options) -> Result<(), String> {
    let mut samples: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
    let mut programs: BTreeMap<Mode, ProgramSamples> = BTreeMap::new();
    let mut floors: Vec<f64> = Vec::new();
    // Warm up the caches and the CPU frequency before the first sample.
    pipe_bench(options.loops / 4)?;
    for round in 0..options.rounds {
        // Rotate which goes first, so drift in the machine's load affects
        // every mode alike.
        let mut order = Mode::ALL;
        order.rotate_left(round % Mode::ALL.len());
        for mode in order {
            let us = sample(binary, mode, round, options, programs.entry(mode).or_default(), &mut floors)?;
            samples.entry(mode).or_default().push(us);
        }
        let last = |mode| samples.get(&mode).and_then(|v| v.last()).copied().unwrap_or(f64::NAN);
        eprintln!(
            "round {}/{}: without {:.3}, empty program {:.3}, idle {:.3}, holding {:.3} µs/op",
            round + 1,
            options.rounds,
            last(Mode::Without),
            last(Mode::EmptyProgram),
            last(Mode::Idle),
            last(Mode::Holding)
        );
    }
    let families = options.families.as_deref().unwrap_or("the agent's default");
    println!(
        "perf bench sched pipe -l {} on CPU 0, {} rounds, medians; families: {families}",
        options.loops, options.rounds
    );
    // Each round's slowdown against that round's own baseline, before the
    // medians below sort the samples: on a noisy machine the baseline drifts
    // between rounds, and pairing cancels what the two share.
    let mut paired: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
    if let Some(without) = samples.get(&Mode::Without) {
        for mode in [Mode::EmptyProgram, Mode::Idle, Mode::Holding] {
            let with = samples.get(&mode).map_or(&[][..], Vec::as_slice);
            paired.insert(mode, with.iter().zip(without).map(|(w, b)| w / b - 1.0).collect());
        }
    }
    let base = median(samples.entry(Mode::Without).or_default());
    // The noise the slowdowns sit in: how far the baseline itself moved.
    let without = samples.get(&Mode::Without).map_or(&[][..], Vec::as_slice);
    let (low, high) = (fastest(without), without.iter().copied().fold(0.0_f64, f64::max));
    let mut json_modes = Vec::new();
    for mode in Mode::ALL {
        let us = median(samples.entry(mode).or_default());
        let slowdown = us / base - 1.0;
        if mode == Mode::Without {
            println!("  {:<26} {us:8.3} µs/op   (its rounds: {low:.3} to {high:.3})", mode.name());
            json_modes.push(format!("\"{}\":{{\"us_per_op\":{us:.4}}}", mode.key()));
        } else {
            let per_round = median(paired.entry(mode).or_default());
            // Noise here only ever adds time (the machine's other load), so
            // the fastest rounds are the other estimate worth having.
            let fastest_slowdown = samples.get(&mode).map_or(f64::NAN, |v| fastest(v)) / low - 1.0;
            println!(
                "  {:<26} {us:8.3} µs/op   ({:+.1}%; median of each round's own: {:+.1}%; fastest rounds: {:+.1}%)",
                mode.name(),
                slowdown * 100.0,
                per_round * 100.0,
                fastest_slowdown * 100.0
            );
            json_modes.push(format!(
                "\"{}\":{{\"us_per_op\":{us:.4},\"slowdown\":{slowdown:.4},\"paired_slowdown\":{per_round:.4},\
                 \"fastest_slowdown\":{fastest_slowdown:.4}}}",
                mode.key()
            ));
        }
    }
    let floor = median(&mut floors);
    println!(
        "floor: an empty program on sched_switch (bpftrace, a classic tracepoint) reads {floor:.1} ns/event in the \
         same statistics"
    );
    json_modes.push(format!("\"empty_program_ns_per_event\":{floor:.1}"));
    let mut json_programs = Vec::new();
    for mode in [Mode::Idle, Mode::Holding] {
        let Some(samples) = programs.get_mut(&mode) else { continue };
        println!("{}: {:<26} {:>12} {:>14} {:>14}", mode.key(), "program", "ns/event", "above floor", "events/op");
        let mut per_op_ns = 0.0;
        let mut per_op_events = 0.0;
        for (program, values) in &mut samples.ns_per_event {
            let ns = median(values);
            let per_op = median(samples.events_per_op.get_mut(program).map_or(&mut [][..], |v| &mut v[..]));
            println!("{:<9}{program:<26} {ns:>12.1} {:>14.1} {per_op:>14.2}", "", ns - floor);
            json_programs.push(format!(
                "{{\"mode\":\"{}\",\"program\":\"{program}\",\"ns_per_event\":{ns:.1},\"events_per_op\":{per_op:.3}}}",
                mode.key()
            ));
            per_op_ns += ns * per_op;
            per_op_events += per_op;
        }
        // Weighted by how often each program runs per operation: programs
        // that ran a few times, cold, in the gaps do not skew it.
        let weighted = per_op_ns / per_op_events;
        // The programs' own run time as a share of an operation without
        // them: the direct cost, free of the noise between separate runs
        // (cache and other indirect effects come on top).
        let share = per_op_ns / (base * 1000.0);
        println!(
            "{:<9}weighted by events per operation: {weighted:.1} ns/event; {per_op_ns:.0} ns of program time per \
             operation, {:.1}% of one without",
            "",
            share * 100.0
        );
        json_modes.push(format!("\"{}_weighted_ns_per_event\":{weighted:.1}", mode.key()));
        json_modes.push(format!("\"{}_program_share\":{share:.4}", mode.key()));
    }
    let json = format!(
        "{{\"loops\":{},\"rounds\":{},\"families\":\"{families}\",{},\"programs\":[{}]}}\n",
        options.loops,
        options.rounds,
        json_modes.join(","),
        json_programs.join(",")
    );
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    std::fs::write("target/bench/ebpf-overhead.json", json).map_err(|e| e.to_string())?;
    println!("written to target/bench/ebpf-overhead.json");
    Ok(())
}
