//! Membership from the node's cluster stack: with `[cluster] membership =
//! "corosync"` the agent joins a CPG group of its cluster, agrees with the
//! other agents on each view (`dlm_core::cluster::agree`), fences lost nodes before views
//! without them are taken (`fencing`), and hands every view to the driver
//! as [`Command::View`], where the lock engine recovers from it.
//!
//! ```text
//!  corosync ──callbacks──▶ dispatch threads (corosync.rs) ──Event──▶ membership task ──Command::View──▶ driver
//!      ▲                                                                 │    ▲
//!      └────────── Round / Report / Fenced multicasts (message.rs) ─────┘    └── fencing.rs, fence-ack
//! ```
//!
//! The agent grants only while its corosync answers ([`crate::lease`]): a corosync
//! that stops answering, or a node that wakes from a pause, fences itself
//! before the others can recover its locks.
//!
//! Lock traffic stays on the agents' own peer links; the group carries only
//! the agreement's few small messages. A node's corosync node id is its dlm
//! id, and only the configured `[[cluster.member]]` nodes are let in.

mod ask;
mod corosync;
mod fencing;
mod message;
mod realtime;
mod watchdog;

pub use watchdog::Watchdog;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dlm_core::cluster::NodeId;
use prometheus::{IntCounterVec, Opts};
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::corosync::Event;
use self::realtime::Realtime;
use crate::command::{Command, DriverHandle, MembershipStatus};
use crate::config::ClusterSettings;
use crate::generation;
use crate::lease::{LapseWatch, Lease, Timing};
use crate::metrics::Metrics;
use dlm_core::cluster::agree::{Agreement, Refusal, Step};

/// Events from corosync's threads queued at most for the membership task.
const EVENTS_MAX: usize = 1024;

/// The membership's counters: registered for every cluster (at zero with
/// static membership, so that dashboards and alerts see the series).
pub struct MembershipMetrics {
    refused: IntCounterVec,
    fencing: IntCounterVec,
    lease_lapses: prometheus::IntCounter,
    lease_bound: prometheus::Gauge,
    realtime_threads: prometheus::IntGauge,
}

impl MembershipMetrics {
    /// Creates and registers the counters.
    ///
    /// # Panics
    /// A name registered twice (a bug).
    #[must_use]
    pub fn new(metrics: &Metrics) -> MembershipMetrics {
        let counter = |name: &str, help: &str, label: &str, values: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            for value in values {
                counter.with_label_values(&[value]);
            }
            metrics.register(Box::new(counter.clone()));
            counter
        };
        MembershipMetrics {
            refused: counter(
                "dlm_membership_refused_total",
                "Group members and messages left out of views (not a configured node, a node twice, a bad message)",
                "reason",
                &Refusal::ALL.map(Refusal::as_str),
            ),
            fencing: counter(
                "dlm_cluster_fencing_total",
                "Fencing of lost nodes by this node: command attempts that succeeded or failed, self-fencing graces \
                 waited out, acknowledgements by hand",
                "outcome",
                &["success", "failure", "grace", "manual"],
            ),
            lease_lapses: {
                let counter = prometheus::IntCounter::new(
                    "dlm_cluster_lease_lapses_total",
                    "Times this node's corosync did not answer within the membership lease (or the node was \
                     paused): each fenced this node until a new round",
                )
                .expect("valid metric");
                metrics.register(Box::new(counter.clone()));
                counter
            },
            lease_bound: {
                let gauge = prometheus::Gauge::new(
                    "dlm_cluster_lease_bound_seconds",
                    "The membership lease: the oldest answer of corosync this node grants on (0 without corosync)",
                )
                .expect("valid metric");
                metrics.register(Box::new(gauge.clone()));
                gauge
            },
            realtime_threads: {
                let gauge = prometheus::IntGauge::new(
                    "dlm_cluster_membership_realtime_threads",
                    "The membership's threads (lease, corosync dispatch, watchdog) running at real-time priority: \
                     0 when `[cluster] realtime_priority` is 0 or the agent may not (CAP_SYS_NICE)",
                )
                .expect("valid metric");
                metrics.register(Box::new(gauge.clone()));
                gauge
            },
        }
    }
}

