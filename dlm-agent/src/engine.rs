//! The engine task: the one owner of the `dlm_core::Node`. Everything else
//! talks to it through [`EngineHandle`]; it feeds requests and time to the
//! node and routes the node's effects to the sessions they are for.
//!
//! ```text
//!  session streams ──Command──▶ engine task ──▶ Node::handle_client / handle_timeout
//!        ▲                          │
//!        └──── ServerMessage ◀──────┘ poll_effect → route to the session's queue
//! ```
//!
//! Each session's outgoing queue is bounded (`session_queue_max`); a client
//! that does not read its stream until the queue is full has its session
//! ended, so one stuck client cannot grow the agent's memory or stall others.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::Arc;

use dlm_core::cluster::{ClusterConfig, ClusterNode, Envelope, Member, Membership, NodeId};
use dlm_core::{ClientRequest, Effect, LockspaceConfig, LockspaceId, Mode, NodeConfig, Op, SessionId, Status};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::cluster_metrics::ClusterMetrics;
use crate::config::Config;
use crate::convert::{self, Decoded, Rejection};
use crate::framing::FrameSink;
use crate::kernel_evidence::{self, KernelEvidence, Phase};
use crate::metrics::Metrics;
use crate::peer::PeerSender;
use crate::probes::{self, ResourceName};
use crate::proto;
use dlm_ebpf_common::Attribution;

/// Who is on the other end of a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's process id (Unix socket clients only).
    pub pid: Option<i32>,
    /// The client's user id (Unix socket clients only).
    pub uid: Option<u32>,
}

/// Messages to a session's stream.
pub type SessionSender = mpsc::Sender<Result<proto::ServerMessage, tonic::Status>>;

/// Where a session's messages go.
#[derive(Clone)]
pub enum SessionOutput {
    /// A gRPC stream's bounded queue (`session_queue_max` messages).
    Stream(SessionSender),
    /// A framed connection, written by the engine itself; more than
    /// `session_queue_max` frames unwritten make the session slow.
    Framed(FrameSink),
}

/// What the engine task is asked to do.
#[expect(missing_docs, reason = "each variant's doc says what its fields are for; `reply` carries the answer")]
pub enum Command {
    /// Open a session whose messages go to `events`.
    /// `ended` is dropped when the session ends, which stops its reader.
    Open {
        peer: Peer,
        events: SessionOutput,
        ended: oneshot::Sender<()>,
        reply: oneshot::Sender<Result<SessionId, Rejection>>,
    },
    /// A message from a session's client.
    Client { session: SessionId, message: proto::ClientMessage },
    /// The session's stream ended.
    Close { session: SessionId },
    /// Status for the `Status` call.
    Status { reply: oneshot::Sender<proto::StatusReply> },
    /// Lockspaces for the `Lockspaces` call (and the metrics' gauges).
    Lockspaces { reply: oneshot::Sender<proto::LockspacesReply> },
    /// A dump for the `Dump` call.
    Dump { request: proto::DumpRequest, reply: oneshot::Sender<Result<proto::DumpReply, Rejection>> },
    /// Create a lockspace.
    CreateLockspace { name: String, lvb_len: usize, reply: oneshot::Sender<Result<(), Rejection>> },
    /// Release a lockspace.
    ReleaseLockspace { name: String, force: bool, reply: oneshot::Sender<Result<(), Rejection>> },
    /// Cancel pending requests, revoke locks, end every session, stop.
    Shutdown { reply: oneshot::Sender<()> },
    /// Envelopes from a peer; `refused` is notified if the peer broke the
    /// protocol (its connection is then dropped).
    Peer { from: NodeId, envelopes: Vec<Envelope>, refused: Arc<Notify> },
    /// The link to a peer went down or came up.
    Link { peer: NodeId, up: bool },
}

/// A cheap, cloneable way to reach the engine task.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
}

/// The engine task is gone (the agent is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the lock engine has stopped")]
pub struct EngineStopped;

impl EngineHandle {
    /// Sends a command, waiting for room in the queue (back-pressure).
    ///
    /// # Errors
    /// The engine task has stopped.
    pub async fn send(&self, command: Command) -> Result<(), EngineStopped> {
        self.commands.send(command).await.map_err(|_| EngineStopped)
    }

