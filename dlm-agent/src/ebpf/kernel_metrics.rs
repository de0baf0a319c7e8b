//! The agent's kernel metrics, second half: a Prometheus collector that
//! turns the latest [`Snapshot`] (read from the eBPF maps by
//! [`super::map_reader`]) into metric families at scrape time.
//!
//! Cardinality stays bounded: histograms are labelled only by enums (lock
//! type, stall kind); per-process and per-caller series are the top
//! [`TOP_K`] by time, the rest summed under `other`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use dlm_ebpf_common::{WaitStat, stall_kinds};
use prometheus::{
    core::{Collector, Desc},
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use super::{decode, map_reader::Snapshot, report};

/// Series kept per top-K metric before the rest is summed as `other`.
pub const TOP_K: usize = 10;

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
}