/// Starts the membership: corosync's dispatch threads and the task that
/// agrees on views, fences lost nodes and hands views to the driver.
/// `fence_acks` brings operators' acknowledgements from the driver; `lease`
/// is armed here and confirmed by a asking thread (the driver reads it
/// too). Returns the watchdog, when one is configured, for a clean stop to
/// disarm.
///
/// # Errors
/// corosync's timeouts cannot be read (it is not running), the configured
/// self-fencing grace is below what they need, started twice in one
/// process, the watchdog cannot be opened, or a thread cannot be made.
pub async fn start(
    settings: &ClusterSettings,
    incarnation: u64,
    generation: (u64, PathBuf),
    driver: DriverHandle,
    fence_acks: mpsc::Receiver<NodeId>,
    metrics: MembershipMetrics,
    lease: Arc<Lease>,
) -> Result<Option<Watchdog>, String> {
    let (generation, state_dir) = generation;
    let timing = timing_at_start().await?;
    let grace = self_fence_grace(settings, timing)?;
    tracing::info!(
        token = ?timing.token,
        consensus = ?timing.consensus,
        lease = ?timing.bound(),
        self_fence_grace = ?grace,
        "corosync's timeouts"
    );
    metrics.lease_bound.set(timing.bound().as_secs_f64());
    let realtime = Realtime::new(settings.realtime_priority, metrics.realtime_threads.clone());
    let watchdog = settings.fencing.watchdog.as_deref().map(|device| Watchdog::start(device, &realtime)).transpose()?;
    lease.arm(timing.bound(), std::time::Instant::now());
    let (events, receiver) = mpsc::channel(EVENTS_MAX);
    ask::spawn_lease_asker(lease.clone(), realtime.clone())?;
    let told = events.clone();
    ask::spawn_timing_watch(lease.clone(), timing, move |timing| {
        let _ = told.blocking_send(Event::Timing(timing));
    })?;
    corosync::spawn(settings.cpg_group(), events.clone(), &realtime)?;
    let agreement = Agreement::new(settings.node_id, settings.members.iter().map(|m| (m.id, m.weight)), incarnation)
        .after_epoch(generation);
    let task = MembershipTask {
        agreement,
        settings: settings.clone(),
        driver,
        events,
        metrics,
        group: None,
        status: MembershipStatus::default(),
        reported: MembershipStatus::default(),
        lost_at: BTreeMap::new(),
        fencing: BTreeMap::new(),
        watchdog: watchdog.clone(),
        state_dir,
        lease,
        lapse: LapseWatch::default(),
        fenced_by_lease: false,
        timing,
        grace,
    };
    tokio::spawn(task.run(receiver, fence_acks));
    Ok(watchdog)
}

/// How long the agent waits at start for its corosync to answer: as long
/// as a corosync started at the same moment takes to come up, with room.
const COROSYNC_START_WAIT: Duration = Duration::from_secs(30);

/// corosync's timeouts, waiting for a corosync started at the same time.
async fn timing_at_start() -> Result<Timing, String> {
    let deadline = tokio::time::Instant::now() + COROSYNC_START_WAIT;
    let mut said = false;
    loop {
        match ask::read_timing() {
            Ok(timing) => return Ok(timing),
            Err(error) if tokio::time::Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    tracing::warn!(%error, "waiting for corosync (its timeouts decide the lease and the grace)");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(format!("{error} (waited {COROSYNC_START_WAIT:?})")),
        }
    }
}

/// The survivors' self-fencing grace: as configured, but never below what
/// corosync's timeouts need (see [`Timing::grace_floor`]); computed from
/// them when not configured. With a fencing command the grace is not used.
fn self_fence_grace(settings: &ClusterSettings, timing: Timing) -> Result<Duration, String> {
    let floor = timing.grace_floor();
    match settings.fencing.self_fence_grace {
        Some(grace) if grace < floor && settings.fencing.command.is_none() => Err(format!(
            "cluster.fencing.self_fence_grace = {grace:?} is below what this corosync needs: token {:?} + \
             consensus {:?} (corosync removes a silent node after these) + {:?} (this agent stops granting \
             within that of its corosync's last answer) = {floor:?}; raise it, or leave it out to use that",
            timing.token,
            timing.consensus,
            timing.detection()
        )),
        Some(grace) => Ok(grace),
        None => Ok(floor),
    }
}

