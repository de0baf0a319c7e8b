//! The agent's Prometheus metrics. Names follow
//! `dlm_<subsystem>_<name>_<unit>[_total]`; labels come from bounded sets
//! (lockspace names are bounded by `lockspaces_max`, the rest are enums).
//! Resource names are never labels: `dlm-agent dump` is for those.

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::codes::{LockPhase, RejectCode, SessionEnd};

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Requests that completed, by lockspace, operation, mode and outcome.
    pub requests: IntCounterVec,
    /// Requests refused, by code.
    pub rejected: IntCounterVec,
    /// Time from a lock or convert request to its grant.
    pub grant_wait: HistogramVec,
    /// Time from a grant to the unlock.
    pub hold: HistogramVec,
    /// Blocking callbacks sent.
    pub blocking: IntCounterVec,
    /// Locks granted now, by lockspace.
    pub granted: IntGaugeVec,
    /// Requests waiting now, by lockspace.
    pub waiting: IntGaugeVec,
    /// Resources now, by lockspace.
    pub resources: IntGaugeVec,
    /// Sessions open now.
    pub sessions: IntGauge,
    /// Sessions opened since start.
    pub sessions_opened: IntCounter,
    /// Sessions ended, by reason.
    pub sessions_ended: IntCounterVec,
    /// Kernel-measured time of lock holders and waiters, by phase and state.
    pub attributed: CounterVec,
    /// Connections and sessions refused, by the limit that refused them.
    pub refused: IntCounterVec,
    /// Framed sessions through shared-memory rings now.
    pub ring_sessions: IntGauge,
    /// Framed sessions that asked for rings and were served on their socket,
    /// by why ([`RINGS_DECLINED`]).
    pub rings_declined: IntCounterVec,
}

/// Why a framed session that asked for shared-memory rings was served on
/// its socket: the `reason` label of `dlm_session_rings_declined_total`.
/// `ring_sessions_max`: the agent serves that many already, or the client
/// (its uid) holds `connections_per_client_max` of them; `unavailable`: the
/// memfd or the eventfds could not be made (descriptors or memory short,
/// or a seccomp or LSM policy).
pub const RINGS_DECLINED: &[&str] = &["ring_sessions_max", "unavailable"];

/// The limits that refuse clients, as their configuration keys: the `limit`
/// label of `dlm_client_refused_total`.
pub const CLIENT_LIMITS: &[&str] =
    &["connections_max", "connections_per_client_max", "handshakes", "sessions_max", "sessions_per_uid_max"];

/// Where attributed time went, in the order of the attribution's fields.
pub const ATTRIBUTION_STATES: &[&str] = &["oncpu", "runqueue", "blocked", "reclaim", "kernel_lock", "futex"];

/// Bucket bounds of the time histograms: 10 µs to about 42 s, ×4 apart.
pub fn time_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_01, 4.0, 12).expect("valid bucket parameters")
}