    /// Sends a command built around a reply channel and waits for the reply.
    ///
    /// # Errors
    /// The engine task has stopped.
    pub async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.send(command(reply)).await?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// Opens a session for a client stream (gRPC or framed) whose messages
    /// go to `output`, the `Welcome` naming the session and `node` first.
    ///
    /// # Errors
    /// The engine refused the session (too many) or has stopped.
    pub async fn open_session(&self, peer: Peer, node: &str, output: SessionOutput) -> Result<OpenSession, OpenError> {
        let welcome_output = output.clone();
        let (ended, session_ended) = oneshot::channel();
        let session = self
            .ask(|reply| Command::Open { peer, events: output, ended, reply })
            .await
            .map_err(|EngineStopped| OpenError::Stopped)?
            .map_err(OpenError::Refused)?;
        let welcome = proto::ServerMessage {
            body: Some(proto::server_message::Body::Welcome(proto::Welcome { session: session.0, node: node.into() })),
        };
        // Nothing was sent to the session yet: the welcome goes first, and
        // fits in an empty queue.
        match welcome_output {
            SessionOutput::Stream(queue) => {
                let _ = queue.try_send(Ok(welcome));
            }
            SessionOutput::Framed(sink) => {
                let _ = sink.send_message(&welcome);
            }
        }
        Ok(OpenSession { session, ended: session_ended })
    }
}

/// A session just opened, for the task that serves its stream.
pub struct OpenSession {
    /// Its id.
    pub session: SessionId,
    /// Completes when the engine ends the session (slow reader, shutdown).
    pub ended: oneshot::Receiver<()>,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    Stopped,
    /// The engine refused it.
    #[error("{}: {}", .0.code, .0.message)]
    Refused(Rejection),
}

/// Engine commands queued at most; senders wait beyond that.
const COMMAND_QUEUE_MAX: usize = 16_384;
/// Commands handled in a row before effects are routed.
const COMMAND_BATCH_MAX: usize = 64;
/// Resources a dump returns when the request does not say.
const DUMP_RESOURCES_DEFAULT: usize = 1000;
/// Resources a dump returns at most.
const DUMP_RESOURCES_MAX: usize = 100_000;

/// What the agent remembers about one of a session's locks, for metrics.
struct HandleState {
    lockspace: Arc<str>,
    /// The mode of the pending request, or of the grant.
    mode: Mode,
    /// When the pending request was made.
    requested_at: Option<Instant>,
    /// When the lock was first granted.
    granted_at: Option<Instant>,
    /// The lock's span (queued, granted, blocking callbacks, released), when
    /// spans are exported.
    span: Option<tracing::Span>,
    /// The client process's kernel counters at the start of the current
    /// phase (a queued request, or the first grant), when eBPF is on.
    mark: Option<Attribution>,
    /// The lockspace and resource names, for the probe points.
    probe_lockspace: Arc<CStr>,
    resource: ResourceName,
    /// The fencing token of the grant.
    token: u64,
}

impl HandleState {
    fn probe_target(&self) -> probes::Target<'_> {
        probes::Target { lockspace: &self.probe_lockspace, resource: &self.resource }
    }
}

/// Adds an event to a lock's span, if it has one.
macro_rules! span_event {
    ($span:expr, $($event:tt)+) => {
        if let Some(span) = &$span {
            tracing::info!(target: crate::telemetry::LOCK_TARGET, parent: span, $($event)+);
        }
    };
}

struct SessionState {
    events: SessionOutput,
    /// Dropped with the state: tells the session's reader task to stop.
    _ended: oneshot::Sender<()>,
    peer: Peer,
    handles: HashMap<u64, HandleState>,
}

impl SessionState {
    /// The client's process id, when known (Unix socket clients).
    fn pid(&self) -> Option<u32> {
        self.peer.pid.and_then(|pid| u32::try_from(pid).ok())
    }
}

struct Engine {
    node: ClusterNode,
    /// This node's id (0 for a single node).
    node_id: NodeId,
    /// The queues to the peers' dialers.
    peers: HashMap<NodeId, PeerSender>,
    cluster_metrics: Option<ClusterMetrics>,
    clock: Clock,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    started: Instant,
    sessions: HashMap<SessionId, SessionState>,
    lockspace_names: HashMap<LockspaceId, Arc<str>>,
    /// The same names as C strings, for the probe points.
    lockspace_cnames: HashMap<LockspaceId, Arc<CStr>>,
    next_session: u64,
    /// Sessions found not reading during routing, ended after it.
    slow: Vec<SessionId>,
    /// Framed sessions to flush after this pass (frames appended to a clean
    /// sink), or to check for slowness after the flush (over the limit).
    unflushed: Vec<(SessionId, FrameSink)>,
    /// Shutting down: sessions are ended in order, none as slow.
    stopping: bool,
    /// Kernel attribution of lock phases (a no-op without eBPF).
    evidence: KernelEvidence,
}