/// The membership task's state.
struct MembershipTask {
    agreement: Agreement,
    settings: ClusterSettings,
    driver: DriverHandle,
    /// For the fencing tasks to report back.
    events: mpsc::Sender<Event>,
    metrics: MembershipMetrics,
    /// The group's handle, while joined.
    group: Option<rust_corosync::cpg::Handle>,
    /// What is to be told to the driver.
    status: MembershipStatus,
    /// What was last told to it.
    reported: MembershipStatus,
    /// When each unfenced node was lost.
    lost_at: BTreeMap<u32, Instant>,
    /// The fencing this node runs, by node.
    fencing: BTreeMap<u32, tokio::task::AbortHandle>,
    /// Where each view's epoch is recorded before the view is taken.
    state_dir: PathBuf,
    /// Fed while this node is a quorate member.
    watchdog: Option<Watchdog>,
    /// The lease on corosync's answers, and this task's look at it.
    lease: Arc<Lease>,
    lapse: LapseWatch,
    /// This node fenced itself on a lapse: it rejoins once corosync answers.
    fenced_by_lease: bool,
    timing: Timing,
    /// How long a lost node is waited for without a fencing command.
    grace: Duration,
}

impl MembershipTask {
    async fn run(mut self, mut events: mpsc::Receiver<Event>, mut fence_acks: mpsc::Receiver<NodeId>) {
        let mut look = tokio::time::interval(self.timing.ask_every());
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The lease first, whatever woke this task: after a pause, an
            // event queued before it must not be acted on in the old state.
            let mut steps = self.check_lease();
            steps.extend(tokio::select! {
                _ = look.tick() => {
                    let mut steps = self.check_lease();
                    steps.extend(self.check_stall());
                    steps
                }
                event = events.recv() => match event {
                    Some(event) => {
                        let mut steps = self.check_lease();
                        steps.extend(self.event(event));
                        steps
                    }
                    None => return,
                },
                Some(node) = fence_acks.recv() => {
                    tracing::warn!(node = node.0, "fencing acknowledged by hand");
                    if self.agreement.unfenced().contains(&u32::from(node.0)) {
                        self.metrics.fencing.with_label_values(&["manual"]).inc();
                    }
                    self.agreement.fence_done(u32::from(node.0))
                }
            });
            for step in steps {
                if !self.step(step).await {
                    return;
                }
            }
            if !self.report_status().await {
                return;
            }
            if look.period() != self.timing.ask_every() {
                look = tokio::time::interval(self.timing.ask_every());
                look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
        }
    }

    /// Fences this node when the lease lapsed; rejoins the group once
    /// corosync answers again after such a fence.
    fn check_lease(&mut self) -> Vec<Step> {
        let now = std::time::Instant::now();
        if self.lapse.lapsed(&self.lease, now) {
            tracing::error!(
                unanswered = ?self.lease.age(now),
                lease = ?self.timing.bound(),
                "corosync has not answered within the membership lease (stopped, or this node was paused): \
                 fencing this node until it comes back through a new round"
            );
            self.metrics.lease_lapses.inc();
            self.fenced_by_lease = true;
            return self.agreement.lease_lapsed();
        }
        if self.fenced_by_lease && !self.lease.is_stale(now) {
            self.fenced_by_lease = false;
            tracing::warn!("corosync answers again: starting a round, to rejoin as a new incarnation");
            return self.agreement.lease_renewed();
        }
        Vec::new()
    }

