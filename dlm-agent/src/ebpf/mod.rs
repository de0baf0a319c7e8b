//! In-kernel observation: loading and attaching the dlm eBPF programs
//! (`dlm-ebpf`, embedded in the binary at build time), and reading what they
//! aggregate.
//!
//! [`Probes`] owns the loaded object. The agent attaches every family at
//! start when it may ([`Probes::load`] fails with
//! [`ProbeError::NotPermitted`] otherwise, and the agent runs on without);
//! `dlm-agent trace` attaches one family at a time.

pub mod agent;
pub mod attribution;
pub mod btf;
pub mod decode;
pub mod kernel_metrics;
pub mod map_reader;
pub mod programs;
pub mod report;
pub mod symbols;
pub mod tracefs;

use std::{collections::BTreeSet, time::Duration};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    programs::{BtfTracePoint, TracePoint},
};
use dlm_ebpf_common::{
    FutexKey, HolderThread, KernelEvent, LockKey, MemKey, OffcpuStackKey, SchedStat, TaskSched, WaitStat, capacity,
    drops, sched_hists, sched_slots,
};
pub use programs::Family;

pub use self::attribution::AttributionMaps;

/// The compiled programs, built by `build.rs` with aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dlm-ebpf"));

/// What the programs measure, fixed at load time.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only this process (0: all).
    pub target_tgid: u32,
    /// Kernel-lock statistics per thread too.
    pub lock_per_task: bool,
    /// Keep stacks of sleeping switches out (folded off-CPU stacks).
    pub offcpu_stacks: bool,
    /// Minimum block time of a folded off-CPU stack.
    pub offcpu_min: Duration,
    /// Memory stalls at least this long are also sent as events.
    pub long_stall: Duration,
    /// The `sched` family may be attached: its per-thread array gets a slot
    /// for every thread id (up to 12 MiB of kernel memory, see
    /// [`sched_slots`]). Off, the array is left at its minimum and `sched`
    /// cannot be attached.
    pub sched: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            target_tgid: 0,
            lock_per_task: false,
            offcpu_stacks: false,
            offcpu_min: Duration::from_millis(1),
            long_stall: Duration::from_millis(10),
            sched: true,
        }
    }
}

/// Why the programs could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Not root, and not CAP_BPF + CAP_PERFMON.
    #[error("not permitted to load eBPF programs ({0}); run as root or grant CAP_BPF and CAP_PERFMON")]
    NotPermitted(String),
    /// The kernel refused a program or map.
    #[error("loading the eBPF programs failed: {0}")]
    Load(String),
    /// A tracepoint could not be attached.
    #[error("attaching {program} to {category}:{tracepoint} failed: {error}")]
    Attach {
        /// The program.
        program: &'static str,
        /// Tracepoint category.
        category: &'static str,
        /// Tracepoint name.
        tracepoint: &'static str,
        /// The error.
        error: String,
    },
    /// A map is missing or unreadable.
    #[error("reading map {0} failed: {1}")]
    Map(&'static str, String),
    /// What was read could not be written out (a flame graph's file).
    #[error("writing {0}")]
    Output(String),
}

/// Whether an error chain says EPERM or EACCES.
fn is_permission_error(error: &dyn std::error::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(error) = source {
        let text = error.to_string();
        if text.contains("Operation not permitted") || text.contains("Permission denied") {
            return true;
        }
        source = error.source();
    }
    false
}

/// `kernel.pid_max`, or the kernel's default when unreadable.
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|text| text.trim().parse().ok()).unwrap_or(32_768)
}

/// The cost of one program, from the kernel's BPF statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramCost {
    /// Program name.
    pub program: String,
    /// Total run time (0 unless `kernel.bpf_stats_enabled` is on).
    pub run_time_ns: u64,
    /// Number of runs (same condition).
    pub run_count: u64,
}

