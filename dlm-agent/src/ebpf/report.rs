//! Turning map contents into rows a person (or a metric) can use: process
//! names, lock types, symbolized callers and stacks, filters.

use std::collections::{BTreeMap, HashSet};

use dlm_ebpf_common::{SchedStat, WaitStat};

use super::{
    ProbeError, Probes, decode,
    symbols::{KernelSymbols, UserSymbols},
};

/// The command name of a process (`[exited]` when it is gone).
pub fn comm(tgid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{tgid}/comm"))
        .map(|name| name.trim_end().to_owned())
        .unwrap_or_else(|_| "[exited]".to_owned())
}

/// The command name of a process, or the one a program recorded (NUL-padded)
/// when the process is gone.
pub fn comm_or(tgid: u32, recorded: &[u8; 16]) -> String {
    let name = comm(tgid);
    if name != "[exited]" || recorded[0] == 0 {
        return name;
    }
    let end = recorded.iter().position(|b| *b == 0).unwrap_or(recorded.len());
    String::from_utf8_lossy(&recorded[..end]).into_owned()
}

/// Which processes to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only these process ids (from `-p` and `--cgroup`); `None`: all.
    pub pids: Option<HashSet<u32>>,
    /// Only processes whose command name contains this.
    pub comm: Option<String>,
}

impl Filter {
    /// Whether `tgid` (named `name`) passes.
    pub fn accepts(&self, tgid: u32, name: &str) -> bool {
        self.pids.as_ref().is_none_or(|pids| pids.contains(&tgid))
            && self.comm.as_ref().is_none_or(|wanted| name.contains(wanted.as_str()))
    }
}

/// The processes in a cgroup directory (v1 or v2), from `cgroup.procs`.
pub fn cgroup_pids(path: &std::path::Path) -> std::io::Result<HashSet<u32>> {
    let text = std::fs::read_to_string(path.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|line| line.trim().parse().ok()).collect())
}

/// The BPF program that took a stack, and the tracing glue that called it.
fn is_observer_frame(name: &str) -> bool {
    ["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_"].iter().any(|prefix| name.starts_with(prefix))
}

