//! The agent's kernel metrics: a thread reads the eBPF maps every few
//! seconds into a [`Snapshot`], and a Prometheus collector turns the latest
//! snapshot into metric families at scrape time.
//!
//! Cardinality stays bounded: histograms are labelled only by enums (lock
//! type, stall kind); per-process and per-caller series are the top
//! [`TOP_K`] by time, the rest summed under `other`. Entries of processes
//! that have exited are removed from the maps (so the maps do not fill up)
//! and their time kept here, so every counter only grows.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dlm_ebpf_common::{FutexKey, MemKey, SchedStat, WaitStat, event_kinds, stall_kinds};
use prometheus::{
    core::{Collector, Desc},
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use super::{MapFill, Probes, ProgramCost, decode, report, symbols::KernelSymbols};

/// Series kept per top-K metric before the rest is summed as `other`.
pub const TOP_K: usize = 10;
/// Distinct names remembered for exited processes; more are summed as `other`.
const RETIRED_NAMES_MAX: usize = 1000;

/// Why eBPF is on or off, for the status metric and log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EbpfState {
    /// Attached.
    On,
    /// Turned off by configuration (`--no-ebpf`).
    Disabled,
    /// Not permitted, or failed: the reason.
    Unavailable(String),
}

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

/// The Prometheus side: metric families from the latest snapshot.
pub struct KernelMetrics {
    state: EbpfState,
    snapshot: Arc<Mutex<Snapshot>>,
    descs: Vec<Desc>,
}

/// (name, help) of every family the collector emits.
const FAMILIES: &[(&str, &str)] = &[
    ("dlm_ebpf_enabled", "1 when the eBPF programs are attached, 0 when eBPF is off or not permitted."),
    ("dlm_ebpf_programs_attached", "Tracepoint links of the agent's eBPF programs."),
    ("dlm_ebpf_run_stats_enabled", "1 when the kernel counts BPF run time (kernel.bpf_stats_enabled)."),
    ("dlm_ebpf_program_run_seconds_total", "Time the kernel spent running each program (when run stats are on)."),
    ("dlm_ebpf_program_runs_total", "Runs of each program (when run stats are on)."),
    ("dlm_ebpf_map_entries", "Entries in each statistics map."),
    ("dlm_ebpf_map_capacity", "Capacity of each statistics map."),
    ("dlm_ebpf_dropped_updates_total", "Updates lost because a map was full or a helper failed."),
    ("dlm_kernel_lock_wait_seconds", "Kernel lock contention waits, by lock type."),
    ("dlm_kernel_lock_wait_by_caller_seconds_total", "Kernel lock wait time by type and caller (top callers)."),
    ("dlm_futex_wait_seconds", "futex(2) waits."),
    ("dlm_futex_wait_by_process_seconds_total", "futex wait time by process name (top processes)."),
    ("dlm_sched_runqueue_delay_seconds", "Time runnable tasks waited for a CPU."),
    ("dlm_sched_blocked_seconds", "Time tasks were blocked (sleeping) before a wake-up."),
    ("dlm_sched_context_switches_total", "Context switches by kind (voluntary: blocked, involuntary: preempted)."),
    ("dlm_sched_offcpu_by_process_seconds_total", "Off-CPU time by process name and state (top processes)."),
    ("dlm_memory_stall_seconds", "Direct reclaim, memcg reclaim and compaction stalls."),
    ("dlm_memory_stall_by_process_seconds_total", "Memory stall time by process name and kind (top processes)."),
    ("dlm_memory_long_stalls_total", "Memory stalls longer than the long-stall threshold."),
    ("dlm_memory_kswapd_wakeups_total", "kswapd wake-ups."),
    ("dlm_memory_oom_kills_total", "Processes the kernel chose as OOM victims."),
    ("dlm_pressure_stall_seconds_total", "Pressure stall information (/proc/pressure), by resource and kind."),
];

