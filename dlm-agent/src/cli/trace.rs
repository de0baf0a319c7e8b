//! `dlm-agent trace`: live kernel profiles from the dlm eBPF programs, like
//! `perf lock contention` and bcc's tools. These load their own copy of the
//! programs, so they need no running agent (`trace dlm` excepted), but they
//! need root or CAP_BPF + CAP_PERFMON.

use std::{collections::HashSet, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use dlm_agent::{
    config::parse_duration,
    ebpf::{
        Family, Probes, Settings,
        report::{self, Filter},
        symbols::KernelSymbols,
    },
};
use dlm_ebpf_common::WaitStat;
use serde_json::{Value, json};

use super::{EXIT_SOFTWARE, EXIT_USAGE};

/// Exit status when the programs cannot be loaded (EX_NOPERM).
const EXIT_NO_PERMISSION: u8 = 77;

/// What to trace.
#[derive(Subcommand, Debug)]
pub enum TraceCommand {
    /// Kernel lock contention: wait by lock type and caller (lock:contention_begin/end)
    Locks {
        #[command(flatten)]
        options: TraceOptions,
        /// One row per waiting thread
        #[arg(short = 't', long = "threads")]
        per_task: bool,
        /// Print each row's kernel stack
        #[arg(long)]
        stacks: bool,
    },
    /// Futex waits by process and futex address (futex WAIT, WAIT_BITSET, LOCK_PI, WAIT_REQUEUE_PI, futex_waitv)
    Futex {
        #[command(flatten)]
        options: TraceOptions,
    },
    /// Off-CPU time by process: blocked time, run-queue delay, context switches
    Offcpu {
        #[command(flatten)]
        options: TraceOptions,
        /// Print folded stacks (comm;frames… microseconds) for flame-graph tools instead
        #[arg(long)]
        folded: bool,
        /// Also write the folded stacks as a flame graph (SVG) to this file
        #[arg(long, value_name = "SVG")]
        flamegraph: Option<PathBuf>,
        /// Name user frames with their source file and line where debug info has them
        #[arg(long)]
        lines: bool,
        /// Minimum block time of a folded stack
        #[arg(long, default_value = "1ms", value_parser = parse_duration)]
        min_block: Duration,
    },
    /// Memory pressure: direct/memcg reclaim and compaction stalls, kswapd wake-ups, OOM kills, PSI
    Reclaim {
        #[command(flatten)]
        options: TraceOptions,
    },
    /// Live DLM waits and holds with their kernel attribution, from a running agent
    Dlm(super::trace_dlm::TraceDlmArgs),
}

/// Options every trace command takes.
#[derive(Args, Debug, Clone)]
pub struct TraceOptions {
    /// Stop after this long (e.g. 10s); default: until Ctrl-C
    #[arg(long, short = 'd', value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print a fresh view every interval (top-style, counts for that interval only)
    #[arg(long, short = 'i', value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Print JSON (one object per view)
    #[arg(long)]
    pub json: bool,
    /// Only these processes
    #[arg(long = "pid", short = 'p', value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Only processes whose name contains this
    #[arg(long)]
    pub comm: Option<String>,
    /// Only processes in this cgroup directory (v1 or v2)
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Show at most this many rows
    #[arg(long, default_value_t = 20)]
    pub top: usize,
}

/// `dlm-agent trace …`.
pub async fn run(command: TraceCommand) -> ExitCode {
    let (options, family, mut settings) = match &command {
        TraceCommand::Dlm(args) => return super::trace_dlm::run(args).await,
        TraceCommand::Locks { options, per_task, .. } => {
            (options, Family::Locks, Settings { lock_per_task: *per_task, ..Settings::default() })
        }
        TraceCommand::Futex { options } => (options, Family::Futex, Settings::default()),
        TraceCommand::Offcpu { options, folded, min_block, flamegraph, .. } => {
            let stacks = *folded || flamegraph.is_some();
            (options, Family::Sched, Settings { offcpu_stacks: stacks, offcpu_min: *min_block, ..Settings::default() })
        }
        TraceCommand::Reclaim { options } => (options, Family::Memory, Settings::default()),
    };
    // One -p narrows the programs themselves; more are filtered here.
    if let [pid] = options.pids[..] {
        settings.target_tgid = pid;
    }
    let mut probes = match Probes::load(&settings) {
        Ok(probes) => probes,
        Err(error) => {
            eprintln!("dlm-agent trace: {error}");
            return ExitCode::from(EXIT_NO_PERMISSION);
        }
    };
    if let Err(error) = probes.attach(&[family]) {
        // Some of the family's programs may be attached: trace with those,
        // saying what is missing.
        if probes.attached().contains(&family) {
            eprintln!("dlm-agent trace: attached in part: {error}");
        } else {
            eprintln!("dlm-agent trace: {error}");
            return ExitCode::from(if matches!(error, dlm_agent::ebpf::ProbeError::NotPermitted(_)) {
                EXIT_NO_PERMISSION
            } else {
                EXIT_SOFTWARE
            });
        }
    }
    let mut events = probes.take_events();
    let symbols = KernelSymbols::load();
    if !options.json {
        let what = match options.duration {
            Some(duration) => format!("for {duration:?}"),
            None => "until Ctrl-C".to_owned(),
        };
        eprintln!("Tracing {} {what}…", family.as_str());
    }
    let started = tokio::time::Instant::now();
    let deadline = options.duration.map(|d| started + d);
    loop {
        let wake = match (options.interval, deadline) {
            (Some(interval), Some(deadline)) => (tokio::time::Instant::now() + interval).min(deadline),
            (Some(interval), None) => tokio::time::Instant::now() + interval,
            (None, Some(deadline)) => deadline,
            (None, None) => tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600),
        };
        let interrupted = tokio::select! {
            _ = tokio::time::sleep_until(wake) => false,
            _ = tokio::signal::ctrl_c() => true,
        };
        let filter = match filter(options) {
            Ok(filter) => filter,
            Err(message) => {
                eprintln!("dlm-agent trace: {message}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let mut oom = Vec::new();
        if let Some(events) = events.as_mut() {
            while let Some(item) = events.next() {
                if let Some(event) = dlm_agent::ebpf::decode_event(&item) {
                    oom.push(event);
                }
            }
        }
        let view = match render(&command, &probes, &symbols, &filter, &oom) {
            Ok(view) => view,
            Err(error) => {
                eprintln!("dlm-agent trace: {error}");
                return ExitCode::from(EXIT_SOFTWARE);
            }
        };
        let elapsed = started.elapsed().as_secs_f64();
        if options.json {
            let mut view = view.json;
            view["elapsed_s"] = json!(elapsed);
            println!("{view}");
        } else {
            println!("--- {:.1}s ---", elapsed);
            print!("{}", view.text);
        }
        let done = interrupted || deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if done || options.interval.is_none() {
            return ExitCode::SUCCESS;
        }
        if let Err(error) = probes.reset() {
            eprintln!("dlm-agent trace: {error}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    }
}

fn filter(options: &TraceOptions) -> Result<Filter, String> {
    let mut pids: Option<HashSet<u32>> = (!options.pids.is_empty()).then(|| options.pids.iter().copied().collect());
    if let Some(cgroup) = &options.cgroup {
        let members =
            report::cgroup_pids(cgroup).map_err(|error| format!("cannot read {}: {error}", cgroup.display()))?;
        pids = Some(match pids {
            Some(pids) => pids.intersection(&members).copied().collect(),
            None => members,
        });
    }
    Ok(Filter { pids, comm: options.comm.clone() })
}

struct View {
    text: String,
    json: Value,
}

fn ms(ns: u64) -> String {
    format!("{:.3}ms", ns as f64 / 1e6)
}

fn stat_json(stat: &WaitStat) -> Value {
    json!({
        "count": stat.count, "total_ns": stat.total_ns, "max_ns": stat.max_ns,
        "avg_ns": stat.total_ns.checked_div(stat.count).unwrap_or(0),
        "p99_ns": dlm_agent::ebpf::decode::quantile_ns(stat, 0.99),
    })
}

fn render(
    command: &TraceCommand,
    probes: &Probes,
    symbols: &KernelSymbols,
    filter: &Filter,
    events: &[dlm_ebpf_common::KernelEvent],
) -> Result<View, dlm_agent::ebpf::ProbeError> {
    use std::fmt::Write as _;
    let mut text = String::new();
    let json = match command {
        TraceCommand::Locks { options, per_task, stacks } => {
            let rows = report::lock_rows(probes, symbols, filter)?;
            let _ = writeln!(
                text,
                "{:>10} {:>12} {:>12} {:>12} {:>12}  {}caller",
                "contended",
                "total wait",
                "max wait",
                "avg wait",
                "type",
                if *per_task { "pid:comm  " } else { "" },
            );
            for row in rows.iter().take(options.top) {
                let task = if *per_task { format!("{}:{}  ", row.pid, row.comm) } else { String::new() };
                let _ = writeln!(
                    text,
                    "{:>10} {:>12} {:>12} {:>12} {:>12}  {task}{}",
                    row.stat.count,
                    ms(row.stat.total_ns),
                    ms(row.stat.max_ns),
                    ms(row.stat.total_ns.checked_div(row.stat.count).unwrap_or(0)),
                    row.lock_type,
                    row.caller
                );
                if *stacks {
                    for frame in &row.stack {
                        let _ = writeln!(text, "{:>60}{frame}", "");
                    }
                }
            }
            json!({"locks": rows.iter().take(options.top).map(|row| json!({
                "pid": row.pid, "comm": row.comm, "type": row.lock_type, "caller": row.caller,
                "stack": row.stack, "wait": stat_json(&row.stat),
            })).collect::<Vec<_>>()})
        }
        TraceCommand::Futex { options } => {
            let rows = report::futex_rows(probes, filter)?;
            let _ = writeln!(
                text,
                "{:>8} {:<16} {:<16} {:<18} {:>8} {:>12} {:>12} {:>12}",
                "pid", "comm", "op", "uaddr", "waits", "total", "avg", "max"
            );
            for row in rows.iter().take(options.top) {
                let _ = writeln!(
                    text,
                    "{:>8} {:<16} {:<16} {:<#18x} {:>8} {:>12} {:>12} {:>12}",
                    row.tgid,
                    row.comm,
                    row.op,
                    row.uaddr,
                    row.stat.count,
                    ms(row.stat.total_ns),
                    ms(row.stat.total_ns.checked_div(row.stat.count).unwrap_or(0)),
                    ms(row.stat.max_ns)
                );
            }
            json!({"futex": rows.iter().take(options.top).map(|row| json!({
                "pid": row.tgid, "comm": row.comm, "op": row.op, "uaddr": row.uaddr, "wait": stat_json(&row.stat),
            })).collect::<Vec<_>>()})
        }
        TraceCommand::Offcpu { options, folded, flamegraph, lines: with_lines, .. }
            if *folded || flamegraph.is_some() =>
        {
            let lines = report::folded_offcpu(probes, symbols, filter, *with_lines)?;
            if let Some(path) = flamegraph {
                write_flamegraph(path, &lines)?;
            }
            if *folded {
                for line in &lines {
                    let _ = writeln!(text, "{line}");
                }
            }
            let _ = options;
            json!({ "folded": lines })
        }
        TraceCommand::Offcpu { options, .. } => {
            let rows = report::offcpu_rows(probes, filter)?;
            let _ = writeln!(
                text,
                "{:>8} {:<16} {:>12} {:>12} {:>12} {:>10} {:>10}",
                "pid", "comm", "blocked", "run-queue", "runq max", "voluntary", "involunt."
            );
            for row in rows.iter().take(options.top) {
                let _ = writeln!(
                    text,
                    "{:>8} {:<16} {:>12} {:>12} {:>12} {:>10} {:>10}",
                    row.tgid,
                    row.comm,
                    ms(row.stat.blocked.total_ns),
                    ms(row.stat.runq.total_ns),
                    ms(row.stat.runq.max_ns),
                    row.stat.voluntary,
                    row.stat.involuntary
                );
            }
            json!({"offcpu": rows.iter().take(options.top).map(|row| json!({
                "pid": row.tgid, "comm": row.comm, "voluntary": row.stat.voluntary,
                "involuntary": row.stat.involuntary,
                "blocked_ns": row.stat.blocked.total_ns, "blocked_max_ns": row.stat.blocked.max_ns,
                "runqueue_ns": row.stat.runq.total_ns, "runqueue_max_ns": row.stat.runq.max_ns,
            })).collect::<Vec<_>>()})
        }
        TraceCommand::Reclaim { options } => {
            let rows = report::stall_rows(probes, filter)?;
            let _ = writeln!(
                text,
                "{:>8} {:<16} {:<15} {:>10} {:>8} {:>12} {:>12}",
                "pid", "comm", "kind", "cgroup", "stalls", "total", "max"
            );
            for row in rows.iter().take(options.top) {
                let _ = writeln!(
                    text,
                    "{:>8} {:<16} {:<15} {:>10} {:>8} {:>12} {:>12}",
                    row.tgid,
                    row.comm,
                    row.kind,
                    row.cgroup,
                    row.stat.count,
                    ms(row.stat.total_ns),
                    ms(row.stat.max_ns)
                );
            }
            let kswapd = probes.kswapd_wakes();
            let _ = writeln!(text, "kswapd wake-ups: {kswapd}");
            let ooms: Vec<Value> = events
                .iter()
                .filter(|e| e.kind == dlm_ebpf_common::event_kinds::OOM_VICTIM)
                .map(|e| {
                    let comm = String::from_utf8_lossy(&e.comm).trim_end_matches('\0').to_owned();
                    let _ =
                        writeln!(text, "OOM kill: pid {} ({comm}) uid {} anon-rss {} pages", e.pid, e.detail, e.value);
                    json!({"pid": e.pid, "comm": comm, "uid": e.detail, "anon_rss_pages": e.value})
                })
                .collect();
            let psi = report::pressure();
            for (resource, kind, total) in &psi {
                let _ = writeln!(text, "PSI {resource} {kind}: {:.3}s total", *total as f64 / 1e6);
            }
            json!({
                "stalls": rows.iter().take(options.top).map(|row| json!({
                    "pid": row.tgid, "comm": row.comm, "kind": row.kind, "cgroup": row.cgroup, "stall": stat_json(&row.stat),
                })).collect::<Vec<_>>(),
                "kswapd_wakeups": kswapd,
                "oom_kills": ooms,
                "pressure": psi.iter().map(|(r, k, t)| json!({"resource": r, "kind": k, "total_us": t})).collect::<Vec<_>>(),
            })
        }
        TraceCommand::Dlm(_) => Value::Null,
    };
    Ok(View { text, json })
}

/// Renders folded off-CPU stacks as a flame graph (an SVG file).
fn write_flamegraph(path: &std::path::Path, lines: &[String]) -> Result<(), dlm_agent::ebpf::ProbeError> {
    let failed = |e: std::io::Error| dlm_agent::ebpf::ProbeError::Output(format!("{}: {e}", path.display()));
    let mut options = inferno::flamegraph::Options::default();
    options.title = "Off-CPU time (dlm-agent trace offcpu)".to_owned();
    options.count_name = "us".to_owned();
    let file = std::fs::File::create(path).map_err(failed)?;
    if lines.is_empty() {
        // inferno refuses an empty input: say so in the picture instead.
        let mut file = file;
        return std::io::Write::write_all(
            &mut file,
            b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"25\">no off-CPU stacks above --min-block</text></svg>\n",
        )
        .map_err(failed);
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), std::io::BufWriter::new(file))
        .map_err(failed)
}