/// Kernel functions that implement locking, and the BPF program and tracing
/// glue that observed the contention (the innermost frames of a stack taken
/// in the `contention_begin` tracepoint), skipped when naming the caller of
/// a contended lock (as `perf lock contention` skips lock functions).
fn is_lock_function(name: &str) -> bool {
    const PREFIXES: [&str; 17] = [
        "trace_contention",
        "_raw_",
        "raw_",
        "queued_",
        "native_queued",
        "__pv_queued",
        "mutex_",
        "__mutex",
        "rwsem_",
        "__rwsem",
        "down_",
        "__down",
        "rt_mutex",
        "rtlock",
        "percpu_down",
        "osq_",
        "do_raw_",
    ];
    is_observer_frame(name) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// The first frame outside the locking code: the lock's user.
pub fn caller(frames: &[String]) -> String {
    frames
        .iter()
        .find(|frame| !is_lock_function(frame))
        .or(frames.first())
        .cloned()
        .unwrap_or_else(|| "[unknown]".to_owned())
}

/// One kernel lock contention row.
#[derive(Clone, Debug)]
pub struct LockRow {
    /// Waiting thread (0 unless per-task accounting is on).
    pub pid: u32,
    /// Its command name (empty when `pid` is 0).
    pub comm: String,
    /// Lock type (`mutex`, `spinlock`, `rwsem:W`…).
    pub lock_type: &'static str,
    /// First non-lock function on the waiter's stack.
    pub caller: String,
    /// The waiter's kernel stack, innermost first, symbolized.
    pub stack: Vec<String>,
    /// Wait statistics.
    pub stat: WaitStat,
}

/// Kernel lock contention, merged by (thread, type, caller), longest total
/// wait first.
///
/// # Errors
/// The map cannot be read.
pub fn lock_rows(probes: &Probes, symbols: &KernelSymbols, filter: &Filter) -> Result<Vec<LockRow>, ProbeError> {
    let mut rows: BTreeMap<(u32, &'static str, String), LockRow> = BTreeMap::new();
    for (key, stat) in probes.lock_stats()? {
        let comm = if key.pid == 0 { String::new() } else { comm(key.pid) };
        if key.pid != 0 && !filter.accepts(key.pid, &comm) {
            continue;
        }
        let stack: Vec<String> = probes.stack(key.stack_id).iter().map(|ip| symbols.resolve(*ip)).collect();
        let functions: Vec<String> =
            stack.iter().map(|frame| frame.split('+').next().unwrap_or(frame).to_owned()).collect();
        let caller = caller(&functions);
        let lock_type = decode::lock_type(key.flags);
        rows.entry((key.pid, lock_type, caller.clone())).and_modify(|row| row.stat.merge(&stat)).or_insert(LockRow {
            pid: key.pid,
            comm,
            lock_type,
            caller,
            stack,
            stat,
        });
    }
    Ok(sorted_by(rows.into_values().collect(), |row| row.stat.total_ns))
}

/// One futex row.
#[derive(Clone, Debug)]
pub struct FutexRow {
    /// Process id.
    pub tgid: u32,
    /// Command name.
    pub comm: String,
    /// Waiting op.
    pub op: &'static str,
    /// Futex word address (waiter array for `waitv`).
    pub uaddr: u64,
    /// Wait statistics.
    pub stat: WaitStat,
}

/// Futex waits by process and address, longest total first.
///
/// # Errors
/// The map cannot be read.
pub fn futex_rows(probes: &Probes, filter: &Filter) -> Result<Vec<FutexRow>, ProbeError> {
    let mut rows = Vec::new();
    for (key, stat) in probes.futex_stats()? {
        let comm = comm(key.tgid);
        if filter.accepts(key.tgid, &comm) {
            rows.push(FutexRow { tgid: key.tgid, comm, op: decode::futex_op(key.op), uaddr: key.uaddr, stat });
        }
    }
    Ok(sorted_by(rows, |row| row.stat.total_ns))
}

/// One process's off-CPU row.
#[derive(Clone, Debug)]
pub struct OffcpuRow {
    /// Process id.
    pub tgid: u32,
    /// Command name.
    pub comm: String,
    /// Statistics.
    pub stat: SchedStat,
}

/// Off-CPU time by process, most blocked + run-queue time first.
///
/// # Errors
/// The map cannot be read.
pub fn offcpu_rows(probes: &Probes, filter: &Filter) -> Result<Vec<OffcpuRow>, ProbeError> {
    let mut rows = Vec::new();
    for (tgid, stat) in probes.sched_stats()? {
        let comm = comm(tgid);
        if filter.accepts(tgid, &comm) {
            rows.push(OffcpuRow { tgid, comm, stat });
        }
    }
    Ok(sorted_by(rows, |row| row.stat.blocked.total_ns + row.stat.runq.total_ns))
}

/// Folded off-CPU stacks (`comm;user frames…;kernel frames… microseconds`,
/// outermost frame first), the input of flame-graph tools; with `lines`,
/// user frames carry `[file:line]` where debug info gives it (one frame per
/// line then, rather than per function).
///
/// # Errors
/// The map cannot be read.
pub fn folded_offcpu(
    probes: &Probes,
    symbols: &KernelSymbols,
    filter: &Filter,
    lines: bool,
) -> Result<Vec<String>, ProbeError> {
    let mut folded: BTreeMap<String, u64> = BTreeMap::new();
    let mut processes: BTreeMap<u32, UserSymbols> = BTreeMap::new();
    for (key, ns) in probes.offcpu_stacks()? {
        let comm = comm(key.tgid);
        if !filter.accepts(key.tgid, &comm) {
            continue;
        }
        let user = processes.entry(key.tgid).or_insert_with(|| UserSymbols::load(key.tgid));
        let mut frames = vec![comm.replace(';', "_")];
        frames.extend(user.functions(&probes.stack(key.user_stack), lines).into_iter().rev());
        let kernel = probes.stack(key.kernel_stack);
        // The innermost frames are the BPF program that took the stack and
        // its tracing glue: not the process's.
        let own =
            kernel.iter().map(|ip| symbols.function(*ip)).skip_while(|f| is_observer_frame(f)).collect::<Vec<_>>();
        frames.extend(own.into_iter().rev());
        *folded.entry(frames.join(";")).or_insert(0) += ns / 1000;
    }
    Ok(folded.into_iter().filter(|(_, us)| *us > 0).map(|(stack, us)| format!("{stack} {us}")).collect())
}

/// One memory-stall row.
#[derive(Clone, Debug)]
pub struct StallRow {
    /// Process id.
    pub tgid: u32,
    /// Command name.
    pub comm: String,
    /// `direct_reclaim`, `memcg_reclaim` or `compaction`.
    pub kind: &'static str,
    /// cgroup v2 id.
    pub cgroup: u64,
    /// Stall statistics.
    pub stat: WaitStat,
}

/// Memory stalls by process, kind and cgroup, longest total first.
///
/// # Errors
/// The map cannot be read.
pub fn stall_rows(probes: &Probes, filter: &Filter) -> Result<Vec<StallRow>, ProbeError> {
    let mut rows = Vec::new();
    for (key, stat) in probes.mem_stats()? {
        let comm = comm_or(key.tgid, &key.comm);
        if filter.accepts(key.tgid, &comm) {
            rows.push(StallRow { tgid: key.tgid, comm, kind: decode::stall_kind(key.kind), cgroup: key.cgroup, stat });
        }
    }
    Ok(sorted_by(rows, |row| row.stat.total_ns))
}

/// Pressure stall information: `(resource, "some"|"full", total µs)` from
/// `/proc/pressure/{cpu,memory,io}`.
pub fn pressure() -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::new();
    for resource in crate::psi::RESOURCES {
        let Some(pressure) = crate::psi::read(resource) else { continue };
        out.push((resource, "some", pressure.some.total_us));
        if let Some(full) = pressure.full {
            out.push((resource, "full", full.total_us));
        }
    }
    out
}

fn sorted_by<T>(mut rows: Vec<T>, key: impl Fn(&T) -> u64) -> Vec<T> {
    rows.sort_by_key(|row| std::cmp::Reverse(key(row)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_is_the_first_frame_outside_locking_code() {
        let frames: Vec<String> =
            ["_raw_spin_lock", "queued_spin_lock_slowpath", "do_mmap", "vm_mmap_pgoff"].map(String::from).to_vec();
        assert_eq!(caller(&frames), "do_mmap");
        // As a stack taken in the contention_begin tracepoint reads: the BPF
        // program and the tracing glue come first.
        let traced: Vec<String> = [
            "bpf_prog_6deef7357e7b4530_dlm_lock_contention_begin",
            "bpf_trace_run2",
            "__bpf_trace_contention_begin",
            "__traceiter_contention_begin",
            "__mutex_lock.constprop.0",
            "kernfs_iop_permission",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(caller(&traced), "kernfs_iop_permission");
        let all_lock: Vec<String> = vec!["mutex_lock".into()];
        assert_eq!(caller(&all_lock), "mutex_lock");
        assert_eq!(caller(&[]), "[unknown]");
    }

    #[test]
    fn exited_processes_keep_their_recorded_name() {
        let mut recorded = [0u8; 16];
        recorded[..2].copy_from_slice(b"dd");
        // No process has pid u32::MAX.
        assert_eq!(comm_or(u32::MAX, &recorded), "dd");
        assert_eq!(comm_or(u32::MAX, &[0; 16]), "[exited]");
        assert_eq!(comm_or(std::process::id(), &recorded), comm(std::process::id()));
    }

    #[test]
    fn filters_combine_pids_and_names() {
        let filter = Filter { pids: Some(HashSet::from([7])), comm: Some("post".into()) };
        assert!(filter.accepts(7, "postgres"));
        assert!(!filter.accepts(8, "postgres"));
        assert!(!filter.accepts(7, "redis"));
        assert!(Filter::default().accepts(1, "init"));
    }
}
