//! The driver: the task that owns the `dlm_core::cluster::ClusterNode`, the
//! agent's lock engine. Every transport talks to it through a
//! [`DriverHandle`]; it feeds requests, peer messages and time to the node
//! and routes the node's effects to the sessions and peers they are for.
//!
//! ```text
//!  transports ──Command──▶ driver ──▶ ClusterNode::handle_client / handle_peer / handle_timeout
//!        ▲                   │
//!        │                   ├─ poll_effect  → session output (the session's queue or frames)
//!        │                   └─ poll_transmit → peer batching (a queue per peer's dialer)
//!        └─ ServerMessage ◀──┘
//! ```
//!
//! One job per file, each an `impl Driver` block over the fields it owns:
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the driver's state, start, the run loop and command dispatch |
//! | `requests.rs` | a client's request: decoded, resolved, handed to the node, or rejected |
//! | `output.rs` | session output: effects routed to sessions, writes batched per pass, slow readers ended |
//! | `quota.rs` | the session quotas: per uid and in all, refused with a message that says how to raise them |
//! | `peers.rs` | peer batching: the node's envelopes to the peers' dialers, stalled links reset |
//! | `observe/` | observation: metrics, lock spans, USDT probe points, kernel evidence |
//! | `admin.rs` | status, lockspaces, dump, lockspace creation and release, shutdown |
//! | `views.rs` | views from the membership handed to the node, peer links raised in each epoch |
//! | `pressure.rs` | this node's pressure read and sent to the peers each second; nodes lost under pressure told apart |
//!
//! Each session's outgoing queue is bounded (`session_queue_max`); a client
//! that does not read its stream until the queue is full has its session
//! ended, so one stuck client cannot grow the agent's memory or stall others.

mod admin;
mod observe;
mod output;
mod peers;
mod pressure;
mod quota;
mod requests;
mod views;

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, CString};
use std::sync::Arc;