impl Metrics {
    /// Creates and registers every metric, plus the process collector.
    ///
    /// # Panics
    /// Never with these fixed names (registration fails only on duplicates).
    #[must_use]
    pub fn new(node: &str) -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str| {
            let metric =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(time_buckets()), &["lockspace", "mode"])
                    .expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let metrics = Metrics {
            requests: counter(
                "dlm_lock_requests_total",
                "Lock, convert and unlock requests that completed, by outcome.",
                &["lockspace", "op", "mode", "outcome"],
            ),
            rejected: counter(
                "dlm_lock_requests_rejected_total",
                "Requests refused before they changed anything.",
                &["code"],
            ),
            grant_wait: histogram("dlm_lock_grant_wait_seconds", "Time from a lock or convert request to its grant."),
            hold: histogram("dlm_lock_hold_seconds", "Time from the grant of a lock to its release."),
            blocking: counter(
                "dlm_lock_blocking_callbacks_total",
                "Blocking callbacks sent to holders.",
                &["lockspace"],
            ),
            granted: gauge("dlm_lock_granted", "Locks granted now.", &["lockspace"]),
            waiting: gauge("dlm_lock_waiting", "Requests waiting or converting now.", &["lockspace"]),
            resources: gauge("dlm_lockspace_resources", "Resources in use now.", &["lockspace"]),
            sessions: {
                let metric = IntGauge::new("dlm_session_active", "Client sessions open now.").expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            sessions_opened: {
                let metric =
                    IntCounter::new("dlm_session_opened_total", "Client sessions opened.").expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            sessions_ended: counter("dlm_session_ended_total", "Client sessions ended, by reason.", &["reason"]),
            attributed: {
                let metric = CounterVec::new(
                    Opts::new(
                        "dlm_lock_kernel_attributed_seconds_total",
                        "Time of processes holding or waiting for DLM locks, measured in-kernel, by lock phase and \
                         where it went (blocked includes futex and kernel-lock waits).",
                    ),
                    &["phase", "state"],
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            refused: counter(
                "dlm_client_refused_total",
                "Client connections and sessions refused, by the limit that refused them.",
                &["limit"],
            ),
            ring_sessions: {
                let metric = IntGauge::new(
                    "dlm_session_rings",
                    "Framed sessions whose frames go through shared-memory rings now.",
                )
                .expect("valid metric");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            rings_declined: counter(
                "dlm_session_rings_declined_total",
                "Framed sessions that asked for shared-memory rings and were served on their socket, by why.",
                &["reason"],
            ),
            registry,
        };
        let info =
            IntGaugeVec::new(Opts::new("dlm_agent_info", "The agent's version and node name."), &["version", "node"])
                .expect("valid metric");
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), node]).set(1);
        metrics.registry.register(Box::new(info)).expect("unique metric");
        metrics.registry.register(Box::new(crate::spin::RING_CATCHES.clone())).expect("unique metric");
        #[cfg(target_os = "linux")]
        metrics
            .registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("unique metric");
        for code in RejectCode::ALL.iter().filter(|code| code.counted()) {
            metrics.rejected.with_label_values(&[code.as_str()]);
        }
        for limit in CLIENT_LIMITS {
            metrics.refused.with_label_values(&[limit]);
        }
        for reason in RINGS_DECLINED {
            metrics.rings_declined.with_label_values(&[reason]);
        }
        for reason in SessionEnd::ALL {
            metrics.sessions_ended.with_label_values(&[reason.as_str()]);
        }
        for phase in LockPhase::ALL {
            for state in ATTRIBUTION_STATES {
                metrics.attributed.with_label_values(&[phase.as_str(), state]);
            }
        }
        metrics
    }

    /// Adds a collector (the kernel metrics read from the eBPF maps).
    ///
    /// # Panics
    /// If one of its metric names is already registered (a programming error).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry.register(collector).expect("unique metric names");
    }

    /// Creates a new lockspace's series at zero, and returns the handles
    /// of those its locks update.
    pub fn add_lockspace(&self, lockspace: &str) -> LockspaceSeries {
        self.each_lockspace_series(lockspace, |vec, labels| vec.create(labels));
        LockspaceSeries::new(self, lockspace)
    }

    /// Drops a released lockspace's series, every one that
    /// [`Metrics::add_lockspace`] made: a node that creates and releases
    /// lockspaces must not grow its memory and its scrapes without bound.
    pub fn remove_lockspace(&self, lockspace: &str) {
        self.each_lockspace_series(lockspace, |vec, labels| vec.remove(labels));
    }

