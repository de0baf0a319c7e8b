//! The peer benchmark's report: rows of runs, medians and spreads, ratios
//! against the peers with the worst the spread allows, the tables, the
//! targets and the JSON.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Placement, Result, client_workers, online_cpus};

/// One row: a measure of every system, each measured several times.
#[derive(Default)]
pub struct Row {
    pub label: String,
    unit: &'static str,
    /// Larger is better (throughput) or smaller is (latency, time to grant).
    higher_is_better: bool,
    pub runs: BTreeMap<&'static str, Vec<f64>>,
}

impl Row {
    pub fn new(label: impl Into<String>, unit: &'static str, higher_is_better: bool) -> Row {
        Row { label: label.into(), unit, higher_is_better, runs: BTreeMap::new() }
    }

    pub fn add(&mut self, system: &'static str, value: f64) {
        self.runs.entry(system).or_default().push(value);
    }

    /// Median, lowest and highest of a system's runs.
    pub fn spread(&self, system: &str) -> Option<(f64, f64, f64)> {
        let mut runs = self.runs.get(system)?.clone();
        runs.retain(|v| v.is_finite());
        if runs.is_empty() {
            return None;
        }
        runs.sort_by(f64::total_cmp);
        let median = if runs.len() % 2 == 1 {
            runs[runs.len() / 2]
        } else {
            f64::midpoint(runs[runs.len() / 2 - 1], runs[runs.len() / 2])
        };
        Some((median, runs[0], runs[runs.len() - 1]))
    }

    /// How many times better dlm-unix is than `peer`: of the medians, and
    /// the worst the spread allows (dlm's worst run against the peer's best).
    fn ratio(&self, peer: &str) -> Option<(f64, f64)> {
        let (dlm, dlm_low, dlm_high) = self.spread(DLM)?;
        let (other, other_low, other_high) = self.spread(peer)?;
        if dlm <= 0.0 || other <= 0.0 {
            return None;
        }
        Some(if self.higher_is_better {
            (dlm / other, dlm_low / other_high)
        } else {
            (other / dlm, other_low / dlm_high)
        })
    }
}

/// The system the ratios are of.
pub const DLM: &str = "dlm-unix";
pub const SYSTEMS: [&str; 7] = ["dlm-unix", "dlm-unix-grpc", "dlm-tcp", "redis", "redis-unix", "etcd", ECHO];
/// The uncontended rows' floor: a server that only echoes (`floor::Echo`).
pub const ECHO: &str = "echo";
const PEERS: [&str; 3] = ["redis", "redis-unix", "etcd"];
/// Redis over loopback TCP, and over its Unix socket.
const REDIS: [&str; 2] = ["redis", "redis-unix"];

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// What one placement measured.
pub struct Measured {
    pub placement: Placement,
    pub rows: Vec<Row>,
    /// The Unix-socket round trip's p50 of each run, µs.
    pub floor_us: Vec<f64>,
    /// The eventfd round trip's p50 of each run, µs.
    pub eventfd_floor_us: Vec<f64>,
}

impl Measured {
    fn row(&self, label: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.label == label)
    }
}

pub fn print_table(measured: &Measured) {
    println!("\n== {}: {}", measured.placement.name(), measured.placement.describe());
    print!("{:<48}", "workload: median (lowest-highest)");
    for system in SYSTEMS {
        print!("{system:>24}");
    }
    for peer in PEERS {
        print!("{:>24}", format!("dlm vs {peer}"));
    }
    println!();
    for row in &measured.rows {
        print!("{:<48}", format!("{} ({})", row.label, row.unit));
        for system in SYSTEMS {
            match row.spread(system) {
                Some((median, low, high)) => {
                    print!("{:>24}", format!("{} ({}-{})", short(median), short(low), short(high)));
                }
                None => print!("{:>24}", "-"),
            }
        }
        for peer in PEERS {
            match row.ratio(peer) {
                Some((median, worst)) => print!("{:>24}", format!("{median:.2}x (worst {worst:.2}x)")),
                None => print!("{:>24}", "-"),
            }
        }
        println!();
    }
    let (floor, floor_low, floor_high) = median_of(&measured.floor_us);
    println!(
        "floor: a 16-byte Unix-socket round trip between two processes, p50 {floor:.1} µs ({floor_low:.1}-{floor_high:.1}); \
         a lock+unlock pair needs two, a queued hand-off one"
    );
    let (eventfd, eventfd_low, eventfd_high) = median_of(&measured.eventfd_floor_us);
    println!(
        "floor without bytes through the kernel: an eventfd round trip between two processes (a shared-memory \
         ring's wake-ups), p50 {eventfd:.1} µs ({eventfd_low:.1}-{eventfd_high:.1})"
    );
    if let Some((p50, _, _)) = measured.row(P50).and_then(|r| r.spread(DLM)) {
        println!("dlm-unix's pair p50 at 1 client is {:.1}x this placement's round trip", p50 / floor);
    }
    let shares: Vec<String> = measured
        .rows
        .iter()
        .filter(|row| row.label.starts_with("uncontended"))
        .filter_map(|row| {
            let echo = row.spread(ECHO)?.0;
            let of = |system: &str| row.spread(system).map_or("-".into(), |s| format!("{:.0}%", s.0 / echo * 100.0));
            Some(format!(
                "{} clients: dlm-unix {}, redis {}, redis-unix {}",
                row.label.rsplit(", ").next()?.trim_end_matches(" clients"),
                of(DLM),
                of("redis"),
                of("redis-unix")
            ))
        })
        .collect();
    if !shares.is_empty() {
        println!(
            "echo floor (a server that only echoes, two 16-byte round trips per pair, the same clients): \
             the median's share of it at {}",
            shares.join("; ")
        );
    }
}