impl KernelMetrics {
    /// The collector over `snapshot`.
    pub fn new(state: EbpfState, snapshot: Arc<Mutex<Snapshot>>) -> KernelMetrics {
        let descs = FAMILIES
            .iter()
            .filter_map(|(name, help)| Desc::new((*name).into(), (*help).into(), Vec::new(), HashMap::new()).ok())
            .collect();
        KernelMetrics { state, snapshot, descs }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

fn family(name: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let help = FAMILIES.iter().find(|(n, _)| *n == name).map_or("", |(_, h)| h);
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

fn gauge(value: f64, pairs: &[(&str, &str)]) -> Metric {
    let mut gauge = Gauge::default();
    gauge.set_value(value);
    let mut metric = Metric::from_label(labels(pairs));
    metric.set_gauge(gauge);
    metric
}

fn counter(value: f64, pairs: &[(&str, &str)]) -> Metric {
    let mut counter = Counter::default();
    counter.set_value(value);
    let mut metric = Metric::from_label(labels(pairs));
    metric.set_counter(counter);
    metric
}

fn histogram(stat: &WaitStat, pairs: &[(&str, &str)]) -> Metric {
    let mut histogram = Histogram::default();
    histogram.set_sample_count(stat.count);
    histogram.set_sample_sum(stat.total_ns as f64 / 1e9);
    histogram.set_bucket(
        decode::cumulative_buckets(stat)
            .into_iter()
            .map(|(le, count)| {
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(le);
                bucket.set_cumulative_count(count);
                bucket
            })
            .collect(),
    );
    let mut metric = Metric::from_label(labels(pairs));
    metric.set_histogram(histogram);
    metric
}

/// The `k` largest values, and the rest summed under `other`.
pub fn top_k<K: Clone + Ord>(values: &HashMap<K, u64>, k: usize, other: K) -> Vec<(K, u64)> {
    let mut sorted: Vec<(K, u64)> = values.iter().map(|(key, value)| (key.clone(), *value)).collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest: u64 = sorted.iter().skip(k).map(|(_, value)| value).sum();
    sorted.truncate(k);
    if rest > 0 {
        match sorted.iter_mut().find(|(key, _)| *key == other) {
            Some(entry) => entry.1 += rest,
            None => sorted.push((other, rest)),
        }
    }
    sorted
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Collector for KernelMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let on = self.state == EbpfState::On;
        let mut out = vec![family("dlm_ebpf_enabled", MetricType::GAUGE, vec![gauge(f64::from(u8::from(on)), &[])])];
        out.push(family(
            "dlm_pressure_stall_seconds_total",
            MetricType::COUNTER,
            report::pressure()
                .into_iter()
                .map(|(resource, kind, us)| counter(us as f64 / 1e6, &[("resource", resource), ("kind", kind)]))
                .collect(),
        ));
        let snapshot = match self.snapshot.lock() {
            Ok(snapshot) => snapshot.clone(),
            Err(_) => return out,
        };
        out.push(family("dlm_ebpf_programs_attached", MetricType::GAUGE, vec![gauge(snapshot.links as f64, &[])]));
        if !on {
            return out;
        }
        out.push(family(
            "dlm_ebpf_run_stats_enabled",
            MetricType::GAUGE,
            vec![gauge(f64::from(u8::from(snapshot.run_stats)), &[])],
        ));
        out.push(family(
            "dlm_ebpf_program_run_seconds_total",
            MetricType::COUNTER,
            snapshot.costs.iter().map(|c| counter(seconds(c.run_time_ns), &[("program", &c.program)])).collect(),
        ));
        out.push(family(
            "dlm_ebpf_program_runs_total",
            MetricType::COUNTER,
            snapshot.costs.iter().map(|c| counter(c.run_count as f64, &[("program", &c.program)])).collect(),
        ));
        out.push(family(
            "dlm_ebpf_map_entries",
            MetricType::GAUGE,
            snapshot.fill.iter().map(|f| gauge(f.entries as f64, &[("map", f.map)])).collect(),
        ));
        out.push(family(
            "dlm_ebpf_map_capacity",
            MetricType::GAUGE,
            snapshot.fill.iter().map(|f| gauge(f.capacity as f64, &[("map", f.map)])).collect(),
        ));
        out.push(family(
            "dlm_ebpf_dropped_updates_total",
            MetricType::COUNTER,
            snapshot.drops.iter().map(|(map, count)| counter(*count as f64, &[("map", map)])).collect(),
        ));
        let mut lock_types: Vec<_> = snapshot.lock_by_type.iter().collect();
        lock_types.sort_by_key(|(name, _)| **name);
        out.push(family(
            "dlm_kernel_lock_wait_seconds",
            MetricType::HISTOGRAM,
            lock_types.into_iter().map(|(kind, stat)| histogram(stat, &[("type", kind)])).collect(),
        ));
        out.push(family(
            "dlm_kernel_lock_wait_by_caller_seconds_total",
            MetricType::COUNTER,
            top_k(&snapshot.lock_by_caller, TOP_K, ("other", "other".to_owned()))
                .iter()
                .map(|((kind, caller), ns)| counter(seconds(*ns), &[("type", kind), ("caller", caller)]))
                .collect(),
        ));
        out.push(family("dlm_futex_wait_seconds", MetricType::HISTOGRAM, vec![histogram(&snapshot.futex, &[])]));
        out.push(family(
            "dlm_futex_wait_by_process_seconds_total",
            MetricType::COUNTER,
            top_k(&snapshot.futex_by_comm, TOP_K, "other".to_owned())
                .iter()
                .map(|(comm, ns)| counter(seconds(*ns), &[("comm", comm)]))
                .collect(),
        ));
        out.push(family(
            "dlm_sched_runqueue_delay_seconds",
            MetricType::HISTOGRAM,
            vec![histogram(&snapshot.sched.runq, &[])],
        ));
        out.push(family(
            "dlm_sched_blocked_seconds",
            MetricType::HISTOGRAM,
            vec![histogram(&snapshot.sched.blocked, &[])],
        ));
        out.push(family(
            "dlm_sched_context_switches_total",
            MetricType::COUNTER,
            vec![
                counter(snapshot.sched.voluntary as f64, &[("kind", "voluntary")]),
                counter(snapshot.sched.involuntary as f64, &[("kind", "involuntary")]),
            ],
        ));
        let offcpu_total: HashMap<String, u64> =
            snapshot.offcpu_by_comm.iter().map(|(comm, (blocked, runq))| (comm.clone(), blocked + runq)).collect();
        // The top processes by blocked + run-queue time keep their names;
        // the rest is summed under `other`, both states alike.
        let top: Vec<String> = top_k(&offcpu_total, TOP_K, "other".to_owned()).into_iter().map(|(n, _)| n).collect();
        let mut grouped: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (comm, (blocked, runq)) in &snapshot.offcpu_by_comm {
            let name = if top.contains(comm) { comm.as_str() } else { "other" };
            let times = grouped.entry(name).or_default();
            times.0 += blocked;
            times.1 += runq;
        }
        let mut offcpu = Vec::new();
        for (comm, (blocked, runq)) in grouped {
            offcpu.push(counter(seconds(blocked), &[("comm", comm), ("state", "blocked")]));
            offcpu.push(counter(seconds(runq), &[("comm", comm), ("state", "runqueue")]));
        }
        out.push(family("dlm_sched_offcpu_by_process_seconds_total", MetricType::COUNTER, offcpu));
        let kinds = [stall_kinds::DIRECT_RECLAIM, stall_kinds::MEMCG_RECLAIM, stall_kinds::COMPACTION];
        out.push(family(
            "dlm_memory_stall_seconds",
            MetricType::HISTOGRAM,
            kinds
                .iter()
                .map(|kind| histogram(&snapshot.stalls[*kind as usize], &[("kind", decode::stall_kind(*kind))]))
                .collect(),
        ));
        out.push(family(
            "dlm_memory_stall_by_process_seconds_total",
            MetricType::COUNTER,
            top_k(&snapshot.stalls_by_comm, TOP_K, ("other".to_owned(), "all"))
                .iter()
                .map(|((comm, kind), ns)| counter(seconds(*ns), &[("comm", comm), ("kind", kind)]))
                .collect(),
        ));
        out.push(family(
            "dlm_memory_long_stalls_total",
            MetricType::COUNTER,
            kinds
                .iter()
                .map(|kind| {
                    counter(snapshot.long_stalls[*kind as usize] as f64, &[("kind", decode::stall_kind(*kind))])
                })
                .collect(),
        ));
        out.push(family(
            "dlm_memory_kswapd_wakeups_total",
            MetricType::COUNTER,
            vec![counter(snapshot.kswapd_wakes as f64, &[])],
        ));
        out.push(family(
            "dlm_memory_oom_kills_total",
            MetricType::COUNTER,
            vec![counter(snapshot.oom_kills as f64, &[])],
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_and_sums_the_rest() {
        let values: HashMap<String, u64> =
            [("a", 50), ("b", 40), ("c", 5), ("d", 3), ("other", 1)].map(|(k, v)| (k.to_owned(), v)).into();
        let top = top_k(&values, 2, "other".to_owned());
        assert_eq!(top, vec![("a".to_owned(), 50), ("b".to_owned(), 40), ("other".to_owned(), 9)]);
        let all = top_k(&values, 10, "other".to_owned());
        assert_eq!(all.iter().map(|(_, v)| v).sum::<u64>(), 99);
        assert_eq!(all.len(), 5);
    }

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