use dlm_core::cluster::{ClusterConfig, ClusterNode, Member, Membership, NodeId};
use dlm_core::{Limit, LockspaceId, NodeConfig, RequestError, SessionId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::access::Access;
use crate::bounds::{COMMAND_BATCH_MAX, COMMAND_QUEUE_MAX};
use crate::clock::Clock;
use crate::codes::SessionEnd;
use crate::command::{Command, Credentials, DriverHandle, FenceAcks, MembershipStatus, PeerSender, SessionOutput};
use crate::config::Config;
use crate::convert::Rejection;
use crate::ebpf::AttributionMaps;
use crate::framing::FrameSink;
use crate::lease::{LapseWatch, Lease};
use crate::metrics::{LockspaceSeries, Metrics};
use crate::peer_view::PeerView;

use self::observe::{LockRecord, Observer};
use self::quota::{SessionLimit, SessionQuota};

/// One open session.
struct SessionState {
    events: SessionOutput,
    /// Dropped with the state: tells the session's reader task to stop.
    _ended: oneshot::Sender<()>,
    credentials: Credentials,
    /// What the agent remembers of each of the session's locks, by handle.
    locks: HashMap<u64, LockRecord>,
}

impl SessionState {
    /// The client's process id, when known (Unix socket clients).
    fn pid(&self) -> Option<u32> {
        self.credentials.pid.and_then(|pid| u32::try_from(pid).ok())
    }
}

/// What a lock's record keeps of its lockspace: the name, as text for
/// labels and as a C string for the USDT probe points, and the metric
/// series its locks update; one allocation shared by all the lockspace's
/// locks, so a lock's record holds one pointer for it.
#[derive(Clone)]
struct LockspaceRef(Arc<LockspaceShared>);

struct LockspaceShared {
    name: Box<str>,
    c_name: CString,
    series: LockspaceSeries,
}

impl LockspaceRef {
    fn new(name: &str, series: LockspaceSeries) -> LockspaceRef {
        // A name with a NUL byte cannot be a C string: the USDT probe points show it empty.
        let c_name = CString::new(name).unwrap_or_default();
        LockspaceRef(Arc::new(LockspaceShared { name: name.into(), c_name, series }))
    }

    fn text(&self) -> &str {
        &self.0.name
    }

    fn c_string(&self) -> &CStr {
        &self.0.c_name
    }

    fn series(&self) -> &LockspaceSeries {
        &self.0.series
    }
}

struct Driver {
    node: ClusterNode,
    /// This node's id (0 for a single node).
    node_id: NodeId,
    /// The queues to the peers' dialers (`peers.rs`).
    peers: HashMap<NodeId, PeerSender>,
    /// Peers whose dialer is connected now (`views.rs`).
    connected: BTreeSet<NodeId>,
    /// What the peer transport knows of the views (`views.rs`).
    peer_view: Arc<PeerView>,
    /// Where `fence-ack` goes (`views.rs`).
    fence_acks: Option<FenceAcks>,
    /// What the membership last said of itself (`views.rs`).
    membership: Option<MembershipStatus>,
    /// The membership lease, checked before anything that may grant.
    lease: Option<(Arc<Lease>, LapseWatch)>,
    /// This node's incarnation in its quorate view (`views.rs`).
    incarnation: Option<u64>,
    /// The incarnation this node fenced itself in on a lapsed lease: views
    /// with it again are stale (`views.rs`).
    fenced_on_lapse: Option<u64>,
    clock: Clock,
    config: Arc<Config>,
    started: Instant,
    sessions: HashMap<SessionId, SessionState>,
    /// Sessions open per uid, and the refusals already logged (`quota.rs`).
    quota: SessionQuota,
    lockspaces: HashMap<LockspaceId, LockspaceRef>,
    /// Sessions found not reading during routing, ended after it (`output.rs`).
    slow: Vec<SessionId>,
    /// Framed sessions to flush after this pass (frames appended to a clean
    /// sink), or to check for slowness after the flush (over the limit).
    unflushed: Vec<(SessionId, FrameSink)>,
    /// Shutting down: sessions are ended in order, none as slow.
    stopping: bool,
    /// Metrics, spans, USDT probe points and kernel evidence (`observe/`).
    observer: Observer,
    /// Who may lock where (`requests.rs`).
    access: Arc<Access>,
    /// This node's pressure as last read (`pressure.rs`).
    own_pressure: Option<dlm_core::cluster::NodePressure>,
}

/// What the driver is wired to besides its clients: the peers' dialers,
/// the peer transport's view, and the membership (operators' fence
/// acknowledgements, the lease). Not the core's `Links` (one node's
/// message links to its peers).
pub struct Wiring {
    /// The queues to the peers' dialers.
    pub peers: HashMap<NodeId, PeerSender>,
    /// What the peer transport knows of the views.
    pub peer_view: Arc<PeerView>,
    /// Where `fence-ack` goes (membership from corosync only).
    pub fence_acks: Option<FenceAcks>,
    /// The lease on corosync's answers (membership from corosync only).
    pub lease: Option<Arc<Lease>>,
}

/// Creates the node and its lockspaces and starts the driver.
///
/// # Errors
/// The configured limits or lockspaces are invalid.
pub fn start(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    clock: Clock,
    attribution: Option<AttributionMaps>,
    wiring: Wiring,
    access: Arc<Access>,
    token_floor: u64,
) -> Result<(DriverHandle, tokio::task::JoinHandle<()>), String> {
    let Wiring { peers, peer_view, fence_acks, lease } = wiring;
    let node_config = NodeConfig { limits: config.limits.clone(), token_floor, ..NodeConfig::default() };
    let (node_id, cluster_config) = match &config.cluster {
        Some(cluster) => {
            let settings = cluster.cluster_config()?;
            (settings.node, settings)
        }
        None => {
            let single = Membership::new(vec![Member { id: NodeId(0), weight: 1 }], 1)?;
            (NodeId(0), ClusterConfig::new(NodeId(0), single))
        }
    };
    let mut node = ClusterNode::new(ClusterConfig { engine: node_config, ..cluster_config })?;
    // Links are down until each peer's dialer has connected.
    let peer_ids: Vec<NodeId> = node.peers().collect();
    for peer in &peer_ids {
        node.handle_link(dlm_core::Instant::ZERO, *peer, false);
    }
    let observer = Observer::new(&config, metrics, attribution, clock);
    let mut driver = Driver {
        node,
        node_id,
        peers,
        connected: BTreeSet::new(),
        peer_view,
        fence_acks,
        membership: None,
        lease: lease.map(|lease| (lease, LapseWatch::default())),
        incarnation: None,
        fenced_on_lapse: None,
        clock,
        config: config.clone(),
        started: clock.now(),
        sessions: HashMap::new(),
        quota: SessionQuota::new(config.clients.sessions_per_uid_max),
        lockspaces: HashMap::new(),
        slow: Vec::new(),
        unflushed: Vec::new(),
        stopping: false,
        observer,
        access,
        own_pressure: None,
    };
    for entry in &config.lockspaces {
        driver
            .create_lockspace(&entry.name, config.lockspace_config(entry))
            .map_err(|r| format!("lockspace {:?}: {}", entry.name, r.message))?;
    }
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE_MAX);
    let task = tokio::spawn(driver.run(receiver));
    Ok((DriverHandle::new(commands), task))
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut pressure = tokio::time::interval(pressure::REPORT_EVERY);
        pressure.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.node.poll_timeout().map(|at| self.clock.to_tokio(at));
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    self.check_lease();
                    if let Some(reply) = self.handle_or_stop(command) {
                        return self.stop(&mut commands, reply);
                    }
                    // Under load, take what is already queued before routing
                    // effects: fewer wake-ups of the session streams.
                    for _ in 0..COMMAND_BATCH_MAX {
                        let Ok(command) = commands.try_recv() else { break };
                        if let Some(reply) = self.handle_or_stop(command) {
                            return self.stop(&mut commands, reply);
                        }
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.check_lease();
                    self.node.handle_timeout(self.clock.engine_now());
                }
                _ = pressure.tick() => self.report_pressure(),
            }
            self.route_effects();
            if self.observer.recovering() {
                self.observer.update_recovery(&self.node);
            }
        }
    }

    /// Handles a command, unless it is the shutdown: then its reply.
    fn handle_or_stop(&mut self, command: Command) -> Option<oneshot::Sender<()>> {
        if let Command::Shutdown { reply } = command {
            return Some(reply);
        }
        self.handle(command);
        None
    }

    /// Stops: no command is taken any more; those already queued are
    /// answered (a client's request refused as `shutting_down`, as every
    /// pending one is cancelled), then every session ends.
    fn stop(&mut self, commands: &mut mpsc::Receiver<Command>, reply: oneshot::Sender<()>) {
        commands.close();
        self.shutdown(commands);
        let _ = reply.send(());
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Open { credentials, events, ended, reply } => {
                let _ = reply.send(self.open_session(credentials, events, ended));
            }
            Command::Client { session, message } => self.client(session, message),
            Command::Close { session } => self.end_session(session, SessionEnd::Closed),
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Lockspaces { reply } => {
                let _ = reply.send(self.lockspaces());
            }
            Command::Dump { request, reply } => {
                let _ = reply.send(self.dump(&request));
            }
            Command::CreateLockspace { name, lvb_len, reply } => {
                let entry = crate::config::LockspaceEntry { name: name.clone(), lvb_len, lock_delay: None };
                let _ = reply.send(self.create_lockspace(&name, self.config.lockspace_config(&entry)));
            }
            Command::ReleaseLockspace { name, force, reply } => {
                let _ = reply.send(self.release_lockspace(&name, force));
            }
            Command::Peer { from, envelopes, refused } => {
                let now = self.clock.engine_now();
                for envelope in envelopes {
                    if let Err(error) = self.node.handle_peer(now, from, envelope) {
                        tracing::warn!(peer = from.0, %error, "peer broke the protocol; dropping its connection");
                        refused.notify_one();
                        break;
                    }
                }
            }
            Command::Link { peer, up } => self.link(peer, up),
            Command::View { view } => self.take_view(&view),
            Command::Membership(status) => {
                self.observer.membership(&status);
                self.membership = Some(status);
            }
            Command::FenceAck { node, reply } => {
                let _ = reply.send(self.fence_ack(node));
            }
            Command::HighestToken { reply } => {
                let _ = reply.send(self.node.engine().highest_token());
            }
            Command::Shutdown { .. } => unreachable!("handled by run"),
        }
    }

    fn open_session(
        &mut self,
        credentials: Credentials,
        events: SessionOutput,
        ended: oneshot::Sender<()>,
    ) -> Result<SessionId, Rejection> {
        let uid = credentials.uid();
        if let Err(refusal) = self.quota.check(uid) {
            self.observer.session_refused(SessionLimit::PerUid);
            return Err(refusal);
        }
        let session = self.node.open_next_session().map_err(|error| match error {
            RequestError::LimitExceeded(Limit::Sessions) => {
                self.observer.session_refused(SessionLimit::Total);
                self.quota.full(self.config.limits.sessions_max)
            }
            error => Rejection::from_engine(0, &error),
        })?;
        self.quota.opened(uid);
        let state = SessionState { events, _ended: ended, credentials, locks: HashMap::new() };
        self.observer.session_opened(state.pid());
        self.sessions.insert(session, state);
        Ok(session)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
