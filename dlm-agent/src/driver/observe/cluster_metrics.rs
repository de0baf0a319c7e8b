//! Metrics of the cluster layer: membership, mastering, directory, peer
//! traffic, remote request latency. Registered only when the agent is a
//! member of a cluster.

use std::time::Duration;

use dlm_core::cluster::{ClusterStats, RecoveryPhase};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::codes::LinkReset;
use crate::metrics::Metrics;

/// Counters and gauges fed from the engine's [`ClusterStats`].
pub struct ClusterMetrics {
    members: IntGauge,
    epoch: IntGauge,
    quorate: IntGauge,
    fenced: IntGauge,
    fencing_waiting: IntGauge,
    view_waiting: IntGauge,
    views: IntCounter,
    recovery_phase: IntGauge,
    recoveries: IntCounter,
    recovery_time: prometheus::Histogram,
    mastered: IntGauge,
    directory: IntGauge,
    remote_locks: IntGauge,
    lock_delayed: IntGauge,
    messages: IntCounterVec,
    lookups: IntCounter,
    remote_requests: IntCounter,
    served_requests: IntCounter,
    stale_masters: IntCounter,
    released: IntCounter,
    deadlock_victims: IntCounter,
    recovered_locks: IntCounterVec,
    recovery_mismatches: IntCounter,
    recovery_refused: IntCounter,
    /// Peer links reset by this node, by reason ([`LinkReset`]).
    pub link_resets: IntCounterVec,
    /// Time from a lock or convert request to its grant, for locks mastered on another node.
    pub remote_grant_wait: HistogramVec,
    last: ClusterStats,
}

