//! The agent's kernel metrics, first half: a thread reads the eBPF maps
//! every few seconds into a [`Snapshot`] (the other half,
//! [`super::kernel_metrics`], turns the latest snapshot into metric
//! families at scrape time).
//!
//! Entries of processes that have exited are removed from the maps (so the
//! maps do not fill up) and their time kept here, so every counter only
//! grows; names of exited processes are bounded too.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dlm_ebpf_common::{FutexKey, MemKey, SchedStat, WaitStat, event_kinds, stall_kinds};

use super::{MapFill, Probes, ProgramCost, decode, report, symbols::KernelSymbols};

/// Distinct names remembered for exited processes; more are summed as `other`.
const RETIRED_NAMES_MAX: usize = 1000;

/// What the maps held at the last read.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Tracepoint links attached.
    pub links: usize,
    /// Per-program cost.
    pub costs: Vec<ProgramCost>,
    /// Whether the kernel counts run time.
    pub run_stats: bool,
    /// Map fill.
    pub fill: Vec<MapFill>,
    /// Dropped updates by map.
    pub drops: Vec<(&'static str, u64)>,
    /// Kernel lock waits by type.
    pub lock_by_type: HashMap<&'static str, WaitStat>,
    /// Kernel lock wait time by (type, caller).
    pub lock_by_caller: HashMap<(&'static str, String), u64>,
    /// All futex waits.
    pub futex: WaitStat,
    /// Futex wait time by process name.
    pub futex_by_comm: HashMap<String, u64>,
    /// Run-queue delay and blocked time of all processes.
    pub sched: SchedStat,
    /// (blocked, run-queue) time by process name.
    pub offcpu_by_comm: HashMap<String, (u64, u64)>,
    /// Memory stalls by kind.
    pub stalls: [WaitStat; stall_kinds::COUNT],
    /// Memory stall time by (process name, kind).
    pub stalls_by_comm: HashMap<(String, &'static str), u64>,
    /// kswapd wake-ups.
    pub kswapd_wakes: u64,
    /// OOM victims seen.
    pub oom_kills: u64,
    /// Long stalls by kind.
    pub long_stalls: [u64; stall_kinds::COUNT],
}

/// What exited processes left behind (never shrinks, so counters only grow).
#[derive(Default)]
struct Retired {
    futex: WaitStat,
    futex_by_comm: HashMap<String, u64>,
    sched: SchedStat,
    offcpu_by_comm: HashMap<String, (u64, u64)>,
    stalls: [WaitStat; stall_kinds::COUNT],
    stalls_by_comm: HashMap<(String, &'static str), u64>,
}

/// Adds `value` under `key`, or under `other` once `map` has `max` keys.
fn add_bounded<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u64>, key: K, other: K, value: u64, max: usize) {
    *bounded_entry(map, key, other, max) += value;
}

/// The entry for `key`, or for `other` once `map` has `max` keys.
fn bounded_entry<K: std::hash::Hash + Eq, V: Default>(map: &mut HashMap<K, V>, key: K, other: K, max: usize) -> &mut V {
    let key = if map.len() >= max && !map.contains_key(&key) { other } else { key };
    map.entry(key).or_default()
}

fn alive(tgid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}")).exists()
}

/// Reads the maps into snapshots until stopped.
pub struct Reader {
    probes: Probes,
    events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    retired: Retired,
    names: HashMap<u32, String>,
    oom_kills: u64,
    long_stalls: [u64; stall_kinds::COUNT],
    symbols: KernelSymbols,
}

impl Reader {
    /// Reads `probes`, which must have the families attached already.
    pub fn new(mut probes: Probes) -> Reader {
        // Run statistics are not turned on here: they cost every program
        // some time; the `kernel.bpf_stats_enabled` sysctl is the operator's.
        let events = probes.take_events();
        Reader {
            probes,
            events,
            retired: Retired::default(),
            names: HashMap::new(),
            oom_kills: 0,
            long_stalls: [0; stall_kinds::COUNT],
            symbols: KernelSymbols::load(),
        }
    }

    fn name(&mut self, tgid: u32) -> String {
        if let Some(name) = self.names.get(&tgid) {
            return name.clone();
        }
        let name = report::comm(tgid);
        if self.names.len() < 65_536 {
            self.names.insert(tgid, name.clone());
        }
        name
    }

    /// Takes rare events off the ring buffer: OOM kills and long stalls
    /// become counts and spans.
    pub fn drain_events(&mut self) {
        let Some(events) = self.events.as_mut() else { return };
        let mut decoded = Vec::new();
        while let Some(item) = events.next() {
            if let Some(event) = super::decode_event(&item) {
                decoded.push(event);
            }
        }
        for event in decoded {
            let comm = String::from_utf8_lossy(&event.comm).trim_end_matches('\0').to_owned();
            match event.kind {
                event_kinds::OOM_VICTIM => {
                    self.oom_kills += 1;
                    let span = tracing::info_span!(
                        target: crate::telemetry::LOCK_TARGET,
                        "dlm.kernel.oom_kill",
                        otel.name = "OOM kill",
                        process.pid = event.pid,
                        process.command = %comm,
                        process.owner_uid = event.detail,
                        anon_rss_pages = event.value,
                    );
                    drop(span);
                    tracing::warn!(pid = event.pid, comm = %comm, "the kernel chose an OOM victim");
                }
                event_kinds::LONG_STALL => {
                    let kind = event.detail as usize;
                    if kind < stall_kinds::COUNT {
                        self.long_stalls[kind] += 1;
                    }
                    let span = tracing::info_span!(
                        target: crate::telemetry::LOCK_TARGET,
                        "dlm.kernel.stall",
                        otel.name = "memory stall",
                        stall.kind = decode::stall_kind(event.detail),
                        stall.duration_ns = event.value,
                        process.pid = event.tgid,
                        thread.id = event.pid,
                        process.command = %comm,
                        cgroup.id = event.cgroup,
                    );
                    drop(span);
                }
                _ => {}
            }
        }
    }

    /// Reads every map into a snapshot, retiring exited processes.
    pub fn read(&mut self) -> Snapshot {
        let mut snapshot = Snapshot {
            links: self.probes.links(),
            costs: self.probes.program_costs(),
            run_stats: std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1"),
            fill: self.probes.map_fill(),
            drops: self.probes.drops(),
            kswapd_wakes: self.probes.kswapd_wakes(),
            oom_kills: self.oom_kills,
            long_stalls: self.long_stalls,
            ..Snapshot::default()
        };
        self.read_locks(&mut snapshot);
        self.read_futex(&mut snapshot);
        self.read_sched(&mut snapshot);
        self.read_stalls(&mut snapshot);
        snapshot
    }

    fn read_locks(&mut self, snapshot: &mut Snapshot) {
        let Ok(rows) = report::lock_rows(&self.probes, &self.symbols, &report::Filter::default()) else { return };
        for row in rows {
            snapshot.lock_by_type.entry(row.lock_type).or_insert(WaitStat::ZERO).merge(&row.stat);
            *snapshot.lock_by_caller.entry((row.lock_type, row.caller)).or_insert(0) += row.stat.total_ns;
        }
    }

    fn read_futex(&mut self, snapshot: &mut Snapshot) {
        let Ok(entries) = self.probes.futex_stats() else { return };
        let mut exited = Vec::new();
        snapshot.futex = self.retired.futex;
        snapshot.futex_by_comm = self.retired.futex_by_comm.clone();
        for (key, stat) in entries {
            let name = self.name(key.tgid);
            snapshot.futex.merge(&stat);
            *snapshot.futex_by_comm.entry(name.clone()).or_insert(0) += stat.total_ns;
            if !alive(key.tgid) {
                self.retired.futex.merge(&stat);
                add_bounded(&mut self.retired.futex_by_comm, name, "other".into(), stat.total_ns, RETIRED_NAMES_MAX);
                exited.push(key);
            }
        }
        if !exited.is_empty() {
            let _ = self.probes.remove_where::<FutexKey, WaitStat>("FUTEX_STATS", |key| exited.contains(key));
        }
    }

    fn read_sched(&mut self, snapshot: &mut Snapshot) {
        let Ok(entries) = self.probes.sched_stats() else { return };
        let mut exited = Vec::new();
        let (runq, blocked) = self.probes.sched_histograms();
        snapshot.sched = SchedStat { runq, blocked, ..self.retired.sched };
        snapshot.offcpu_by_comm = self.retired.offcpu_by_comm.clone();
        for (tgid, stat) in entries {
            let name = self.name(tgid);
            snapshot.sched.voluntary += stat.voluntary;
            snapshot.sched.involuntary += stat.involuntary;
            let times = snapshot.offcpu_by_comm.entry(name.clone()).or_insert((0, 0));
            times.0 += stat.blocked.total_ns;
            times.1 += stat.runq.total_ns;
            if !alive(tgid) {
                self.retired.sched.voluntary += stat.voluntary;
                self.retired.sched.involuntary += stat.involuntary;
                let times =
                    bounded_entry(&mut self.retired.offcpu_by_comm, name, "other".to_owned(), RETIRED_NAMES_MAX);
                times.0 += stat.blocked.total_ns;
                times.1 += stat.runq.total_ns;
                exited.push(tgid);
            }
        }
        if !exited.is_empty() {
            self.probes.forget_tasks(&exited);
        }
    }

    fn read_stalls(&mut self, snapshot: &mut Snapshot) {
        let Ok(entries) = self.probes.mem_stats() else { return };
        let mut exited = Vec::new();
        snapshot.stalls = self.retired.stalls;
        snapshot.stalls_by_comm = self.retired.stalls_by_comm.clone();
        for (key, stat) in entries {
            let kind = key.kind as usize;
            if kind >= stall_kinds::COUNT {
                continue;
            }
            let name = match self.name(key.tgid) {
                name if name == "[exited]" => report::comm_or(key.tgid, &key.comm),
                name => name,
            };
            let kind_name = decode::stall_kind(key.kind);
            snapshot.stalls[kind].merge(&stat);
            *snapshot.stalls_by_comm.entry((name.clone(), kind_name)).or_insert(0) += stat.total_ns;
            if !alive(key.tgid) {
                self.retired.stalls[kind].merge(&stat);
                add_bounded(
                    &mut self.retired.stalls_by_comm,
                    (name, kind_name),
                    ("other".into(), kind_name),
                    stat.total_ns,
                    RETIRED_NAMES_MAX,
                );
                exited.push(key);
            }
        }
        if !exited.is_empty() {
            let _ = self.probes.remove_where::<MemKey, WaitStat>("MEM_STATS", |key| exited.contains(key));
        }
    }
}

/// Starts the reader thread: events every second, maps every `interval`.
/// Dropping the returned guard stops it.
pub fn spawn(mut reader: Reader, interval: Duration, shared: Arc<Mutex<Snapshot>>) -> ReaderGuard {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("dlm-ebpf-reader".into())
        .spawn(move || {
            let mut since_read = interval;
            while !stopping.load(Ordering::Relaxed) {
                reader.drain_events();
                if since_read >= interval {
                    let snapshot = reader.read();
                    if let Ok(mut shared) = shared.lock() {
                        *shared = snapshot;
                    }
                    since_read = Duration::ZERO;
                }
                let tick = Duration::from_millis(250);
                std::thread::sleep(tick);
                since_read += tick;
            }
        })
        .ok();
    ReaderGuard { stop, thread }
}

/// Stops the reader thread when dropped.
pub struct ReaderGuard {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_names_are_bounded() {
        let mut map = HashMap::new();
        for i in 0..10 {
            add_bounded(&mut map, format!("p{i}"), "other".to_owned(), 1, 4);
        }
        assert_eq!(map.len(), 5);
        assert_eq!(map["other"], 6);
    }
}