fn median_of(values: &[f64]) -> (f64, f64, f64) {
    let mut row = Row::new("", "", true);
    for &v in values {
        row.add(DLM, v);
    }
    row.spread(DLM).unwrap_or((f64::NAN, f64::NAN, f64::NAN))
}

pub const P50: &str = "lock+unlock latency p50, 1 client";
pub const CONTENDED: &str = "contended hand-offs/s, 8 clients, 1 resource";
pub const PER_CPU: &str = "contended hand-offs per CPU-second";
pub const SHARE: &str = "contended: a client's grants off the mean";

/// The targets, met or not, with the spread counted against dlm.
pub fn print_targets(all: &[Measured]) {
    println!("\ntargets (worst ratio the spread allows; `met` only if it is):");
    for measured in all {
        let name = measured.placement.name();
        let check = |label: &str, peer: &str, target: f64| {
            let Some((median, worst)) = measured.row(label).and_then(|r| r.ratio(peer)) else { return };
            let met = if worst >= target { "met" } else { "NOT met" };
            println!("  [{name}] {label} vs {peer} >= {target:.2}x: {median:.2}x median, {worst:.2}x worst: {met}");
        };
        // Against Redis on loopback TCP (the peer) and on its Unix
        // socket (the one dlm-unix connects to).
        for redis in REDIS {
            for row in &measured.rows {
                if row.label.starts_with("uncontended") {
                    check(&row.label, redis, 1.5);
                }
            }
            check(P50, redis, 1.0 / 0.67);
            check(CONTENDED, redis, 1.5);
            check(PER_CPU, redis, 5.0);
        }
        for row in &measured.rows {
            if row.label.starts_with("uncontended") {
                check(&row.label, "etcd", 20.0);
            }
        }
        if let Some((off, _, high)) = measured.row(SHARE).and_then(|r| r.spread(DLM)) {
            let redis = measured.row(SHARE).and_then(|r| r.spread("redis")).map_or(f64::NAN, |s| s.0);
            let met = if high <= 20.0 { "met" } else { "NOT met" };
            println!(
                "  [{name}] contended: every client within 20% of the mean share: dlm {off:.1}% median, {high:.1}% \
                 worst (redis {redis:.1}%): {met}"
            );
        }
        if let Some((p50, _, high)) = measured.row(P50).and_then(|r| r.spread(DLM)) {
            let (floor, floor_low, _) = median_of(&measured.floor_us);
            let worst = high / floor_low;
            let met = if worst <= 10.0 { "met" } else { "NOT met" };
            println!(
                "  [{name}] a locally mastered pair within 10x of this placement's round trip: {:.1}x median, \
                 {worst:.1}x worst: {met}",
                p50 / floor
            );
        }
    }
}

pub fn write_json(all: &[Measured], killed: &Row, path: &Path) -> Result<()> {
    let values = |row: &Row| -> serde_json::Value {
        row.runs
            .keys()
            .filter_map(|system| {
                let (median, low, high) = row.spread(system)?;
                Some((
                    (*system).to_string(),
                    serde_json::json!({ "median": median, "min": low, "max": high, "runs": row.runs[system] }),
                ))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let placements: Vec<serde_json::Value> = all
        .iter()
        .map(|measured| {
            let (floor, floor_low, floor_high) = median_of(&measured.floor_us);
            let (eventfd, eventfd_low, eventfd_high) = median_of(&measured.eventfd_floor_us);
            serde_json::json!({
                "placement": measured.placement.name(),
                "threads": measured.placement.describe(),
                "unix_round_trip_p50_us": { "median": floor, "min": floor_low, "max": floor_high },
                "eventfd_round_trip_p50_us": { "median": eventfd, "min": eventfd_low, "max": eventfd_high },
                "rows": measured.rows.iter().map(|row| serde_json::json!({
                    "workload": row.label,
                    "unit": row.unit,
                    "higher_is_better": row.higher_is_better,
                    "values": values(row),
                    "ratios": PEERS.iter().filter_map(|peer| {
                        let (median, worst) = row.ratio(peer)?;
                        Some(((*peer).to_string(), serde_json::json!({ "median": median, "worst": worst })))
                    }).collect::<serde_json::Map<_, _>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let json = serde_json::json!({
        "cpus": online_cpus(),
        "client_workers": client_workers(),
        "placements": placements,
        "dead_holder_ms": values(killed),
    });
    std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