/// Creates the node and its lockspaces and starts the engine task.
///
/// # Errors
/// The configured limits or lockspaces are invalid.
pub fn start(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    clock: Clock,
    evidence: KernelEvidence,
    peers: HashMap<NodeId, PeerSender>,
) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), String> {
    let node_config = NodeConfig { limits: config.limits.clone(), ..NodeConfig::default() };
    let (node_id, cluster_config) = match &config.cluster {
        Some(cluster) => {
            let node_id = NodeId(cluster.node_id);
            let mut settings = ClusterConfig::new(node_id, cluster.membership()?);
            settings.release_delay = cluster.release_delay;
            settings.deadlock_interval = cluster.deadlock_interval;
            settings.ack_timeout = cluster.peer_timeout;
            // Three heartbeats per timeout: a quiet link to a peer that went
            // away is found within about a timeout and a third.
            settings.heartbeat_interval = cluster.peer_timeout / 3;
            (node_id, settings)
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
    let cluster_metrics = config.cluster.as_ref().map(|c| ClusterMetrics::new(&metrics, c.members.len()));
    let mut engine = Engine {
        node,
        node_id,
        peers,
        cluster_metrics,
        clock,
        config: config.clone(),
        metrics,
        started: clock.now(),
        sessions: HashMap::new(),
        lockspace_names: HashMap::new(),
        lockspace_cnames: HashMap::new(),
        next_session: 1,
        slow: Vec::new(),
        unflushed: Vec::new(),
        stopping: false,
        evidence,
    };
    for entry in &config.lockspaces {
        engine
            .create_lockspace(&entry.name, entry.lvb_len)
            .map_err(|r| format!("lockspace {:?}: {}", entry.name, r.message))?;
    }
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE_MAX);
    let task = tokio::spawn(engine.run(receiver));
    Ok((EngineHandle { commands }, task))
}

impl Engine {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let deadline = self.node.poll_timeout().map(|at| self.clock.to_tokio(at));
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    if self.handle_or_stop(command) {
                        return;
                    }
                    // Under load, take what is already queued before routing
                    // effects: fewer wake-ups of the session streams.
                    for _ in 0..COMMAND_BATCH_MAX {
                        let Ok(command) = commands.try_recv() else { break };
                        if self.handle_or_stop(command) {
                            return;
                        }
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.node.handle_timeout(self.clock.engine_now());
                }
            }
            self.route_effects();
        }
    }

    /// Handles a command; true when it was the shutdown (already carried out).
    fn handle_or_stop(&mut self, command: Command) -> bool {
        if let Command::Shutdown { reply } = command {
            self.shutdown();
            let _ = reply.send(());
            return true;
        }
        self.handle(command);
        false
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Open { peer, events, ended, reply } => {
                let session = if self.peers.is_empty() {
                    SessionId(self.next_session)
                } else {
                    self.node_id.session(self.next_session)
                };
                let result = match self.node.open_session(session) {
                    Ok(()) => {
                        self.next_session += 1;
                        self.evidence.session_opened(peer.pid.and_then(|pid| u32::try_from(pid).ok()));
                        self.sessions
                            .insert(session, SessionState { events, _ended: ended, peer, handles: HashMap::new() });
                        self.metrics.sessions.inc();
                        self.metrics.sessions_opened.inc();
                        Ok(session)
                    }
                    Err(error) => Err(Rejection::from_engine(0, &error)),
                };
                let _ = reply.send(result);
            }
            Command::Client { session, message } => self.client(session, message),
            Command::Close { session } => self.end_session(session, "closed"),
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
                let _ = reply.send(self.create_lockspace(&name, lvb_len));
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
            Command::Link { peer, up } => self.node.handle_link(self.clock.engine_now(), peer, up),
            Command::Shutdown { .. } => unreachable!("handled by run"),
        }
    }

    fn client(&mut self, session: SessionId, message: proto::ClientMessage) {
        if !self.sessions.contains_key(&session) {
            return;
        }
        let decoded = match convert::decode(message) {
            Ok(decoded) => decoded,
            Err(rejection) => return self.reject(session, rejection),
        };
        let Decoded { handle, lockspace, mut request, traceparent } = decoded;
        let mut lockspace_name = None;
        let mut probe_lockspace = None;
        if let (Some(name), ClientRequest::Lock(lock)) = (lockspace, &mut request) {
            let Some(id) = self.node.lockspace_id(name.as_bytes()) else {
                let message = format!("no lockspace named {name:?}");
                return self.reject(session, Rejection::new(handle, "unknown_lockspace", message));
            };
            lock.lockspace = id;
            lockspace_name = self.lockspace_names.get(&id).cloned();
            probe_lockspace = self.lockspace_cnames.get(&id).cloned();
        }
        let now = self.clock.now();
        let span = match (&request, &lockspace_name) {
            (ClientRequest::Lock(lock), Some(lockspace)) if self.config.lock_spans => {
                Some(self.lock_span(session, lockspace, lock, traceparent.as_deref()))
            }
            _ => None,
        };
        let resource = match &request {
            ClientRequest::Lock(lock) => ResourceName::new(&lock.name),
            _ => ResourceName::new(b""),
        };
        let mode = match &request {
            ClientRequest::Lock(lock) => Some(lock.mode),
            ClientRequest::Convert(convert) => Some(convert.mode),
            _ => None,
        };
        match self.node.handle_client(self.clock.to_engine(now), session, request) {
            Ok(()) => {
                // Only spans and kernel attribution need to know whether the
                // request had to wait.
                let queued = (self.config.lock_spans || self.evidence.enabled())
                    && mode.is_some()
                    && self
                        .node
                        .lock_info(session, dlm_core::LockHandle(handle))
                        .is_some_and(|l| l.requested.is_some());
                let Some(state) = self.sessions.get_mut(&session) else { return };
                match (lockspace_name, mode) {
                    (Some(lockspace), Some(mode)) => {
                        // A new lock; its completion may already be queued.
                        let mark = if queued {
                            span_event!(span, "queued");
                            self.evidence.mark(state.pid())
                        } else {
                            None
                        };
                        let known = HandleState {
                            lockspace,
                            mode,
                            requested_at: Some(now),
                            granted_at: None,
                            span,
                            mark,
                            probe_lockspace: probe_lockspace.unwrap_or_else(|| Arc::from(c"")),
                            resource,
                            token: 0,
                        };
                        let pid = state.pid().map_or(0, u64::from);
                        probes::request(known.probe_target(), mode, session.0, handle, pid);
                        state.handles.insert(handle, known);
                    }
                    (None, Some(mode)) => {
                        if let Some(known) = state.handles.get_mut(&handle) {
                            known.mode = mode;
                            known.requested_at = Some(now);
                            span_event!(known.span, mode = mode.name(), queued, "convert requested");
                        }
                    }
                    _ => {}
                }
            }
            Err(error) => {
                let rejection = Rejection::from_engine(handle, &error);
                span_event!(span, code = rejection.code, "rejected");
                self.reject(session, rejection);
            }
        }
    }

    /// The span of one lock request, joined to the client's trace when it
    /// passed a valid `traceparent`.
    fn lock_span(
        &self,
        session: SessionId,
        lockspace: &str,
        lock: &dlm_core::LockRequest,
        traceparent: Option<&str>,
    ) -> tracing::Span {
        let pid = self.sessions.get(&session).and_then(|s| s.peer.pid).unwrap_or(0);
        let span = tracing::info_span!(
            target: crate::telemetry::LOCK_TARGET,
            "dlm.lock",
            otel.name = "dlm lock",
            otel.kind = "server",
            dlm.lockspace = lockspace,
            dlm.resource = %String::from_utf8_lossy(&lock.name),
            dlm.mode = lock.mode.name(),
            dlm.flags = %lock.flags,
            dlm.session = session.0,
            dlm.handle = lock.handle.0,
            dlm.pid = pid,
            dlm.outcome = tracing::field::Empty,
            dlm.fencing_token = tracing::field::Empty,
            dlm.kernel.wait.oncpu_ns = tracing::field::Empty,
            dlm.kernel.wait.runqueue_ns = tracing::field::Empty,
            dlm.kernel.wait.blocked_ns = tracing::field::Empty,
            dlm.kernel.wait.reclaim_ns = tracing::field::Empty,
            dlm.kernel.wait.kernel_lock_ns = tracing::field::Empty,
            dlm.kernel.wait.futex_ns = tracing::field::Empty,
            dlm.kernel.hold.oncpu_ns = tracing::field::Empty,
            dlm.kernel.hold.runqueue_ns = tracing::field::Empty,
            dlm.kernel.hold.blocked_ns = tracing::field::Empty,
            dlm.kernel.hold.reclaim_ns = tracing::field::Empty,
            dlm.kernel.hold.kernel_lock_ns = tracing::field::Empty,
            dlm.kernel.hold.futex_ns = tracing::field::Empty,
        );
        if let Some(context) = traceparent.and_then(crate::telemetry::parent_context) {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let _ = span.set_parent(context);
        }
        span
    }

    fn reject(&mut self, session: SessionId, rejection: Rejection) {
        self.metrics.rejected.with_label_values(&[rejection.code]).inc();
        self.deliver(session, rejection.into_message());
    }

    /// Queues a message for a session; a full queue marks the session slow.
    fn deliver(&mut self, session: SessionId, message: proto::ServerMessage) {
        let Some(state) = self.sessions.get(&session) else { return };
        match &state.events {
            SessionOutput::Stream(queue) => {
                if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(Ok(message)) {
                    self.slow.push(session);
                }
            }
            SessionOutput::Framed(sink) => {
                // A broken connection is its reader's to notice.
                let Ok(pushed) = sink.push_message(&message) else { return };
                if pushed.needs_flush || pushed.frames > self.config.session_queue_max {
                    self.unflushed.push((session, sink.clone()));
                }
            }
        }
    }

    /// Writes what this pass appended to framed sessions, one write per
    /// session however many messages it got; a session whose client leaves
    /// more than `session_queue_max` frames unread after that is slow.
    fn flush_sessions(&mut self) {
        for (session, sink) in std::mem::take(&mut self.unflushed) {
            sink.flush();
            if sink.frames_waiting() > self.config.session_queue_max {
                self.slow.push(session);
            }
        }
    }

    /// Hands the engine's envelopes to the peers' dialers. A full queue
    /// means the peer does not keep up: its link counts as down (requests
    /// that need it fail rather than pile up) and its connection is re-made.
    fn transmit(&mut self) {
        // One batch per peer per pass: a resend after a reconnection, however
        // long, is one queue entry, so it cannot overflow the queue by itself.
        let mut batches: Vec<(NodeId, Vec<Envelope>)> = Vec::new();
        while let Some((peer, envelope)) = self.node.poll_transmit() {
            match batches.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, batch)) => batch.push(envelope),
                None => batches.push((peer, vec![envelope])),
            }
        }
        let mut stalled: Vec<NodeId> = Vec::new();
        for (peer, batch) in batches {
            let Some(sender) = self.peers.get(&peer) else { continue };
            if sender.queue.try_send(batch).is_err() {
                // The link goes down below; everything the peer has not
                // acknowledged is resent when it is back.
                stalled.push(peer);
            }
        }
        while let Some(peer) = self.node.poll_reset() {
            tracing::warn!(peer = peer.0, "peer left messages unacknowledged; re-making its connection");
            if let Some(cluster) = &self.cluster_metrics {
                cluster.link_resets.with_label_values(&["unacknowledged"]).inc();
            }
            if let Some(sender) = self.peers.get(&peer) {
                sender.reset.notify_one();
            }
        }
        for peer in stalled {
            tracing::warn!(peer = peer.0, "queue to peer full; resetting its link");
            if let Some(cluster) = &self.cluster_metrics {
                cluster.link_resets.with_label_values(&["queue_full"]).inc();
            }
            self.node.handle_link(self.clock.engine_now(), peer, false);
            if let Some(sender) = self.peers.get(&peer) {
                sender.reset.notify_one();
            }
        }
    }

    fn route_effects(&mut self) {
        self.transmit();
        while let Some(effect) = self.node.poll_effect() {
            self.account(&effect);
            let session = match &effect {
                Effect::Complete(completion) => completion.session,
                Effect::Blocking { session, .. } | Effect::Revoked { session, .. } => *session,
            };
            self.deliver(session, convert::effect_to_wire(effect));
        }
        self.flush_sessions();
        if self.stopping {
            // Every session ends next, after hearing why; none as slow.
            self.slow.clear();
        }
        for session in std::mem::take(&mut self.slow) {
            if self.sessions.contains_key(&session) {
                tracing::warn!(session = session.0, "client does not read its stream; ending its session");
                self.end_session(session, "slow_reader");
            }
        }
        self.transmit();
    }

    /// Updates metrics and the per-handle bookkeeping for one effect.
    fn account(&mut self, effect: &Effect) {
        let now = self.clock.now();
        match effect {
            Effect::Complete(completion) => {
                let Some(state) = self.sessions.get_mut(&completion.session) else { return };
                let pid = state.pid();
                let handle = completion.handle.0;
                let Some(known) = state.handles.get_mut(&handle) else { return };
                let op = match completion.op {
                    Op::Lock => "lock",
                    Op::Convert => "convert",
                    Op::Unlock => "unlock",
                };
                let mode = completion.mode.unwrap_or(known.mode);
                let lockspace = known.lockspace.clone();
                self.metrics
                    .requests
                    .with_label_values(&[&lockspace, op, known.mode.name(), completion.status.name()])
                    .inc();
                if let Some(span) = &known.span {
                    if completion.op == Op::Lock {
                        span.record("dlm.outcome", completion.status.name());
                    }
                    if let Some(token) = completion.token {
                        span.record("dlm.fencing_token", token.0);
                    }
                }
                span_event!(
                    known.span,
                    op,
                    status = completion.status.name(),
                    mode = mode.name(),
                    fencing_token = completion.token.map_or(0, |t| t.0),
                    "{}",
                    match (completion.op, completion.status) {
                        (Op::Unlock, _) => "released",
                        (_, Status::Granted) => "granted",
                        _ => "not granted",
                    }
                );
                match completion.status {
                    Status::Granted => {
                        let mut wait_ns = 0;
                        if let Some(at) = known.requested_at.take() {
                            let wait = now.saturating_duration_since(at);
                            wait_ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                            self.metrics
                                .grant_wait
                                .with_label_values(&[&lockspace, mode.name()])
                                .observe(wait.as_secs_f64());
                            if let Some(cluster) = &self.cluster_metrics
                                && self.node.remote_master(completion.session, completion.handle).is_some()
                            {
                                cluster
                                    .remote_grant_wait
                                    .with_label_values(&[&lockspace, mode.name()])
                                    .observe(wait.as_secs_f64());
                            }
                        }
                        known.token = completion.token.map_or(known.token, |t| t.0);
                        probes::grant(known.probe_target(), mode, wait_ns, known.token, pid.map_or(0, u64::from));
                        if known.granted_at.is_none() {
                            if let Some(mark) = known.mark.take() {
                                self.evidence.finish(Phase::Wait, pid, &mark, &self.metrics, known.span.as_ref());
                            }
                            known.mark = self.evidence.mark(pid);
                        }
                        known.granted_at.get_or_insert(now);
                        known.mode = mode;
                    }
                    Status::Unlocked => {
                        if let Some(at) = known.granted_at {
                            let held = now.saturating_duration_since(at);
                            self.metrics
                                .hold
                                .with_label_values(&[&lockspace, known.mode.name()])
                                .observe(held.as_secs_f64());
                            let held_ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
                            probes::release(
                                known.probe_target(),
                                known.mode,
                                held_ns,
                                known.token,
                                pid.map_or(0, u64::from),
                            );
                        }
                        if let Some(mark) = known.mark.take() {
                            self.evidence.finish(Phase::Hold, pid, &mark, &self.metrics, known.span.as_ref());
                        }
                        state.handles.remove(&handle);
                    }
                    _ if completion.mode.is_none() => {
                        state.handles.remove(&handle);
                    }
                    // A conversion that failed: the lock keeps the mode it held.
                    _ => {
                        known.requested_at = None;
                        known.mode = mode;
                    }
                }
            }
            Effect::Blocking { session, handle, mode } => {
                let state = self.sessions.get(session);
                if let Some(known) = state.and_then(|s| s.handles.get(&handle.0)) {
                    let pid = state.and_then(SessionState::pid).map_or(0, u64::from);
                    probes::blocking(known.probe_target(), *mode, session.0, handle.0, pid);
                    self.metrics.blocking.with_label_values(&[&known.lockspace]).inc();
                    span_event!(known.span, mode = mode.name(), "blocking callback sent");
                }
            }
            Effect::Revoked { session, handle, reason } => {
                if let Some(known) = self.sessions.get_mut(session).and_then(|s| s.handles.remove(&handle.0)) {
                    span_event!(known.span, reason = ?reason, "revoked");
                }
            }
        }
    }

    fn end_session(&mut self, session: SessionId, reason: &'static str) {
        let Some(state) = self.sessions.remove(&session) else {
            return;
        };
        self.evidence.session_ended(state.pid());
        let _ = self.node.end_session(self.clock.engine_now(), session);
        self.metrics.sessions.dec();
        self.metrics.sessions_ended.with_label_values(&[reason]).inc();
    }

    /// Answers every pending request (cancelled) and revokes every lock,
    /// then ends every session, so clients hear why before the streams close.
    /// Pending requests are cancelled first, across all sessions, so that no
    /// lock released by an ending session is granted to a waiter meanwhile.
    fn shutdown(&mut self) {
        self.stopping = true;
        let mut sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        sessions.sort_unstable();
        for &session in &sessions {
            let handles: Vec<u64> = self.sessions[&session].handles.keys().copied().collect();
            for handle in handles {
                let handle = dlm_core::LockHandle(handle);
                if self.node.lock_info(session, handle).is_some_and(|info| info.requested.is_some()) {
                    let _ = self.node.handle_client(self.clock.engine_now(), session, ClientRequest::Cancel { handle });
                }
            }
        }
        self.route_effects();
        for session in sessions {
            let Some(state) = self.sessions.get(&session) else { continue };
            let mut granted: Vec<u64> =
                state.handles.iter().filter(|(_, known)| known.granted_at.is_some()).map(|(&h, _)| h).collect();
            granted.sort_unstable();
            for handle in granted {
                let revoked = proto::ServerMessage {
                    body: Some(proto::server_message::Body::Revoked(proto::Revoked {
                        handle,
                        reason: "agent shutting down".into(),
                    })),
                };
                self.deliver(session, revoked);
            }
            self.end_session(session, "shutdown");
        }
        self.flush_sessions();
        // Ending sessions grants nothing to anyone left: there is no one left.
        while self.node.poll_effect().is_some() {}
        // Other nodes' masters hear that these sessions ended.
        self.transmit();
    }

    fn status(&self) -> proto::StatusReply {
        let lockspaces = self.node.lockspaces();
        proto::StatusReply {
            node: self.config.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: u64::try_from(self.clock.now().saturating_duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX),
            sessions: u32::try_from(self.node.session_count()).unwrap_or(u32::MAX),
            lockspaces: u32::try_from(lockspaces.len()).unwrap_or(u32::MAX),
            locks: lockspaces.iter().map(|ls| u64::from(ls.locks)).sum(),
            waiting: lockspaces.iter().map(|ls| u64::from(ls.waiting)).sum(),
            ebpf: self.evidence.enabled(),
            cluster: self.config.cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            node_id: u32::from(self.node_id.0),
            peers: self
                .config
                .cluster
                .iter()
                .flat_map(|c| &c.members)
                .filter(|m| m.id != self.node_id.0)
                .map(|m| {
                    let (up, unacked) = self.node.link_state(NodeId(m.id)).unwrap_or((false, 0));
                    proto::PeerStatus {
                        node_id: u32::from(m.id),
                        address: m.address.to_string(),
                        up,
                        unacked: unacked as u64,
                    }
                })
                .collect(),
            mastered: self.node.mastered_count() as u64,
            directory_entries: self.node.directory_count() as u64,
            remote_locks: self.node.remote_lock_count() as u64,
        }
    }

    fn lockspaces(&mut self) -> proto::LockspacesReply {
        if let Some(cluster) = &mut self.cluster_metrics {
            cluster.update(
                self.node.stats(),
                self.node.mastered_count(),
                self.node.directory_count(),
                self.node.remote_lock_count(),
            );
        }
        let lockspaces = self
            .node
            .lockspaces()
            .into_iter()
            .map(|ls| {
                let name = String::from_utf8_lossy(&ls.name).into_owned();
                self.metrics.granted.with_label_values(&[&name]).set(i64::from(ls.locks - ls.waiting));
                self.metrics.waiting.with_label_values(&[&name]).set(i64::from(ls.waiting));
                self.metrics.resources.with_label_values(&[&name]).set(i64::from(ls.resources));
                proto::LockspaceInfo {
                    name,
                    lvb_len: u32::try_from(ls.config.lvb_len).unwrap_or(u32::MAX),
                    resources: ls.resources,
                    locks: ls.locks,
                    waiting: ls.waiting,
                }
            })
            .collect();
        proto::LockspacesReply { lockspaces }
    }

    fn dump(&self, request: &proto::DumpRequest) -> Result<proto::DumpReply, Rejection> {
        let id = self.node.lockspace_id(request.lockspace.as_bytes()).ok_or_else(|| {
            Rejection::new(0, "unknown_lockspace", format!("no lockspace named {:?}", request.lockspace))
        })?;
        let max = match request.max_resources {
            0 => DUMP_RESOURCES_DEFAULT,
            n => (n as usize).min(DUMP_RESOURCES_MAX),
        };
        let resources = self.node.dump(id, request.name.as_deref(), max).map_err(|e| Rejection::from_engine(0, &e))?;
        let now = self.clock.now();
        let lock = |info: &dlm_core::LockInfo| {
            // An orphan's session is gone (its id may even be reused).
            let state = if info.orphan { None } else { self.sessions.get(&info.session) };
            let peer = state.map(|s| s.peer).unwrap_or_default();
            let known = state.and_then(|s| s.handles.get(&info.handle.0));
            let phase_start = known.and_then(|k| if info.granted.is_some() { k.granted_at } else { k.requested_at });
            let attribution = known
                .and_then(|k| k.mark.as_ref())
                .and_then(|mark| self.evidence.since(state.and_then(SessionState::pid), mark));
            proto::LockInfo {
                session: info.session.0,
                handle: info.handle.0,
                pid: peer.pid.unwrap_or(0),
                uid: peer.uid,
                orphan: info.orphan,
                granted: info.granted.map(convert::mode_to_wire),
                requested: info.requested.map(convert::mode_to_wire),
                fencing_token: info.token.map_or(0, |t| t.0),
                flags: info.flags.bits(),
                phase_ms: phase_start
                    .map_or(0, |at| u64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(u64::MAX)),
                attribution: attribution.as_ref().map(kernel_evidence::to_wire),
            }
        };
        Ok(proto::DumpReply {
            resources: resources
                .iter()
                .map(|r| proto::ResourceInfo {
                    name: r.name.clone(),
                    lvb: r.lvb.clone(),
                    lvb_valid: r.lvb_valid,
                    last_token: r.last_token.0,
                    granted: r.granted.iter().map(lock).collect(),
                    converting: r.converting.iter().map(lock).collect(),
                    waiting: r.waiting.iter().map(lock).collect(),
                })
                .collect(),
        })
    }

    fn create_lockspace(&mut self, name: &str, lvb_len: usize) -> Result<(), Rejection> {
        let lvb_len = if lvb_len == 0 { dlm_core::LVB_LEN_DEFAULT } else { lvb_len };
        let id = self
            .node
            .create_lockspace(name.as_bytes(), LockspaceConfig { lvb_len })
            .map_err(|e| Rejection::from_engine(0, &e))?;
        self.lockspace_names.insert(id, Arc::from(name));
        // A name with a NUL byte cannot be a C string: the probes show it empty.
        let cname = CString::new(name).unwrap_or_default();
        self.lockspace_cnames.insert(id, Arc::from(cname.as_c_str()));
        self.metrics.add_lockspace(name);
        Ok(())
    }

    fn release_lockspace(&mut self, name: &str, force: bool) -> Result<(), Rejection> {
        let id = self
            .node
            .lockspace_id(name.as_bytes())
            .ok_or_else(|| Rejection::new(0, "unknown_lockspace", format!("no lockspace named {name:?}")))?;
        self.node.release_lockspace(self.clock.engine_now(), id, force).map_err(|e| Rejection::from_engine(0, &e))?;
        self.lockspace_names.remove(&id);
        self.lockspace_cnames.remove(&id);
        self.metrics.remove_lockspace(name);
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
