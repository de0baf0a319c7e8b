//! The node's pressure as the kernel counts it, and the agent's own
//! scheduling delay: what tells a stalled node from a dead one.
//!
//! Pressure stall information (`/proc/pressure/{cpu,memory,io}`, kernels
//! with PSI) gives, per resource, the share of recent time that `some`
//! tasks, or all non-idle tasks (`full`), waited for it: averages over 10,
//! 60 and 300 s, and a running total in microseconds. The agent exports the
//! totals as `dlm_pressure_stall_seconds_total`, sends its peers the 10-s
//! averages ([`node_pressure`], carried by `dlm_core::cluster::NodePressure`)
//! and shows both in `dlm-agent status`.
//!
//! The agent's scheduling delay ([`run_delay`]) is the time its threads were
//! runnable but waited for a CPU (`/proc/self/task/*/schedstat`, second
//! field): with the node's CPU pressure it says whether the agent itself
//! was starved, as a real-time task reclaiming on every CPU starves it.

use std::time::Duration;

use dlm_core::cluster::NodePressure;

/// The resources the kernel reports pressure for.
pub const RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

/// One line of a pressure file: `some` or `full`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stall {
    /// The share of the last 10 seconds, in percent.
    pub avg10: f64,
    /// Every stall so far, in microseconds.
    pub total_us: u64,
}

/// A resource's pressure: `full` is absent for the CPU on older kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    /// Some tasks stalled.
    pub some: Stall,
    /// Every non-idle task stalled.
    pub full: Option<Stall>,
}

/// `/proc/pressure/RESOURCE`, if the kernel has PSI.
#[must_use]
pub fn read(resource: &str) -> Option<Pressure> {
    parse(&std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?)
}

/// A pressure file's text (`/proc/pressure/*`, a cgroup's `*.pressure`):
/// `some avg10=… avg60=… avg300=… total=…`, and the same for `full`.
#[must_use]
pub fn parse(text: &str) -> Option<Pressure> {
    let line = |kind: &str| {
        let fields = text.lines().find(|l| l.split_whitespace().next() == Some(kind))?;
        let field = |name: &str| fields.split_whitespace().find_map(|f| f.strip_prefix(name));
        Some(Stall { avg10: field("avg10=")?.parse().ok()?, total_us: field("total=")?.parse().ok()? })
    };
    Some(Pressure { some: line("some")?, full: line("full") })
}

/// This node's 10-second pressure averages, in thousandths, as the agent
/// reports them to its peers (zero where the kernel has no PSI).
#[must_use]
pub fn node_pressure() -> NodePressure {
    let permille = |stall: Option<Stall>| stall.map_or(0, |s| permille(s.avg10));
    let memory = read("memory");
    NodePressure {
        memory_some: permille(memory.map(|m| m.some)),
        memory_full: permille(memory.and_then(|m| m.full)),
        cpu_some: permille(read("cpu").map(|c| c.some)),
    }
}

/// A percentage as thousandths, within 0–1000.
fn permille(percent: f64) -> u16 {
    (percent * 10.0).round().clamp(0.0, f64::from(NodePressure::PERMILLE_MAX)) as u16
}

/// How long this process's threads have waited for a CPU while runnable,
/// in all (threads that exited are not counted).
#[must_use]
pub fn run_delay() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pressure_file_is_read_with_or_without_its_full_line() {
        let memory = "some avg10=45.20 avg60=12.00 avg300=3.10 total=123456\n\
                      full avg10=31.05 avg60=9.00 avg300=2.00 total=65432\n";
        let pressure = parse(memory).expect("parsed");
        assert_eq!(pressure.some, Stall { avg10: 45.2, total_us: 123_456 });
        assert_eq!(pressure.full, Some(Stall { avg10: 31.05, total_us: 65_432 }));
        let cpu = parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n").expect("parsed");
        assert_eq!((cpu.some.total_us, cpu.full), (7, None));
        assert_eq!(parse("nonsense"), None);
    }

    #[test]
    fn percentages_become_thousandths_within_the_whole_time() {
        assert_eq!([permille(45.26), permille(0.0), permille(100.0), permille(130.0)], [453, 0, 1000, 1000]);
    }

    #[test]
    fn threads_that_outnumber_the_cpus_wait_for_one() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let before = run_delay();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..=cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || while !stop.load(std::sync::atomic::Ordering::Relaxed) {})
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // Read while they run: an exited thread's delay is not counted.
        let during = run_delay();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinners.into_iter().for_each(|t| t.join().expect("spinner"));
        assert!(during > before, "{} spinning threads on {cpus} CPUs never waited", cpus + 1);
    }
}
