//! Metrics of pressure: the agent's own scheduling delay, what each peer
//! last reported of its node's pressure, and the nodes lost while they
//! reported it (see `crate::psi` and `dlm_core::cluster::NodePressure`).

use std::time::Duration;

use dlm_core::cluster::{NodeId, NodePressure};
use prometheus::{Counter, GaugeVec, IntCounterVec, Opts};

use crate::metrics::Metrics;

/// Registered always (the run delay), the peers' part only in a cluster.
pub struct PressureMetrics {
    run_delay: Counter,
    /// The run delay already counted: the counter only rises.
    counted: Duration,
    peers: Option<PeerPressureMetrics>,
}

struct PeerPressureMetrics {
    reported: GaugeVec,
    lost: IntCounterVec,
}

impl PressureMetrics {
    /// Creates and registers the metrics.
    ///
    /// # Panics
    /// A name registered twice (a bug).
    #[must_use]
    pub fn new(metrics: &Metrics, cluster: bool) -> PressureMetrics {
        let run_delay = Counter::new(
            "dlm_agent_run_delay_seconds_total",
            "Time the agent's threads waited for a CPU while runnable (schedstat; threads that exited are not counted)",
        )
        .expect("valid metric");
        metrics.register(Box::new(run_delay.clone()));
        let peers = cluster.then(|| {
            let reported = GaugeVec::new(
                Opts::new(
                    "dlm_cluster_peer_pressure_ratio",
                    "What each peer last reported of its node's pressure: the share of the last 10 s that some (or \
                     all non-idle) tasks stalled on the resource (PSI avg10)",
                ),
                &["peer", "resource", "kind"],
            )
            .expect("valid metric");
            let lost = IntCounterVec::new(
                Opts::new(
                    "dlm_cluster_nodes_lost_total",
                    "Nodes that left this node's view, by whether they had reported memory pressure in the 10 s \
                     before (\"reported\": their fencing may be a false one)",
                ),
                &["pressure"],
            )
            .expect("valid metric");
            metrics.register(Box::new(reported.clone()));
            metrics.register(Box::new(lost.clone()));
            // Both series from the start: a count that is 0 is shown as 0.
            for pressure in ["reported", "none"] {
                lost.with_label_values(&[pressure]);
            }
            PeerPressureMetrics { reported, lost }
        });
        PressureMetrics { run_delay, counted: Duration::ZERO, peers }
    }

    /// The agent's threads' run delay now (it may fall when a thread exits:
    /// only a rise is counted).
    pub fn run_delay(&mut self, now: Duration) {
        if let Some(rise) = now.checked_sub(self.counted) {
            self.run_delay.inc_by(rise.as_secs_f64());
            self.counted = now;
        }
    }

    /// `peer`'s last report.
    pub fn peer_reported(&self, peer: NodeId, pressure: NodePressure) {
        let Some(peers) = &self.peers else { return };
        let peer = peer.0.to_string();
        for (resource, kind, permille) in [
            ("memory", "some", pressure.memory_some),
            ("memory", "full", pressure.memory_full),
            ("cpu", "some", pressure.cpu_some),
        ] {
            peers.reported.with_label_values(&[&peer, resource, kind]).set(f64::from(permille) / 1000.0);
        }
    }

    /// A node left the view; `under_pressure` when it had reported memory
    /// pressure just before.
    pub fn node_lost(&self, under_pressure: bool) {
        if let Some(peers) = &self.peers {
            peers.lost.with_label_values(&[if under_pressure { "reported" } else { "none" }]).inc();
        }
    }
}