    /// With a fencing command, fences the nodes of members that held up a
    /// change for longer than `member_stall_timeout` without reporting.
    /// Without one the change waits, visibly (`dlm-agent status`): a stopped
    /// agent whose node cannot be fenced may still hold locks.
    fn check_stall(&mut self) -> Vec<Step> {
        let Some((awaited, since)) = &self.status.agreeing else { return Vec::new() };
        let timeout = self.settings.fencing.member_stall_timeout;
        if self.settings.fencing.command.is_none() || since.elapsed() < timeout {
            return Vec::new();
        }
        let stalled: Vec<u32> = awaited.iter().map(|n| u32::from(n.0)).collect();
        let steps = self.agreement.fence_stalled(&stalled);
        for step in &steps {
            if let Step::Fence(node) = step {
                tracing::warn!(node, ?timeout, "a member has not reported in the round for too long: fencing its node");
            }
        }
        steps
    }

    fn event(&mut self, event: Event) -> Vec<Step> {
        let node = self.settings.node_id;
        match event {
            Event::Joined { handle, me } => {
                if me.nodeid != u32::from(node) {
                    tracing::error!(
                        corosync = me.nodeid,
                        dlm = node,
                        "corosync's node id is not this node's cluster.node_id: this node stays out of the cluster"
                    );
                    return Vec::new();
                }
                tracing::info!(nodeid = me.nodeid, pid = me.pid, "joined the corosync group");
                self.group = Some(handle);
                self.status.connected = true;
                self.agreement.joined(me);
                Vec::new()
            }
            Event::Confchg { members, lost } => {
                tracing::info!(members = ?members.iter().map(|m| m.nodeid).collect::<Vec<_>>(), ?lost, "group changed");
                self.status.group = members
                    .iter()
                    .filter_map(|m| u16::try_from(m.nodeid).ok())
                    .filter(|id| self.settings.members.iter().any(|c| c.id == *id))
                    .map(NodeId)
                    .collect();
                let now = Instant::now();
                for nodeid in &lost {
                    self.lost_at.entry(*nodeid).or_insert(now);
                }
                self.agreement.confchg(members, &lost)
            }
            Event::Fenced(nodeid) => self.agreement.fence_done(nodeid),
            Event::Totem(ring) => self.agreement.totem(ring),
            Event::Deliver(from, bytes) => match message::decode(&bytes) {
                Some(message) => self.agreement.deliver(from, message),
                None => vec![Step::Refused(Refusal::BadMessage, Some(from.nodeid))],
            },
            Event::Quorum { quorate, ring } => {
                tracing::info!(quorate, ring, "quorum");
                self.status.quorate = Some(quorate);
                self.agreement.quorum(quorate, ring)
            }
            Event::CpgLost(why) => {
                tracing::error!(%why, "lost the corosync group: fencing this node until it is back");
                self.group = None;
                self.status.connected = false;
                self.status.group.clear();
                self.agreement.lost()
            }
            Event::QuorumLost(why) => {
                tracing::error!(%why, "lost corosync's quorum service: fencing this node until it is back");
                self.status.quorate = None;
                self.agreement.quorum_lost()
            }
            Event::Timing(timing) => {
                self.timing_changed(timing);
                Vec::new()
            }
        }
    }

    /// corosync's timeouts changed while it ran: the lease already took its
    /// bound; the grace follows. A configured grace that is now below what
    /// corosync needs cannot be refused as at start: the floor is used
    /// instead (waiting longer is safe, less is not), and the log says so.
    fn timing_changed(&mut self, timing: Timing) {
        self.timing = timing;
        self.grace = self_fence_grace(&self.settings, timing).unwrap_or_else(|error| {
            tracing::error!(%error, "using the floor until the configuration is fixed");
            timing.grace_floor()
        });
        self.metrics.lease_bound.set(timing.bound().as_secs_f64());
        tracing::warn!(
            token = ?timing.token,
            consensus = ?timing.consensus,
            lease = ?timing.bound(),
            self_fence_grace = ?self.grace,
            "corosync's timeouts changed"
        );
    }