    /// Every series of one lockspace, with its labels: the one list that
    /// creating and removing them both follow.
    fn each_lockspace_series(&self, lockspace: &str, mut each: impl FnMut(SeriesOf<'_>, &[&str])) {
        for op in dlm_core::Op::ALL {
            for mode in dlm_core::Mode::ALL {
                for outcome in dlm_core::Status::ALL {
                    each(SeriesOf::Counter(&self.requests), &[lockspace, op.name(), mode.name(), outcome.name()]);
                }
            }
        }
        for mode in dlm_core::Mode::ALL {
            each(SeriesOf::Histogram(&self.grant_wait), &[lockspace, mode.name()]);
            each(SeriesOf::Histogram(&self.hold), &[lockspace, mode.name()]);
        }
        each(SeriesOf::Counter(&self.blocking), &[lockspace]);
        for gauge in [&self.granted, &self.waiting, &self.resources] {
            each(SeriesOf::Gauge(gauge), &[lockspace]);
        }
    }

    /// The text exposition of everything.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encoding to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The series one lockspace's locks update on every request, taken once
/// when the lockspace is made: a label lookup (four labels hashed, a read
/// lock, a reference count) per series per request was ~3 % of the agent's
/// CPU at 32 clients. Still the registry's series: a scrape reads them,
/// and [`Metrics::remove_lockspace`] drops them with the rest.
pub struct LockspaceSeries {
    /// By operation, mode and outcome, in the order of their `ALL` lists.
    requests: Box<[IntCounter]>,
    /// By mode, in the order of `Mode::ALL`.
    grant_wait: Box<[Histogram]>,
    hold: Box<[Histogram]>,
    blocking: IntCounter,
}

impl LockspaceSeries {
    fn new(metrics: &Metrics, lockspace: &str) -> LockspaceSeries {
        use dlm_core::{Mode, Op, Status};
        let mut requests = Vec::with_capacity(Op::ALL.len() * Mode::ALL.len() * Status::ALL.len());
        for op in Op::ALL {
            for mode in Mode::ALL {
                for outcome in Status::ALL {
                    requests.push(metrics.requests.with_label_values(&[
                        lockspace,
                        op.name(),
                        mode.name(),
                        outcome.name(),
                    ]));
                }
            }
        }
        let by_mode = |vec: &HistogramVec| {
            Mode::ALL.iter().map(|mode| vec.with_label_values(&[lockspace, mode.name()])).collect()
        };
        LockspaceSeries {
            requests: requests.into(),
            grant_wait: by_mode(&metrics.grant_wait),
            hold: by_mode(&metrics.hold),
            blocking: metrics.blocking.with_label_values(&[lockspace]),
        }
    }

    /// Requests completed with `outcome`.
    #[must_use]
    pub fn requests(&self, op: dlm_core::Op, mode: dlm_core::Mode, outcome: dlm_core::Status) -> &IntCounter {
        use dlm_core::{Mode, Op, Status};
        let index = (position(&Op::ALL, op) * Mode::ALL.len() + position(&Mode::ALL, mode)) * Status::ALL.len()
            + position(&Status::ALL, outcome);
        &self.requests[index]
    }

    /// Time from a lock or convert request to its grant in `mode`.
    #[must_use]
    pub fn grant_wait(&self, mode: dlm_core::Mode) -> &Histogram {
        &self.grant_wait[position(&dlm_core::Mode::ALL, mode)]
    }

    /// Time from a grant in `mode` to its release.
    #[must_use]
    pub fn hold(&self, mode: dlm_core::Mode) -> &Histogram {
        &self.hold[position(&dlm_core::Mode::ALL, mode)]
    }

    /// Blocking callbacks sent.
    #[must_use]
    pub fn blocking(&self) -> &IntCounter {
        &self.blocking
    }
}

/// Where `value` is in `all`, one of the core's lists of every value of
/// its kind (`Op::ALL`, `Mode::ALL`, `Status::ALL`: complete by their
/// contract, which the series made for each lockspace rely on too).
fn position<T: PartialEq + Copy>(all: &[T], value: T) -> usize {
    all.iter().position(|v| *v == value).unwrap_or_else(|| unreachable!("the core's ALL lists every value"))
}

/// One labelled family of the per-lockspace series.
enum SeriesOf<'a> {
    Counter(&'a prometheus::IntCounterVec),
    Gauge(&'a prometheus::IntGaugeVec),
    Histogram(&'a prometheus::HistogramVec),
}

impl SeriesOf<'_> {
    fn create(&self, labels: &[&str]) {
        match self {
            SeriesOf::Counter(vec) => drop(vec.with_label_values(labels)),
            SeriesOf::Gauge(vec) => drop(vec.with_label_values(labels)),
            SeriesOf::Histogram(vec) => drop(vec.with_label_values(labels)),
        }
    }

    fn remove(&self, labels: &[&str]) {
        // A series never made (or already gone) is nothing to remove.
        let _ = match self {
            SeriesOf::Counter(vec) => vec.remove_label_values(labels),
            SeriesOf::Gauge(vec) => vec.remove_label_values(labels),
            SeriesOf::Histogram(vec) => vec.remove_label_values(labels),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlm_core::{Mode, Op, Status};

    #[test]
    fn a_lockspaces_handles_update_its_series_and_go_with_it() {
        let metrics = Metrics::new("node-a");
        let series = metrics.add_lockspace("ls-a");
        let _other = metrics.add_lockspace("ls-b");
        series.requests(Op::Unlock, Mode::Pw, Status::Unlocked).inc();
        series.requests(Op::Unlock, Mode::Pw, Status::Unlocked).inc();
        series.hold(Mode::Cr).observe(0.5);
        series.grant_wait(Mode::Ex).observe(0.25);
        series.blocking().inc();
        // The handles are the series a scrape reads, under their labels.
        let by_labels = |op: Op, mode: Mode, status: Status| {
            metrics.requests.with_label_values(&["ls-a", op.name(), mode.name(), status.name()]).get()
        };
        assert_eq!(by_labels(Op::Unlock, Mode::Pw, Status::Unlocked), 2);
        assert_eq!(by_labels(Op::Lock, Mode::Pw, Status::Granted), 0);
        assert_eq!(metrics.hold.with_label_values(&["ls-a", Mode::Cr.name()]).get_sample_count(), 1);
        assert_eq!(metrics.grant_wait.with_label_values(&["ls-a", Mode::Ex.name()]).get_sample_sum(), 0.25);
        assert_eq!(metrics.blocking.with_label_values(&["ls-a"]).get(), 1);
        assert_eq!(metrics.blocking.with_label_values(&["ls-b"]).get(), 0);
        // Released, none of its series is left in a scrape.
        metrics.remove_lockspace("ls-a");
        let scraped = metrics.encode();
        assert!(!scraped.contains("\"ls-a\""), "a released lockspace's series are still scraped");
        assert!(scraped.contains("\"ls-b\""));
    }
}
