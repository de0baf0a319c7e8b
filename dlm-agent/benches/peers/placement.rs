//! Where the benchmark's threads run: the placements, pinning a process's
//! threads, and the CPU time a process used.

use std::process::{Command, Stdio};

use super::Result;

/// Where the servers and the clients run.
#[derive(Clone, Copy)]
pub enum Placement {
    Unpinned,
    OneCpu,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::OneCpu => "one CPU",
        }
    }

    /// Its name in `DLM_BENCH_PLACEMENTS`.
    pub fn key(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::OneCpu => "one-cpu",
        }
    }

    pub fn cpus(self) -> Vec<usize> {
        match self {
            Placement::Unpinned => (0..online_cpus()).collect(),
            Placement::OneCpu => vec![0],
        }
    }

    pub fn describe(self) -> String {
        match self {
            Placement::Unpinned => {
                format!("every process may run on every CPU (0-{}), where the scheduler puts it", online_cpus() - 1)
            }
            Placement::OneCpu => "the servers and every client thread on CPU 0".into(),
        }
    }
}

/// The worker threads of the clients' runtime: `DLM_BENCH_CLIENT_WORKERS`,
/// else one per CPU (tokio's default).
pub fn client_workers() -> usize {
    std::env::var("DLM_BENCH_CLIENT_WORKERS")
        .ok()
        .and_then(|w| w.parse::<usize>().ok())
        .map_or_else(online_cpus, |w| w.max(1))
}

/// The CPUs this process could use when it started (before any placement
/// narrowed them).
pub fn online_cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// Sets the CPUs every thread of process `pid` may run on (threads made
/// later inherit it from the thread that makes them), with util-linux's
/// `taskset`.
pub fn place(pid: u32, cpus: &[usize]) -> Result<()> {
    let list = cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let status = Command::new("taskset")
        .args(["--all-tasks", "--pid", "--cpu-list", &list, &pid.to_string()])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("taskset could not place process {pid} on CPUs {list}").into());
    }
    Ok(())
}

/// CPU time (user and system, every thread's, the ended ones' too) process
/// `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line (12 and 13 here), in
    // USER_HZ, which Linux fixes at 100 for user space.
    (ticks(11) + ticks(12)) as f64 / 100.0
}