    /// Carries out one step; false when the driver has stopped.
    async fn step(&mut self, step: Step) -> bool {
        match step {
            Step::Send(message) => {
                if let Some(handle) = self.group.as_ref()
                    && let Err(error) = corosync::multicast(handle, &message::encode(&message)).await
                {
                    tracing::warn!(%error, "cannot multicast to the group");
                }
            }
            Step::View(view) => {
                tracing::info!(epoch = view.epoch, quorate = view.quorate, "agreed on a view");
                // Said only where the minority is why: an agreed view (even
                // epoch; a node fencing itself alone takes the odd one) while
                // corosync says quorate.
                let agreed = view.epoch.is_multiple_of(2);
                if agreed && self.status.quorate == Some(true) && !self.agreement.agents_are_a_majority(&view) {
                    tracing::warn!(
                        epoch = view.epoch,
                        agents = view.members.len(),
                        configured = self.settings.members.len(),
                        "the view's agents are not a majority of the configured nodes: nothing is granted until more join"
                    );
                }
                // A quorate view's epoch is on disk before any token of it is
                // handed out (see `crate::generation`); a node that cannot
                // record it stays in its older epoch, which its peers refuse.
                // A view that fences grants nothing and never waits on a disk.
                if view.quorate {
                    let (dir, epoch) = (self.state_dir.clone(), view.epoch);
                    let recorded = tokio::task::spawn_blocking(move || generation::raise(&dir, epoch)).await;
                    if let Err(error) = recorded.map_err(|e| e.to_string()).and_then(|r| r) {
                        tracing::error!(%error, epoch, "cannot record the view's epoch; the view is not taken");
                        return true;
                    }
                }
                if let Some(watchdog) = &self.watchdog {
                    let me = NodeId(self.settings.node_id);
                    watchdog.member(view.quorate && view.members.iter().any(|m| m.id == me));
                }
                return self.driver.send(Command::View { view }).await.is_ok();
            }
            Step::Refused(reason, nodeid) => {
                tracing::warn!(reason = reason.as_str(), ?nodeid, "left out of the view");
                self.metrics.refused.with_label_values(&[reason.as_str()]).inc();
            }
            Step::Fence(nodeid) => {
                let address = self.settings.members.iter().find(|m| u32::from(m.id) == nodeid).map(|m| m.address);
                let task = tokio::spawn(fencing::fence(
                    self.settings.fencing.clone(),
                    self.grace,
                    nodeid,
                    address,
                    self.events.clone(),
                    self.metrics.fencing.clone(),
                ));
                if let Some(earlier) = self.fencing.insert(nodeid, task.abort_handle()) {
                    earlier.abort();
                }
            }
        }
        true
    }

    /// Tells the driver what changed; false when the driver has stopped.
    async fn report_status(&mut self) -> bool {
        let unfenced = self.agreement.unfenced();
        self.lost_at.retain(|nodeid, _| unfenced.contains(nodeid));
        // Fenced by someone else, acknowledged by hand, or back: stop trying.
        // A member fenced because it stalled a round is no lost node: its
        // fencing goes on while the round still waits for it.
        let stalling = self.agreement.waiting_for();
        self.fencing.retain(|nodeid, task| {
            let keep = unfenced.contains(nodeid) || stalling.contains(nodeid);
            if !keep {
                task.abort();
            }
            keep
        });
        let waiting: Vec<(NodeId, Instant)> = self
            .lost_at
            .iter()
            .filter_map(|(&nodeid, &at)| u16::try_from(nodeid).ok().map(|id| (NodeId(id), at)))
            .collect();
        self.status.waiting_for_fencing = waiting;
        let awaited: Vec<NodeId> =
            self.agreement.waiting_for().into_iter().filter_map(|n| u16::try_from(n).ok()).map(NodeId).collect();
        self.status.agreeing = match (awaited.is_empty(), self.status.agreeing.take()) {
            (true, _) => None,
            (false, Some((_, since))) => Some((awaited, since)),
            (false, None) => Some((awaited, Instant::now())),
        };
        if self.status == self.reported {
            return true;
        }
        self.reported = self.status.clone();
        self.driver.send(Command::Membership(self.status.clone())).await.is_ok()
    }
}