impl ClusterMetrics {
    /// Creates and registers the metrics.
    ///
    /// # Panics
    /// A name registered twice (a bug).
    #[must_use]
    pub fn new(metrics: &Metrics, members: usize, by_views: bool) -> ClusterMetrics {
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            metrics.register(Box::new(metric.clone()));
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            metrics.register(Box::new(metric.clone()));
            metric
        };
        let recovered_locks = IntCounterVec::new(
            Opts::new(
                "dlm_cluster_recovered_locks_total",
                "Recovery: locks of this node's clients sent to a master (how=\"sent\"), and locks of other \
                 nodes' clients kept here as they were, checked by their node's digest (how=\"kept\").",
            ),
            &["how"],
        )
        .expect("valid metric");
        metrics.register(Box::new(recovered_locks.clone()));
        let messages = IntCounterVec::new(
            Opts::new("dlm_cluster_messages_total", "Peer messages sent and received (acknowledgements excluded)."),
            &["direction"],
        )
        .expect("valid metric");
        metrics.register(Box::new(messages.clone()));
        let link_resets = IntCounterVec::new(
            Opts::new(
                "dlm_cluster_link_resets_total",
                "Peer links this node reset: its queue to the peer was full, or the peer left messages unacknowledged.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        metrics.register(Box::new(link_resets.clone()));
        for reason in LinkReset::ALL {
            link_resets.with_label_values(&[reason.as_str()]);
        }
        let remote_grant_wait = HistogramVec::new(
            HistogramOpts::new(
                "dlm_cluster_remote_grant_wait_seconds",
                "Time from a lock or convert request to its grant, for resources mastered on another node.",
            )
            .buckets(crate::metrics::time_buckets()),
            &["lockspace", "mode"],
        )
        .expect("valid metric");
        metrics.register(Box::new(remote_grant_wait.clone()));
        let recovery_time = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "dlm_cluster_recovery_seconds",
                "Time from a view to the end of this node's recovery into it (its Done barrier passed).",
            )
            .buckets(crate::metrics::time_buckets()),
        )
        .expect("valid metric");
        metrics.register(Box::new(recovery_time.clone()));
        let m = ClusterMetrics {
            epoch: gauge("dlm_cluster_epoch", "The epoch of this node's membership view."),
            quorate: gauge("dlm_cluster_quorate", "1 while this node's view is quorate and includes it."),
            fenced: gauge(
                "dlm_cluster_fenced",
                "1 while this node has fenced itself (its locks revoked, requests failing).",
            ),
            views: counter("dlm_cluster_views_total", "Membership views taken."),
            fencing_waiting: gauge(
                "dlm_cluster_fencing_waiting_nodes",
                "Lost nodes not fenced yet: their locks are not recovered until they are.",
            ),
            view_waiting: gauge(
                "dlm_cluster_view_waiting_members",
                "Members whose report a membership change being agreed waits for (0 when none is).",
            ),
            recovery_phase: gauge(
                "dlm_cluster_recovery_phase",
                "The recovery barrier this node waits at: 0 none, 1 stop, 2 directory, 3 locks, 4 done.",
            ),
            recoveries: counter("dlm_cluster_recoveries_total", "Recoveries this node finished."),
            recovery_time,
            members: gauge("dlm_cluster_members", "Members of the cluster, this node included."),
            mastered: gauge("dlm_cluster_mastered_resources", "Resources mastered on this node (in use or idle)."),
            directory: gauge("dlm_cluster_directory_entries", "Directory entries kept on this node."),
            remote_locks: gauge("dlm_cluster_remote_locks", "Locks of this node's clients mastered on other nodes."),
            lock_delayed: gauge(
                "dlm_cluster_lock_delayed_resources",
                "Resources mastered here whose conflicting requests wait out a lock-delay (a lost node's hold).",
            ),
            messages,
            lookups: counter("dlm_cluster_lookups_total", "Directory lookups sent to other nodes."),
            remote_requests: counter(
                "dlm_cluster_remote_requests_total",
                "Requests of this node's clients sent to masters on other nodes.",
            ),
            served_requests: counter(
                "dlm_cluster_served_requests_total",
                "Requests of other nodes' clients served here as master.",
            ),
            stale_masters: counter(
                "dlm_cluster_stale_masters_total",
                "Requests sent to a node that no longer masters the resource.",
            ),
            released: counter(
                "dlm_cluster_masters_released_total",
                "Resources released by this node after being idle.",
            ),
            deadlock_victims: counter(
                "dlm_cluster_deadlock_victims_total",
                "Deadlocks across nodes broken by this node as coordinator.",
            ),
            recovered_locks,
            recovery_mismatches: counter(
                "dlm_cluster_recovery_digest_mismatches_total",
                "Recovery: other nodes whose digest of the locks kept here did not match (their locks here \
                 went and came back one by one).",
            ),
            recovery_refused: counter(
                "dlm_cluster_recovery_refused_total",
                "Recovery: resources whose old master refused this node's copies (it masters them no more).",
            ),
            remote_grant_wait,
            link_resets,
            last: ClusterStats::default(),
        };
        m.members.set(i64::try_from(members).unwrap_or(i64::MAX));
        if !by_views {
            // A static membership is one quorate view at epoch 1, for good.
            m.epoch.set(1);
            m.quorate.set(1);
        }
        m.messages.with_label_values(&["sent"]);
        m.messages.with_label_values(&["received"]);
        m.recovered_locks.with_label_values(&["sent"]);
        m.recovered_locks.with_label_values(&["kept"]);
        m
    }

    /// A view was taken; `fenced`: this node fenced itself by it.
    pub fn view_taken(&self, epoch: u64, members: usize, quorate: bool, fenced: bool) {
        self.views.inc();
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.members.set(i64::try_from(members).unwrap_or(i64::MAX));
        self.quorate.set(i64::from(quorate && !fenced));
        self.fenced.set(i64::from(fenced));
    }

    /// Lost nodes waiting for fencing now, and members a view being agreed waits for.
    pub fn membership(&self, fencing_waiting: usize, view_waiting: usize) {
        self.fencing_waiting.set(i64::try_from(fencing_waiting).unwrap_or(i64::MAX));
        self.view_waiting.set(i64::try_from(view_waiting).unwrap_or(i64::MAX));
    }

    /// Where recovery stands: its phase, or none; `finished` the time of a
    /// recovery that just ended (one view's recovery, even if a newer view
    /// took over from it).
    pub fn recovery(&self, phase: Option<RecoveryPhase>, finished: Option<Duration>) {
        self.recovery_phase.set(phase.map_or(0, |p| i64::from(p.index()) + 1));
        if let Some(took) = finished {
            self.recoveries.inc();
            self.recovery_time.observe(took.as_secs_f64());
        }
    }

    /// Brings the metrics up to date with the engine's counts.
    pub fn update(&mut self, stats: ClusterStats, counts: Counts) {
        let Counts { mastered, directory, remote_locks, lock_delayed } = counts;
        let delta = |now: u64, before: u64| now.saturating_sub(before);
        let last = self.last;
        self.messages.with_label_values(&["sent"]).inc_by(delta(stats.messages_sent, last.messages_sent));
        self.messages.with_label_values(&["received"]).inc_by(delta(stats.messages_received, last.messages_received));
        self.lookups.inc_by(delta(stats.lookups, last.lookups));
        self.remote_requests.inc_by(delta(stats.remote_requests, last.remote_requests));
        self.served_requests.inc_by(delta(stats.served_requests, last.served_requests));
        self.stale_masters.inc_by(delta(stats.stale_masters, last.stale_masters));
        self.released.inc_by(delta(stats.released, last.released));
        self.deadlock_victims.inc_by(delta(stats.deadlock_victims, last.deadlock_victims));
        let recovered = |how: &str| self.recovered_locks.with_label_values(&[how]);
        recovered("sent").inc_by(delta(stats.recovery_locks_sent, last.recovery_locks_sent));
        recovered("kept").inc_by(delta(stats.recovery_locks_kept, last.recovery_locks_kept));
        self.recovery_mismatches.inc_by(delta(stats.recovery_digest_mismatches, last.recovery_digest_mismatches));
        self.recovery_refused.inc_by(delta(stats.recovery_refused, last.recovery_refused));
        self.last = stats;
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.mastered.set(gauge(mastered));
        self.directory.set(gauge(directory));
        self.remote_locks.set(gauge(remote_locks));
        self.lock_delayed.set(gauge(lock_delayed));
    }
}

/// What the node holds now, for the gauges.
pub struct Counts {
    /// Resources mastered here.
    pub mastered: usize,
    /// Directory entries kept here.
    pub directory: usize,
    /// This node's clients' locks mastered elsewhere.
    pub remote_locks: usize,
    /// Resources held by a lock-delay.
    pub lock_delayed: usize,
}