/// How full a map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// Map name.
    pub map: &'static str,
    /// Entries now.
    pub entries: u64,
    /// Capacity.
    pub capacity: u64,
}

/// The loaded programs and their maps.
pub struct Probes {
    ebpf: Ebpf,
    attached: BTreeSet<Family>,
    links: usize,
    /// The kernel's BTF, read when the first BTF tracepoint is loaded.
    btf: Option<aya::Btf>,
    /// Loaded with room for `sched` ([`Settings::sched`]).
    sched: bool,
}

impl Probes {
    /// Loads the programs (verifying them) without attaching any.
    ///
    /// # Errors
    /// [`ProbeError::NotPermitted`] without the privilege, else
    /// [`ProbeError::Load`].
    pub fn load(settings: &Settings) -> Result<Probes, ProbeError> {
        let target_tgid = settings.target_tgid;
        let lock_per_task = u32::from(settings.lock_per_task);
        let offcpu_stacks = u32::from(settings.offcpu_stacks);
        let offcpu_min = u64::try_from(settings.offcpu_min.as_nanos()).unwrap_or(u64::MAX);
        let long_stall = u64::try_from(settings.long_stall.as_nanos()).unwrap_or(u64::MAX);
        let (offsets, futex) =
            btf::task_offsets().map_err(|e| ProbeError::Load(format!("task_struct offsets: {e}")))?;
        let (pid_offset, tgid_offset, run_delay_offset) =
            (offsets.pid as u64, offsets.tgid as u64, offsets.run_delay as u64);
        let (comm_offset, mm_offset, anon_pages_offset) =
            offsets.oom.map_or((u64::MAX, u64::MAX, u64::MAX), |o| (o.comm as u64, o.mm as u64, o.anon_pages as u64));
        let (futex_nr, futex_waitv_nr, syscall_offset) =
            futex.map_or((u64::MAX, u64::MAX, 0), |f| (f.futex, f.futex_waitv, f.offset as u64));
        let task_slots = if settings.sched { sched_slots::for_pid_max(pid_max()) } else { sched_slots::MIN };
        let task_slot_mask = task_slots - 1;
        let ebpf = EbpfLoader::new()
            .map_max_entries("TASK_SCHED", task_slots)
            .override_global("TASK_SLOT_MASK", &task_slot_mask, true)
            .override_global("TASK_PID_OFFSET", &pid_offset, true)
            .override_global("TASK_TGID_OFFSET", &tgid_offset, true)
            .override_global("TASK_RUN_DELAY_OFFSET", &run_delay_offset, true)
            .override_global("TASK_COMM_OFFSET", &comm_offset, true)
            .override_global("TASK_MM_OFFSET", &mm_offset, true)
            .override_global("MM_ANON_PAGES_OFFSET", &anon_pages_offset, true)
            .override_global("FUTEX_SYSCALL_NR", &futex_nr, true)
            .override_global("FUTEX_WAITV_SYSCALL_NR", &futex_waitv_nr, true)
            .override_global("PT_REGS_SYSCALL_OFFSET", &syscall_offset, true)
            .override_global("TARGET_TGID", &target_tgid, true)
            .override_global("LOCK_PER_TASK", &lock_per_task, true)
            .override_global("OFFCPU_STACKS_ON", &offcpu_stacks, true)
            .override_global("OFFCPU_MIN_NS", &offcpu_min, true)
            .override_global("LONG_STALL_NS", &long_stall, true)
            .load(OBJECT)
            .map_err(|error| {
                if is_permission_error(&error) {
                    ProbeError::NotPermitted(error.to_string())
                } else {
                    ProbeError::Load(format!("{error:#}"))
                }
            })?;
        Ok(Probes { ebpf, attached: BTreeSet::new(), links: 0, btf: None, sched: settings.sched })
    }

    /// Loads (verifies) and attaches the programs of `families`. Already
    /// attached families are left as they are. Every program is tried: a
    /// family with some of its programs attached counts as attached (a
    /// classic tracepoint needs a readable tracefs, which CAP_BPF and
    /// CAP_PERFMON alone do not give; the BTF tracepoints need neither).
    ///
    /// # Errors
    /// The first program that failed; the others are attached.
    pub fn attach(&mut self, families: &[Family]) -> Result<(), ProbeError> {
        let mut first_error = None;
        for family in families {
            if self.attached.contains(family) {
                continue;
            }
            if *family == Family::Sched && !self.sched {
                first_error.get_or_insert(ProbeError::Attach {
                    program: "dlm_sched_switch",
                    category: programs::BTF,
                    tracepoint: "sched_switch",
                    error: "loaded without per-thread slots (Settings::sched is off)".into(),
                });
                continue;
            }
            let links_before = self.links;
            for attachment in programs::ATTACHMENTS.iter().filter(|a| a.family == *family) {
                match self.attach_one(attachment) {
                    Ok(()) => self.links += 1,
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            if self.links > links_before {
                self.attached.insert(*family);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn attach_one(&mut self, attachment: &programs::Attachment) -> Result<(), ProbeError> {
        let fail = |error: String| ProbeError::Attach {
            program: attachment.program,
            category: attachment.category,
            tracepoint: attachment.tracepoint,
            error,
        };
        if attachment.category == programs::BTF {
            if self.btf.is_none() {
                self.btf = Some(aya::Btf::from_sys_fs().map_err(|e| fail(format!("kernel BTF: {e}")))?);
            }
            let btf = self.btf.as_ref().ok_or_else(|| fail("kernel BTF".into()))?;
            let program = self
                .ebpf
                .program_mut(attachment.program)
                .ok_or_else(|| fail("no such program in the object".into()))?;
            let program: &mut BtfTracePoint = program.try_into().map_err(|e| fail(format!("{e}")))?;
            program.load(attachment.tracepoint, btf).map_err(|e| load_failed(&e, &fail))?;
            program.attach().map_err(|e| fail(format!("{e:#}")))?;
        } else {
            // Classic tracepoints are found through tracefs.
            tracefs::ensure_mounted().map_err(&fail)?;
            let program = self
                .ebpf
                .program_mut(attachment.program)
                .ok_or_else(|| fail("no such program in the object".into()))?;
            let program: &mut TracePoint = program.try_into().map_err(|e| fail(format!("{e}")))?;
            if program.fd().is_err() {
                program.load().map_err(|e| load_failed(&e, &fail))?;
            }
            program.attach(attachment.category, attachment.tracepoint).map_err(|e| fail(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// The families attached.
    pub fn attached(&self) -> &BTreeSet<Family> {
        &self.attached
    }

    /// Number of tracepoint links attached.
    pub fn links(&self) -> usize {
        self.links
    }

    /// Run time and count of every loaded program.
    pub fn program_costs(&self) -> Vec<ProgramCost> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramCost {
                    program: name.to_owned(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: info.run_count(),
                })
            })
            .collect()
    }

    /// Takes the maps the agent's driver uses for DLM attribution.
    pub fn take_attribution_maps(&mut self) -> Option<AttributionMaps> {
        AttributionMaps::take(&mut self.ebpf)
    }

    fn per_cpu_hash<K: Pod, V: Pod>(
        &self,
        name: &'static str,
        merge: impl Fn(&mut V, &V),
    ) -> Result<Vec<(K, V)>, ProbeError> {
        let map = self.ebpf.map(name).ok_or_else(|| ProbeError::Map(name, "not in the object".into()))?;
        let map: PerCpuHashMap<&MapData, K, V> =
            PerCpuHashMap::try_from(map).map_err(|e| ProbeError::Map(name, e.to_string()))?;
        let mut out = Vec::new();
        // Entries removed while iterating (by the programs or a prune) show
        // up as errors for that key only: skip them.
        for (key, values) in map.iter().flatten() {
            let mut copies = values.iter();
            if let Some(first) = copies.next() {
                let mut total = *first;
                for copy in copies {
                    merge(&mut total, copy);
                }
                out.push((key, total));
            }
        }
        Ok(out)
    }

    fn clear<K: Pod, V: Pod>(&mut self, name: &'static str) -> Result<(), ProbeError> {
        self.remove_where::<K, V>(name, |_| true)
    }

    /// Removes the entries of per-CPU hash map `name` whose key matches.
    ///
    /// # Errors
    /// The map is missing or of another type.
    pub fn remove_where<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
        matches: impl Fn(&K) -> bool,
    ) -> Result<(), ProbeError> {
        let map = self.ebpf.map_mut(name).ok_or_else(|| ProbeError::Map(name, "not in the object".into()))?;
        let mut map: PerCpuHashMap<&mut MapData, K, V> =
            PerCpuHashMap::try_from(map).map_err(|e| ProbeError::Map(name, e.to_string()))?;
        let keys: Vec<K> = map.keys().flatten().filter(|key| matches(key)).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Kernel lock contention by (task, type, stack).
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn lock_stats(&self) -> Result<Vec<(LockKey, WaitStat)>, ProbeError> {
        self.per_cpu_hash("LOCK_STATS", WaitStat::merge)
    }

    /// Futex waits by (process, op, address).
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn futex_stats(&self) -> Result<Vec<(FutexKey, WaitStat)>, ProbeError> {
        self.per_cpu_hash("FUTEX_STATS", WaitStat::merge)
    }

    /// Off-CPU statistics by process, summed over its threads' slots
    /// (run-queue and blocked totals and maxima; the histograms are
    /// system-wide, see [`Probes::sched_histograms`]). A thread's last time
    /// away is counted at its next switch out ([`TaskSched`]).
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn sched_stats(&self) -> Result<Vec<(u32, SchedStat)>, ProbeError> {
        let mut by_process: std::collections::BTreeMap<u32, SchedStat> = std::collections::BTreeMap::new();
        for (_, task) in self.task_slots()? {
            let stat = by_process.entry(task.tgid).or_default();
            stat.voluntary += task.voluntary;
            stat.involuntary += task.involuntary;
            stat.runq.total_ns += task.runq_ns;
            stat.runq.max_ns = stat.runq.max_ns.max(task.runq_max_ns);
            stat.blocked.total_ns += task.blocked_ns;
            stat.blocked.max_ns = stat.blocked.max_ns.max(task.blocked_max_ns);
        }
        Ok(by_process.into_iter().collect())
    }

    /// The occupied `TASK_SCHED` slots, by index: one lookup per slot, a few
    /// tens of milliseconds for the 32,768 slots of a default `pid_max`, so
    /// none while `sched` is not attached (the slots are all empty then).
    fn task_slots(&self) -> Result<Vec<(u32, TaskSched)>, ProbeError> {
        if !self.attached.contains(&Family::Sched) {
            return Ok(Vec::new());
        }
        let name = "TASK_SCHED";
        let map = self.ebpf.map(name).ok_or_else(|| ProbeError::Map(name, "not in the object".into()))?;
        let array: Array<&MapData, TaskSched> =
            Array::try_from(map).map_err(|e| ProbeError::Map(name, e.to_string()))?;
        let mut occupied = Vec::new();
        for index in 0..array.len() {
            let task = array.get(&index, 0).map_err(|e| ProbeError::Map(name, e.to_string()))?;
            if task.pid != 0 && task.tgid != 0 {
                occupied.push((index, task));
            }
        }
        Ok(occupied)
    }

    /// System-wide (run-queue delay, blocked time) histograms.
    pub fn sched_histograms(&self) -> (WaitStat, WaitStat) {
        let read = |index: u32| {
            self.ebpf
                .map("SCHED_HIST")
                .and_then(|map| PerCpuArray::<&MapData, WaitStat>::try_from(map).ok())
                .and_then(|array| array.get(&index, 0).ok())
                .map_or(WaitStat::ZERO, |copies| decode::sum_wait(copies.iter().copied()))
        };
        (read(sched_hists::RUNQ), read(sched_hists::BLOCKED))
    }

    /// Forgets the scheduler state of threads of the processes `exited`.
    pub fn forget_tasks(&mut self, exited: &[u32]) {
        self.forget_tasks_where(|task| exited.contains(&task.tgid));
    }

    /// Empties the slots of the threads `matches` picks. A thread that
    /// switches meanwhile may lose that switch's update, as with any reset.
    fn forget_tasks_where(&mut self, matches: impl Fn(&TaskSched) -> bool) {
        let Ok(slots) = self.task_slots() else { return };
        let Some(map) = self.ebpf.map_mut("TASK_SCHED") else { return };
        let Ok(mut array) = Array::<&mut MapData, TaskSched>::try_from(map) else { return };
        for (index, _) in slots.iter().filter(|(_, task)| matches(task)) {
            let _ = array.set(*index, TaskSched::default(), 0);
        }
    }

    /// Blocked time by stacks.
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn offcpu_stacks(&self) -> Result<Vec<(OffcpuStackKey, u64)>, ProbeError> {
        self.per_cpu_hash("OFFCPU_STACKS", |total: &mut u64, copy: &u64| *total += copy)
    }

    /// Memory stalls by (process, kind, cgroup).
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn mem_stats(&self) -> Result<Vec<(MemKey, WaitStat)>, ProbeError> {
        self.per_cpu_hash("MEM_STATS", WaitStat::merge)
    }

    /// Empties the statistics maps (for per-interval views).
    ///
    /// # Errors
    /// A map cannot be written.
    pub fn reset(&mut self) -> Result<(), ProbeError> {
        self.clear::<LockKey, WaitStat>("LOCK_STATS")?;
        self.clear::<FutexKey, WaitStat>("FUTEX_STATS")?;
        self.forget_tasks_where(|_| true);
        if let Some(map) = self.ebpf.map_mut("SCHED_HIST")
            && let Ok(mut array) = PerCpuArray::<&mut MapData, WaitStat>::try_from(map)
        {
            let cpus = aya::util::nr_cpus().unwrap_or(1);
            for index in [sched_hists::RUNQ, sched_hists::BLOCKED] {
                if let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![WaitStat::ZERO; cpus]) {
                    let _ = array.set(index, zeros, 0);
                }
            }
        }
        self.clear::<OffcpuStackKey, u64>("OFFCPU_STACKS")?;
        self.clear::<MemKey, WaitStat>("MEM_STATS")
    }

    fn per_cpu_array_sum(&self, name: &'static str, index: u32) -> u64 {
        self.ebpf
            .map(name)
            .and_then(|map| PerCpuArray::<&MapData, u64>::try_from(map).ok())
            .and_then(|array| array.get(&index, 0).ok())
            .map_or(0, |values| values.iter().sum())
    }

    /// kswapd wake-ups since load.
    pub fn kswapd_wakes(&self) -> u64 {
        self.per_cpu_array_sum("KSWAPD_WAKES", 0)
    }

    /// Updates lost, by [`drops::NAMES`] index.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        (0..drops::COUNT).map(|index| (drops::NAMES[index as usize], self.per_cpu_array_sum("DROPS", index))).collect()
    }

    fn occupied_task_slots(&self) -> u64 {
        self.task_slots().map_or(0, |slots| slots.len() as u64)
    }

    fn task_slot_count(&self) -> u32 {
        self.ebpf
            .map("TASK_SCHED")
            .and_then(|map| Array::<&MapData, TaskSched>::try_from(map).ok())
            .map_or(0, |array| array.len())
    }

    fn count_plain<K: Pod, V: Pod>(&self, name: &'static str) -> u64 {
        self.ebpf
            .map(name)
            .and_then(|map| HashMap::<&MapData, K, V>::try_from(map).ok())
            .map_or(0, |map| map.keys().flatten().count() as u64)
    }

    fn count<K: Pod, V: Pod>(&self, name: &'static str) -> u64 {
        self.ebpf
            .map(name)
            .and_then(|map| PerCpuHashMap::<&MapData, K, V>::try_from(map).ok())
            .map_or(0, |map| map.keys().flatten().count() as u64)
    }

    /// Entries and capacity of the statistics maps (one syscall per key:
    /// fine for the few thousand entries they hold, read every few seconds).
    pub fn map_fill(&self) -> Vec<MapFill> {
        let stacks = self
            .ebpf
            .map("STACKS")
            .and_then(|map| StackTraceMap::<&MapData>::try_from(map).ok())
            .map_or(0, |map| map.stack_ids().flatten().count() as u64);
        let fill = |map, entries, cap: u32| MapFill { map, entries, capacity: u64::from(cap) };
        vec![
            fill("LOCK_STATS", self.count::<LockKey, WaitStat>("LOCK_STATS"), capacity::LOCK_STATS),
            fill("FUTEX_STATS", self.count::<FutexKey, WaitStat>("FUTEX_STATS"), capacity::FUTEX_STATS),
            fill("TASK_SCHED", self.occupied_task_slots(), self.task_slot_count()),
            fill("HOLDER_THREADS", self.count_plain::<u32, HolderThread>("HOLDER_THREADS"), capacity::HOLDER_THREADS),
            fill("OFFCPU_STACKS", self.count::<OffcpuStackKey, u64>("OFFCPU_STACKS"), capacity::OFFCPU_STACKS),
            fill("MEM_STATS", self.count::<MemKey, WaitStat>("MEM_STATS"), capacity::MEM_STATS),
            fill("STACKS", stacks, capacity::STACKS),
        ]
    }

    /// The frames of stack `id`, innermost first.
    pub fn stack(&self, id: i32) -> Vec<u64> {
        let Ok(id) = u32::try_from(id) else {
            return Vec::new();
        };
        self.ebpf
            .map("STACKS")
            .and_then(|map| StackTraceMap::<&MapData>::try_from(map).ok())
            .and_then(|stacks| stacks.get(&id, 0).ok())
            .map(|stack| stack.frames().iter().map(|frame| frame.ip).collect())
            .unwrap_or_default()
    }

    /// Takes the ring buffer of rare events (OOM victims, long stalls).
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.ebpf.take_map("EVENTS").and_then(|map| aya::maps::RingBuf::try_from(map).ok())
    }
}

/// A program the kernel refused: for lack of privilege, or by the verifier.
fn load_failed(error: &aya::programs::ProgramError, fail: &dyn Fn(String) -> ProbeError) -> ProbeError {
    if is_permission_error(error) {
        ProbeError::NotPermitted(format!("{error:#}"))
    } else {
        fail(verifier_message(error))
    }
}

/// The verifier's log is long; its last lines say what went wrong.
fn verifier_message(error: &aya::programs::ProgramError) -> String {
    let text = format!("{error:#}");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// Decodes a ring buffer record.
pub fn decode_event(bytes: &[u8]) -> Option<KernelEvent> {
    (bytes.len() >= std::mem::size_of::<KernelEvent>()).then(|| {
        // Field by field, at the offsets of the repr(C) layout.
        let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let mut comm = [0u8; 16];
        comm.copy_from_slice(&bytes[40..56]);
        KernelEvent {
            kind: u32_at(0),
            pid: u32_at(4),
            tgid: u32_at(8),
            detail: u32_at(12),
            value: u64_at(16),
            cgroup: u64_at(24),
            time_ns: u64_at(32),
            comm,
        }
    })
}
