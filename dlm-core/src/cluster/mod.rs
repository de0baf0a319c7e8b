//! A cluster node: the engine of [`crate::Node`] spread over several nodes
//! the way the Linux DLM does it, still sans-IO.
//!
//! - Each resource has a **directory node**, chosen by hashing its lockspace
//!   and name over the members ([`Membership::directory`]). The directory
//!   records which node masters the resource.
//! - The **first node to lock** a resource with no master becomes its master:
//!   a resource used by one node costs no network round trip after the first
//!   lookup, and none at all when that node is also its directory.
//! - The master keeps the **authoritative queues**, in its engine, where
//!   locks of other nodes' clients appear under their own session ids (each
//!   session id carries its node's id). Other nodes send their clients'
//!   requests there and get completions and blocking callbacks back.
//! - The requesting node keeps **its own copy** of each remote lock (master,
//!   mode, token), which is what recovery will rebuild a master from.
//! - A master that has had no lock on a resource for
//!   [`ClusterConfig::release_delay`] drops it and tells the directory.
//!
//! The races are closed as follows. A node that learns from the directory
//! that it is master may receive requests before the directory's answer:
//! it holds them until the answer arrives (it has a lookup outstanding).
//! A node asked to master a resource it released answers "not master"; the
//! requester asks the directory again naming that node as stale, and the
//! directory holds the question until the stale master's `Remove` arrives
//! (links are ordered, so it is on its way). Fencing tokens stay strictly
//! increasing per resource across masters: a `Remove` carries the old
//! master's last token, and the directory hands the largest it saw to the
//! next master (a Lamport clock per lockspace).
//!
//! Deadlocks across nodes: every node with waiting requests reports its
//! wait-for edges to a coordinator (the lowest member id) every
//! [`ClusterConfig::deadlock_interval`]; the coordinator searches the union
//! and asks the master of the victim's wait to fail it, if that wait is
//! still the one reported. Cycles within one master are found at once by its
//! engine.
//!
//! Messages go through a link layer per peer that numbers them, so that
//! the network may delay, reorder and duplicate them, and a broken
//! connection loses nothing once it is back. Every message carries the
//! membership epoch.

mod link;
mod members;
mod message;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use crate::deadlock::{self, Edge, Search, WaitForGraph, WaitRef};
use crate::dump::{LockInfo, LockspaceInfo, ResourceInfo};
use crate::effect::{Completion, Effect, Op, Status};
use crate::flags::{StatusFlags, UnlockFlags};
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::limits::Limit;
use crate::lockspace::LockspaceConfig;
use crate::mode::Mode;
use crate::node::{Node, NodeConfig};
use crate::request::{ClientRequest, ConvertRequest, LockRequest, RequestError, UnlockRequest};
use crate::time::Instant;

use link::Link;
pub use members::{MEMBERS_MAX, Member, Membership, WEIGHT_MAX};
pub use message::{Envelope, NodeId, PeerMessage, RemoteEdge, SESSION_NODE_SHIFT, WAIT_EDGES_MAX};

/// Settings of a cluster node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id; must be a member.
    pub node: NodeId,
    /// The members and the epoch.
    pub membership: Membership,
    /// The engine's settings.
    pub engine: NodeConfig,
    /// How long a master keeps a resource nobody locks before releasing it.
    pub release_delay: Duration,
    /// How often waiting nodes report wait-for edges to the deadlock coordinator.
    pub deadlock_interval: Duration,
    /// How long a received message may wait for an acknowledgement to ride
    /// on a message going back before a bare one is sent.
    pub ack_delay: Duration,
    /// Masters of other nodes remembered at most (a forgotten one costs a lookup).
    pub master_cache_max: usize,
    /// A peer that leaves a message unacknowledged this long counts as
    /// unreachable: its link goes down (and the driver is asked to re-make
    /// the connection), so requests that need it fail instead of hanging.
    pub ack_timeout: Duration,
    /// A link with nothing sent for this long carries a heartbeat, so that a
    /// peer that went away is noticed (by the acknowledgement timeout) even
    /// when no request needs it.
    pub heartbeat_interval: Duration,
}

impl ClusterConfig {
    /// A configuration with default timings.
    #[must_use]
    pub fn new(node: NodeId, membership: Membership) -> ClusterConfig {
        ClusterConfig {
            node,
            membership,
            engine: NodeConfig::default(),
            release_delay: Duration::from_secs(5),
            deadlock_interval: Duration::from_secs(1),
            ack_delay: Duration::from_millis(5),
            master_cache_max: 65_536,
            ack_timeout: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(1),
        }
    }
}

/// Peer input that breaks the protocol: the driver drops the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The sender is not a member (or is this node).
    #[error("{0} is not a peer of this node")]
    NotAPeer(NodeId),
    /// The sender is in another membership epoch.
    #[error("epoch {got}, this node is in epoch {expected}")]
    WrongEpoch {
        /// The sender's.
        got: u64,
        /// Ours.
        expected: u64,
    },
    /// A message about a session of a node other than its sender.
    #[error("{from} spoke for a session of {owner}")]
    ForeignSession {
        /// The sender.
        from: NodeId,
        /// The session's node.
        owner: NodeId,
    },
}

type Key = (LockspaceId, Box<[u8]>);

/// A lock of a local client whose resource is mastered elsewhere: this
/// node's copy.
#[derive(Clone, Debug)]
struct RemoteLock {
    lockspace: LockspaceId,
    name: Box<[u8]>,
    /// `None` while the master is being looked up.
    master: Option<NodeId>,
    /// The directory's generation of that mastership.
    master_generation: u64,
    granted: Option<Mode>,
    /// The mode of the request in flight.
    requested: Mode,
    /// The token of the latest grant.
    token: Option<crate::ids::FencingToken>,
    /// The request in flight.
    pending: Option<Op>,
    /// The new lock's request, kept until it is granted to resend it when a
    /// master turns out stale.
    request: Option<LockRequest>,
    /// The client was told the request failed (its master became
    /// unreachable); whatever the master answers later is undone.
    abandoned: bool,
}

#[derive(Default)]
struct DirEntry {
    master: Option<NodeId>,
    generation: u64,
    /// Lookups held until the stale master's `Remove` arrives.
    held: Vec<NodeId>,
}

struct Mastered {
    /// When the engine freed the resource (no lock left); `None` while in use.
    idle_since: Option<Instant>,
    /// Whether it has an entry in the idle queue.
    queued: bool,
    /// The directory's generation of this mastership.
    generation: u64,
}

/// Counts of what the cluster layer did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Lookups sent to directory nodes.
    pub lookups: u64,
    /// Requests sent to remote masters (lock, convert, unlock, cancel).
    pub remote_requests: u64,
    /// Requests of other nodes' clients handled here as master.
    pub served_requests: u64,
    /// Masterships released after the resource was idle.
    pub released: u64,
    /// "Not master" answers received (stale masters).
    pub stale_masters: u64,
    /// Deadlock victims chosen by this node as coordinator.
    pub deadlock_victims: u64,
    /// Messages sent and received.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
}

/// One node of a cluster: lockspaces, sessions of local clients, the
/// resources mastered here, the directory entries kept here, and links to
/// the other members.
///
/// Drive it like [`Node`] (`handle_client`, `handle_timeout`, `poll_effect`,
/// `poll_timeout`), and also: feed it what peers send
/// ([`ClusterNode::handle_peer`]), transmit what it asks
/// ([`ClusterNode::poll_transmit`]), and tell it when a peer's connection
/// goes down or comes back ([`ClusterNode::handle_link`]). With one member it
/// is exactly a [`Node`].
pub struct ClusterNode {
    engine: Node,
    config: ClusterConfig,
    links: BTreeMap<NodeId, Link>,
    effects: VecDeque<Effect>,
    transmit: VecDeque<(NodeId, Envelope)>,
    /// Peers whose connection the driver should drop and make again.
    resets: Vec<NodeId>,
    remote: HashMap<(SessionId, LockHandle), RemoteLock>,
    remote_per_session: HashMap<SessionId, u32>,
    /// Outstanding lookups, with the local requests waiting for them.
    lookups: HashMap<Key, Vec<(SessionId, LockHandle)>>,
    /// Requests that arrived for a resource this node was about to learn it masters.
    early_requests: HashMap<Key, Vec<(NodeId, PeerMessage)>>,
    mastered: HashMap<Key, Mastered>,
    idle: VecDeque<(Instant, Key)>,
    cache: HashMap<Key, (NodeId, u64)>,
    directory: HashMap<Key, DirEntry>,
    /// The largest fencing token the directory has heard of, per lockspace.
    token_clock: HashMap<LockspaceId, u64>,
    /// Sessions of other nodes' clients open in the engine.
    remote_sessions: HashSet<SessionId>,
    deadlock_due: Option<Instant>,
    /// Whether the last report to the coordinator had edges.
    reported_edges: bool,
    /// The coordinator's latest report from each node.
    edge_reports: BTreeMap<NodeId, Vec<RemoteEdge>>,
    stats: ClusterStats,
    /// The directory's last mastership generation.
    last_generation: u64,
    /// The latest `now` seen, for work done outside an event with a time
    /// of its own (answering lookups held for a stale master).
    last_now: Instant,
}

impl ClusterNode {
    /// A node with no lockspace and no session.
    ///
    /// # Errors
    /// Inconsistent limits, or this node is not a member.
    pub fn new(config: ClusterConfig) -> Result<ClusterNode, String> {
        if !config.membership.contains(config.node) {
            return Err(format!("{} is not among the members", config.node));
        }
        let mut engine = Node::new(config.engine.clone())?;
        let links: BTreeMap<NodeId, Link> =
            config.membership.members().iter().filter(|m| m.id != config.node).map(|m| (m.id, Link::new())).collect();
        engine.track_released(!links.is_empty());
        Ok(ClusterNode {
            engine,
            config,
            links,
            effects: VecDeque::new(),
            transmit: VecDeque::new(),
            resets: Vec::new(),
            remote: HashMap::new(),
            remote_per_session: HashMap::new(),
            lookups: HashMap::new(),
            early_requests: HashMap::new(),
            mastered: HashMap::new(),
            idle: VecDeque::new(),
            cache: HashMap::new(),
            directory: HashMap::new(),
            token_clock: HashMap::new(),
            remote_sessions: HashSet::new(),
            deadlock_due: None,
            reported_edges: false,
            edge_reports: BTreeMap::new(),
            stats: ClusterStats::default(),
            last_now: Instant::ZERO,
            last_generation: 0,
        })
    }

    /// This node's id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        self.config.node
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The engine (the queues of the resources mastered here).
    #[must_use]
    pub fn engine(&self) -> &Node {
        &self.engine
    }

    /// What the cluster layer did so far.
    #[must_use]
    pub fn stats(&self) -> ClusterStats {
        self.stats
    }

    /// Resources mastered here (in use or idle).
    #[must_use]
    pub fn mastered_count(&self) -> usize {
        self.mastered.len()
    }

    /// Directory entries kept here.
    #[must_use]
    pub fn directory_count(&self) -> usize {
        self.directory.len()
    }

    /// Locks of local clients mastered on other nodes.
    #[must_use]
    pub fn remote_lock_count(&self) -> usize {
        self.remote.len()
    }

    /// The node mastering a local client's lock, when it is another node.
    #[must_use]
    pub fn remote_master(&self, session: SessionId, handle: LockHandle) -> Option<NodeId> {
        self.remote.get(&(session, handle)).and_then(|l| l.master)
    }

    /// The other members, by id.
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.links.keys().copied()
    }

    /// Whether the link to a peer is up, and how many messages to it await acknowledgement.
    #[must_use]
    pub fn link_state(&self, peer: NodeId) -> Option<(bool, usize)> {
        self.links.get(&peer).map(|l| (l.up, l.unacked()))
    }

    fn single(&self) -> bool {
        self.links.is_empty()
    }

    // ----- lockspaces and sessions (local) -----

    /// Creates a lockspace (every member must create the same ones).
    ///
    /// # Errors
    /// As [`Node::create_lockspace`].
    pub fn create_lockspace(&mut self, name: &[u8], config: LockspaceConfig) -> Result<LockspaceId, RequestError> {
        self.engine.create_lockspace(name, config)
    }

    /// The id of the lockspace with this name.
    #[must_use]
    pub fn lockspace_id(&self, name: &[u8]) -> Option<LockspaceId> {
        self.engine.lockspace_id(name)
    }

    /// Releases a lockspace (see [`Node::release_lockspace`]). In a cluster
    /// only a lockspace with no lock of this node's clients anywhere.
    ///
    /// # Errors
    /// As [`Node::release_lockspace`]; `LockspaceBusy` while local clients hold remote locks in it.
    pub fn release_lockspace(&mut self, id: LockspaceId, force: bool) -> Result<(), RequestError> {
        // Its remote locks, the resources it masters (even idle) and its
        // directory entries are the cluster's: until recovery can move them,
        // a lockspace that has any is not released here.
        let remote = self.remote.values().filter(|l| l.lockspace == id).count()
            + self.mastered.keys().filter(|k| k.0 == id).count()
            + self.directory.keys().filter(|k| k.0 == id).count();
        if remote > 0 {
            return Err(RequestError::LockspaceBusy { locks: u32::try_from(remote).unwrap_or(u32::MAX) });
        }
        self.engine.release_lockspace(id, force)?;
        self.mastered.retain(|key, _| key.0 != id);
        self.cache.retain(|key, _| key.0 != id);
        self.directory.retain(|key, _| key.0 != id);
        self.pump(Instant::ZERO);
        Ok(())
    }

    /// Opens a session of a local client. Its id must carry this node's id
    /// ([`NodeId::session`]) when the cluster has other members.
    ///
    /// # Errors
    /// As [`Node::open_session`]; `InvalidFlags` for a session id of another node.
    pub fn open_session(&mut self, session: SessionId) -> Result<(), RequestError> {
        if !self.single() && NodeId::of_session(session) != self.config.node {
            return Err(RequestError::InvalidFlags("a session id must carry this node's id"));
        }
        self.engine.open_session(session)
    }

    /// Ends a local client's session, here and on every master holding its locks.
    ///
    /// # Errors
    /// Unknown session.
    pub fn end_session(&mut self, now: Instant, session: SessionId) -> Result<(), RequestError> {
        self.last_now = self.last_now.max(now);
        self.engine.end_session(now, session)?;
        if self.remote_per_session.remove(&session).is_some() {
            let handles: Vec<LockHandle> = self.remote.keys().filter(|(s, _)| *s == session).map(|&(_, h)| h).collect();
            let mut masters: Vec<NodeId> = Vec::new();
            for handle in handles {
                if let Some(lock) = self.remote.remove(&(session, handle))
                    && let Some(master) = lock.master
                    && !masters.contains(&master)
                {
                    masters.push(master);
                }
            }
            masters.sort_unstable();
            for master in masters {
                self.send(master, PeerMessage::EndSession { session });
            }
        }
        self.pump(now);
        Ok(())
    }

    /// How many sessions are open (local clients' and other nodes' with locks here).
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.engine.session_count()
    }

    // ----- client requests -----

    /// A request from a local client. Accepted requests end in exactly one
    /// completion (unless the session ends first); in a cluster it may say
    /// [`Status::Unavailable`] (a node it needs is unreachable) or
    /// [`Status::Rejected`] (the remote master refused it).
    ///
    /// # Errors
    /// The request was rejected here and changed nothing.
    pub fn handle_client(
        &mut self,
        now: Instant,
        session: SessionId,
        request: ClientRequest,
    ) -> Result<(), RequestError> {
        self.last_now = self.last_now.max(now);
        if self.single() {
            let result = self.engine.handle_client(now, session, request);
            self.pump(now);
            return result;
        }
        if !self.engine.has_session(session) || self.remote_sessions.contains(&session) {
            return Err(RequestError::UnknownSession);
        }
        let result = match request {
            ClientRequest::Lock(req) => self.client_lock(now, session, req),
            ClientRequest::Convert(req) => match self.remote.get(&(session, req.handle)) {
                Some(lock) => self.remote_convert(session, lock.clone(), req),
                None => self.engine.handle_client(now, session, ClientRequest::Convert(req)),
            },
            ClientRequest::Unlock(req) => match self.remote.get(&(session, req.handle)) {
                Some(lock) => self.remote_unlock(session, lock.clone(), req),
                None => self.engine.handle_client(now, session, ClientRequest::Unlock(req)),
            },
            ClientRequest::Cancel { handle } => match self.remote.get(&(session, handle)) {
                Some(lock) => self.remote_cancel(session, handle, lock.clone()),
                None => self.engine.handle_client(now, session, ClientRequest::Cancel { handle }),
            },
        };
        self.pump(now);
        result
    }

    fn client_lock(&mut self, now: Instant, session: SessionId, req: LockRequest) -> Result<(), RequestError> {
        if self.remote.contains_key(&(session, req.handle)) || self.engine.lock_info(session, req.handle).is_some() {
            return Err(RequestError::HandleInUse);
        }
        let held = self.engine.session_lock_count(session)
            + self.remote_per_session.get(&session).copied().unwrap_or(0) as usize;
        if held >= self.config.engine.limits.locks_per_session_max as usize {
            return Err(RequestError::LimitExceeded(Limit::LocksPerSession));
        }
        self.engine.validate_lock(&req)?;
        let key: Key = (req.lockspace, req.name.clone().into_boxed_slice());
        if let Some(mastered) = self.mastered.get_mut(&key) {
            mastered.idle_since = None;
            return self.lock_here(now, session, req);
        }
        let directory = self.directory_of(&key);
        if directory == self.config.node {
            let entry = self.directory.entry(key.clone()).or_default();
            match entry.master {
                None => {
                    self.last_generation += 1;
                    let generation = self.last_generation;
                    entry.master = Some(self.config.node);
                    entry.generation = generation;
                    self.become_master(key, generation);
                    return self.lock_here(now, session, req);
                }
                Some(master) if master == self.config.node => {
                    // Not reached: an entry naming this node goes with a
                    // mastered resource. Serve it rather than trust that.
                    let generation = entry.generation;
                    self.become_master(key, generation);
                    return self.lock_here(now, session, req);
                }
                Some(master) => {
                    let generation = entry.generation;
                    self.cache_master(key.clone(), (master, generation));
                }
            }
        }
        let handle = req.handle;
        let copy = RemoteLock {
            lockspace: req.lockspace,
            name: key.1.clone(),
            master: None,
            master_generation: 0,
            granted: None,
            requested: req.mode,
            token: None,
            pending: Some(Op::Lock),
            request: Some(req),
            abandoned: false,
        };
        match self.cache.get(&key).copied() {
            Some(master) if self.is_up(master.0) => {
                self.insert_remote(session, handle, copy);
                self.send_request(session, handle, master);
            }
            Some(_) => self.fail_unavailable(session, handle),
            None if !self.is_up(directory) => self.fail_unavailable(session, handle),
            None => {
                self.insert_remote(session, handle, copy);
                self.start_lookup(key, session, handle, None);
            }
        }
        Ok(())
    }

    /// Runs a lock request on the engine, for a resource mastered here.
    fn lock_here(&mut self, now: Instant, session: SessionId, req: LockRequest) -> Result<(), RequestError> {
        let key: Key = (req.lockspace, req.name.clone().into_boxed_slice());
        let result = self.engine.handle_client(now, session, ClientRequest::Lock(req));
        if result.is_err() && !self.engine.resource_exists(key.0, &key.1) {
            self.mark_idle(now, key);
        }
        result
    }

    fn insert_remote(&mut self, session: SessionId, handle: LockHandle, copy: RemoteLock) {
        self.remote.insert((session, handle), copy);
        *self.remote_per_session.entry(session).or_default() += 1;
    }

    fn remove_remote(&mut self, session: SessionId, handle: LockHandle) -> Option<RemoteLock> {
        let lock = self.remote.remove(&(session, handle))?;
        if let Some(count) = self.remote_per_session.get_mut(&session) {
            *count -= 1;
            if *count == 0 {
                self.remote_per_session.remove(&session);
            }
        }
        Some(lock)
    }

    fn fail_unavailable(&mut self, session: SessionId, handle: LockHandle) {
        self.effects.push_back(Effect::Complete(ended(session, handle, Op::Lock, Status::Unavailable, None)));
    }

    fn start_lookup(&mut self, key: Key, session: SessionId, handle: LockHandle, stale: Option<(NodeId, u64)>) {
        if let Some(waiting) = self.lookups.get_mut(&key) {
            waiting.push((session, handle));
            return;
        }
        self.lookups.insert(key.clone(), vec![(session, handle)]);
        let directory = self.directory_of(&key);
        let lockspace = self.lockspace_name(key.0);
        self.stats.lookups += 1;
        self.send(directory, PeerMessage::Lookup { lockspace, name: key.1.to_vec(), stale });
    }

    /// Whether the local lock `(session, handle)` is a new lock of `key`
    /// waiting for its master to be looked up. The handle may have been
    /// reused for another lock since the lookup went out (the first one
    /// cancelled meanwhile): the answer is then not for it.
    fn awaits_lookup(&self, session: SessionId, handle: LockHandle, key: &Key) -> bool {
        self.remote.get(&(session, handle)).is_some_and(|l| {
            l.master.is_none()
                && l.pending == Some(Op::Lock)
                && l.request.is_some()
                && l.lockspace == key.0
                && l.name == key.1
        })
    }

    fn send_request(&mut self, session: SessionId, handle: LockHandle, (master, generation): (NodeId, u64)) {
        let Some(lock) = self.remote.get_mut(&(session, handle)) else { return };
        let Some(req) = lock.request.clone() else { return };
        lock.master = Some(master);
        lock.master_generation = generation;
        let lockspace = self.lockspace_name(req.lockspace);
        self.stats.remote_requests += 1;
        self.send(
            master,
            PeerMessage::Request {
                lockspace,
                session,
                handle,
                name: req.name,
                mode: req.mode,
                flags: req.flags,
                timeout: req.timeout,
            },
        );
    }

    fn remote_convert(
        &mut self,
        session: SessionId,
        lock: RemoteLock,
        req: ConvertRequest,
    ) -> Result<(), RequestError> {
        // A copy with nothing pending is granted and has a master; a copy
        // that is not (which would be a bug) is treated as busy, not trusted.
        let (None, Some(from), Some(master)) = (lock.pending, lock.granted, lock.master) else {
            return Err(RequestError::Pending);
        };
        self.engine.validate_convert(lock.lockspace, from, &req)?;
        if !self.is_up(master) {
            self.effects.push_back(Effect::Complete(ended(
                session,
                req.handle,
                Op::Convert,
                Status::Unavailable,
                Some(from),
            )));
            return Ok(());
        }
        if let Some(copy) = self.remote.get_mut(&(session, req.handle)) {
            copy.pending = Some(Op::Convert);
            copy.requested = req.mode;
        }
        self.stats.remote_requests += 1;
        let ConvertRequest { handle, mode, flags, lvb, timeout } = req;
        self.send(master, PeerMessage::Convert { session, handle, mode, flags, lvb, timeout });
        Ok(())
    }

    fn remote_unlock(&mut self, session: SessionId, lock: RemoteLock, req: UnlockRequest) -> Result<(), RequestError> {
        if lock.abandoned {
            // The client was told this lock failed; it is being undone.
            return Err(RequestError::UnknownHandle);
        }
        let force = req.flags.contains(UnlockFlags::FORCE);
        if lock.pending.is_some() && !force {
            return Err(RequestError::Pending);
        }
        self.engine.validate_unlock(lock.lockspace, &req)?;
        let Some(master) = lock.master else {
            // A new lock still looking for its master: nothing exists remotely.
            self.remove_remote(session, req.handle);
            for (op, status) in [(Op::Lock, Status::Cancelled), (Op::Unlock, Status::Unlocked)] {
                self.effects.push_back(Effect::Complete(ended(session, req.handle, op, status, None)));
            }
            return Ok(());
        };
        if let Some(copy) = self.remote.get_mut(&(session, req.handle)) {
            copy.pending = Some(Op::Unlock);
        }
        self.stats.remote_requests += 1;
        let UnlockRequest { handle, flags, lvb } = req;
        self.send(master, PeerMessage::Unlock { session, handle, flags, lvb });
        Ok(())
    }

    fn remote_cancel(&mut self, session: SessionId, handle: LockHandle, lock: RemoteLock) -> Result<(), RequestError> {
        if lock.abandoned {
            return Err(RequestError::UnknownHandle);
        }
        if lock.pending.is_none() {
            return Err(RequestError::NotPending);
        }
        match lock.master {
            None => {
                self.remove_remote(session, handle);
                self.effects.push_back(Effect::Complete(ended(session, handle, Op::Lock, Status::Cancelled, None)));
            }
            Some(master) => {
                self.stats.remote_requests += 1;
                self.send(master, PeerMessage::Cancel { session, handle });
            }
        }
        Ok(())
    }

    // ----- time -----

    /// Time has passed: request timeouts, idle masterships, acknowledgements,
    /// deadlock reports.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        self.engine.handle_timeout(now);
        self.pump(now);
        if self.single() {
            return;
        }
        self.release_idle(now);
        let epoch = self.config.membership.epoch;
        let ack_timeout = self.config.ack_timeout;
        let mut silent = Vec::new();
        for (&peer, link) in &mut self.links {
            if link.up && link.ack_due.is_some_and(|at| at <= now) {
                self.transmit.push_back((peer, link.ack(epoch)));
            }
            if link.up && link.unacked_since.is_some_and(|since| since.saturating_add(ack_timeout) <= now) {
                silent.push(peer);
            }
        }
        for peer in silent {
            self.handle_link(now, peer, false);
            self.resets.push(peer);
        }
        let heartbeat = self.config.heartbeat_interval;
        let quiet: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(_, l)| l.up && l.unacked_since.is_none() && l.last_sent.saturating_add(heartbeat) <= now)
            .map(|(&peer, _)| peer)
            .collect();
        for peer in quiet {
            self.send(peer, PeerMessage::Heartbeat);
        }
        if self.deadlock_due.is_some_and(|at| at <= now) {
            self.deadlock_due = None;
            self.report_wait_edges(now);
        }
        self.schedule_deadlock_report(now);
        self.pump(now);
    }

    /// When [`ClusterNode::handle_timeout`] should be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let engine = self.engine.poll_timeout();
        let idle = self.idle.front().map(|(at, _)| at.saturating_add(self.config.release_delay));
        let acks = self.links.values().filter(|l| l.up).filter_map(|l| l.ack_due).min();
        let silence = self
            .links
            .values()
            .filter(|l| l.up)
            .filter_map(|l| l.unacked_since)
            .min()
            .map(|since| since.saturating_add(self.config.ack_timeout));
        let heartbeat = self
            .links
            .values()
            .filter(|l| l.up && l.unacked_since.is_none())
            .map(|l| l.last_sent.saturating_add(self.config.heartbeat_interval))
            .min();
        [engine, idle, acks, silence, heartbeat, self.deadlock_due].into_iter().flatten().min()
    }

    /// The next effect for a local client, oldest first.
    #[must_use]
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// A peer whose connection should be dropped and made again (it left
    /// messages unacknowledged past [`ClusterConfig::ack_timeout`]; its link
    /// is down until [`ClusterNode::handle_link`] says it is up again).
    #[must_use]
    pub fn poll_reset(&mut self) -> Option<NodeId> {
        self.resets.pop()
    }

    /// The next envelope to send, and to which peer.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Envelope)> {
        self.transmit.pop_front()
    }

    /// The connection to `peer` went down (`up == false`) or is back. While
    /// down, requests that need the peer fail with [`Status::Unavailable`];
    /// those already sent to it fail the same way, and what the peer makes of
    /// them later is undone. Back up, everything it has not acknowledged is sent again.
    pub fn handle_link(&mut self, now: Instant, peer: NodeId, up: bool) {
        self.last_now = self.last_now.max(now);
        let epoch = self.config.membership.epoch;
        let Some(link) = self.links.get_mut(&peer) else { return };
        if link.up == up {
            return;
        }
        link.up = up;
        if up {
            for envelope in link.resend(now, epoch) {
                self.transmit.push_back((peer, envelope));
            }
            return;
        }
        self.transmit.retain(|(to, _)| *to != peer);
        let mut stranded: Vec<(SessionId, LockHandle)> = self
            .remote
            .iter()
            .filter(|(_, l)| l.pending == Some(Op::Lock) && !l.abandoned && l.master == Some(peer))
            .map(|(&k, _)| k)
            .collect();
        // Requests waiting for a lookup from the peer as directory fail; the
        // lookup itself stays outstanding (its answer, when the peer is
        // back, may make this node master, which it must then take).
        let mut lookups: Vec<Key> = self.lookups.keys().filter(|k| self.directory_of(k) == peer).cloned().collect();
        // In key order: the failures reach the clients in an order that does
        // not depend on the hash map's (randomly seeded) layout.
        lookups.sort_unstable();
        for key in lookups {
            let waiters = self.lookups.get_mut(&key).map(std::mem::take).unwrap_or_default();
            for waiting in waiters {
                if self.remote.get(&waiting).is_some_and(|l| l.master.is_none()) {
                    self.remove_remote(waiting.0, waiting.1);
                    self.fail_unavailable(waiting.0, waiting.1);
                }
            }
        }
        stranded.sort_unstable();
        for (session, handle) in stranded {
            let Some(lock) = self.remote.get_mut(&(session, handle)) else { continue };
            lock.abandoned = true;
            self.fail_unavailable(session, handle);
        }
        self.cache.retain(|_, master| master.0 != peer);
        self.pump(now);
    }

    // ----- peer messages -----

    /// An envelope from a peer.
    ///
    /// # Errors
    /// The peer broke the protocol; drop its connection. Nothing was changed
    /// by the offending message.
    pub fn handle_peer(&mut self, now: Instant, from: NodeId, envelope: Envelope) -> Result<(), PeerError> {
        self.last_now = self.last_now.max(now);
        let expected = self.config.membership.epoch;
        if envelope.epoch != expected {
            return Err(PeerError::WrongEpoch { got: envelope.epoch, expected });
        }
        if let Some(message) = &envelope.message {
            check_sessions(from, message)?;
        }
        let ack_delay = self.config.ack_delay;
        let link = self.links.get_mut(&from).ok_or(PeerError::NotAPeer(from))?;
        let delivered = link.receive(now, ack_delay, envelope);
        for message in delivered {
            self.stats.messages_received += 1;
            self.on_message(now, from, message);
            self.pump(now);
        }
        self.schedule_deadlock_report(now);
        Ok(())
    }

    fn on_message(&mut self, now: Instant, from: NodeId, message: PeerMessage) {
        match message {
            PeerMessage::Lookup { lockspace, name, stale } => self.on_lookup(from, lockspace, name, stale),
            PeerMessage::LookupReply { lockspace, name, master, generation, token_floor } => {
                // Only the directory of a resource answers for it.
                if self.config.membership.directory(&lockspace, &name) == from {
                    self.on_lookup_reply(now, lockspace, name, master.map(|m| (m, generation)), token_floor);
                }
            }
            PeerMessage::Remove { lockspace, name, generation, token_floor } => {
                self.on_remove(from, &lockspace, name, generation, token_floor);
            }
            request @ PeerMessage::Request { .. } => self.on_request(now, from, request),
            PeerMessage::Convert { session, handle, mode, flags, lvb, timeout } => {
                self.stats.served_requests += 1;
                let request = ClientRequest::Convert(ConvertRequest { handle, mode, flags, lvb, timeout });
                if self.engine.handle_client(now, session, request).is_err() {
                    self.reject_remote(from, session, handle, Op::Convert);
                }
            }
            PeerMessage::Unlock { session, handle, flags, lvb } => {
                self.stats.served_requests += 1;
                if self.drop_held_request(from, session, handle, true) {
                    return;
                }
                let request = ClientRequest::Unlock(UnlockRequest { handle, flags, lvb });
                if self.engine.handle_client(now, session, request).is_err() {
                    self.reject_remote(from, session, handle, Op::Unlock);
                }
            }
            PeerMessage::Cancel { session, handle } => {
                self.stats.served_requests += 1;
                if self.drop_held_request(from, session, handle, false) {
                    return;
                }
                // Too late to cancel (already granted or ended) is no error:
                // the completion is on its way.
                let _ = self.engine.handle_client(now, session, ClientRequest::Cancel { handle });
            }
            PeerMessage::NotMaster { session, handle } => self.on_not_master(from, session, handle),
            PeerMessage::Complete(completion) => self.on_complete(from, completion),
            PeerMessage::Blocking { session, handle, mode } => {
                if self.remote.get(&(session, handle)).is_some_and(|l| !l.abandoned && l.master == Some(from)) {
                    self.effects.push_back(Effect::Blocking { session, handle, mode });
                }
            }
            PeerMessage::EndSession { session } => {
                if self.remote_sessions.remove(&session) {
                    let _ = self.engine.end_session(now, session);
                }
                // Its requests held until this node hears it masters their
                // resource die with it, or they would be granted to no one.
                for held in self.early_requests.values_mut() {
                    held.retain(
                        |(_, request)| !matches!(request, PeerMessage::Request { session: s, .. } if *s == session),
                    );
                }
            }
            PeerMessage::WaitEdges { mut edges } => {
                edges.truncate(WAIT_EDGES_MAX);
                if edges.is_empty() {
                    self.edge_reports.remove(&from);
                } else {
                    self.edge_reports.insert(from, edges);
                    self.find_deadlocks();
                }
            }
            PeerMessage::AbortWait { wait } => {
                self.engine.abort_wait(now, wait);
            }
            // Its acknowledgement is the point.
            PeerMessage::Heartbeat => {}
        }
    }

    fn on_lookup(&mut self, from: NodeId, lockspace: Vec<u8>, name: Vec<u8>, stale: Option<(NodeId, u64)>) {
        let Some(id) = self.engine.lockspace_id(&lockspace) else {
            self.send(from, PeerMessage::LookupReply { lockspace, name, master: None, generation: 0, token_floor: 0 });
            return;
        };
        let key: Key = (id, name.into_boxed_slice());
        let floor = self.token_floor(id);
        let next_generation = self.last_generation + 1;
        let entry = self.directory.entry(key.clone()).or_default();
        let (master, generation) = match entry.master {
            Some(master) if stale == Some((master, entry.generation)) && master != self.config.node => {
                // The named master released it; its Remove is on the way.
                entry.held.push(from);
                return;
            }
            Some(master) => (master, entry.generation),
            None => {
                self.last_generation = next_generation;
                entry.master = Some(from);
                entry.generation = next_generation;
                (from, next_generation)
            }
        };
        let name = key.1.to_vec();
        self.send(
            from,
            PeerMessage::LookupReply { lockspace, name, master: Some(master), generation, token_floor: floor },
        );
    }

    fn on_remove(&mut self, from: NodeId, lockspace: &[u8], name: Vec<u8>, generation: u64, token_floor: u64) {
        let Some(id) = self.engine.lockspace_id(lockspace) else { return };
        let clock = self.token_clock.entry(id).or_default();
        *clock = (*clock).max(token_floor);
        let key: Key = (id, name.into_boxed_slice());
        let Some(entry) = self.directory.get_mut(&key) else { return };
        if entry.master != Some(from) || entry.generation != generation {
            return;
        }
        let held = std::mem::take(&mut entry.held);
        self.directory.remove(&key);
        self.answer_held(key, held);
    }

    /// Answers lookups held for a stale master, once its entry is gone: the
    /// first asker becomes master.
    fn answer_held(&mut self, key: Key, held: Vec<NodeId>) {
        let Some(&first) = held.first() else { return };
        let lockspace = self.lockspace_name(key.0);
        let floor = self.token_floor(key.0);
        self.last_generation += 1;
        let generation = self.last_generation;
        self.directory.insert(key.clone(), DirEntry { master: Some(first), generation, held: Vec::new() });
        for asker in held {
            if asker == self.config.node {
                self.on_lookup_reply(
                    self.last_now,
                    lockspace.clone(),
                    key.1.to_vec(),
                    Some((first, generation)),
                    floor,
                );
                continue;
            }
            let (lockspace, name) = (lockspace.clone(), key.1.to_vec());
            self.send(
                asker,
                PeerMessage::LookupReply { lockspace, name, master: Some(first), generation, token_floor: floor },
            );
        }
    }

    fn on_lookup_reply(
        &mut self,
        now: Instant,
        lockspace: Vec<u8>,
        name: Vec<u8>,
        master: Option<(NodeId, u64)>,
        floor: u64,
    ) {
        let Some(id) = self.engine.lockspace_id(&lockspace) else { return };
        let key: Key = (id, name.into_boxed_slice());
        // Each lookup has one answer, in order: an answer with no lookup
        // outstanding is not ours to act on.
        let Some(waiting) = self.lookups.remove(&key) else { return };
        match master {
            Some((master, generation)) if master == self.config.node => {
                // The directory recorded this node as master: take it even
                // if nobody waits any more (it is released when idle).
                self.engine.raise_token_floor(id, floor);
                self.become_master(key.clone(), generation);
                for (session, handle) in waiting {
                    if !self.awaits_lookup(session, handle, &key) {
                        continue;
                    }
                    let Some(RemoteLock { request: Some(request), .. }) = self.remove_remote(session, handle) else {
                        continue;
                    };
                    if self.lock_here(now, session, request).is_err() {
                        self.complete_rejected(session, handle);
                    }
                }
                for (from, request) in self.early_requests.remove(&key).unwrap_or_default() {
                    self.on_request(now, from, request);
                }
                if !self.engine.resource_exists(id, &key.1) {
                    self.mark_idle(now, key);
                }
            }
            Some(master) => {
                self.cache_master(key.clone(), master);
                for (session, handle) in waiting {
                    if self.awaits_lookup(session, handle, &key) {
                        self.send_request(session, handle, master);
                    }
                }
                for (from, request) in self.early_requests.remove(&key).unwrap_or_default() {
                    if let PeerMessage::Request { session, handle, .. } = request {
                        self.send(from, PeerMessage::NotMaster { session, handle });
                    }
                }
            }
            None => {
                for (session, handle) in waiting {
                    if self.awaits_lookup(session, handle, &key) {
                        self.remove_remote(session, handle);
                        self.complete_rejected(session, handle);
                    }
                }
                // Requests held for it go back to their nodes, which ask
                // the directory themselves.
                for (from, request) in self.early_requests.remove(&key).unwrap_or_default() {
                    if let PeerMessage::Request { session, handle, .. } = request {
                        self.send(from, PeerMessage::NotMaster { session, handle });
                    }
                }
            }
        }
    }

    fn on_request(&mut self, now: Instant, from: NodeId, request: PeerMessage) {
        let PeerMessage::Request { lockspace, session, handle, name, mode, flags, timeout } = request else {
            return;
        };
        let Some(id) = self.engine.lockspace_id(&lockspace) else {
            self.reject_remote(from, session, handle, Op::Lock);
            return;
        };
        let key: Key = (id, name.into_boxed_slice());
        if self.lookups.contains_key(&key) && !self.mastered.contains_key(&key) {
            let request =
                PeerMessage::Request { lockspace, session, handle, name: key.1.to_vec(), mode, flags, timeout };
            self.early_requests.entry(key).or_default().push((from, request));
            return;
        }
        let Some(mastered) = self.mastered.get_mut(&key) else {
            self.send(from, PeerMessage::NotMaster { session, handle });
            return;
        };
        mastered.idle_since = None;
        self.stats.served_requests += 1;
        if !self.remote_sessions.contains(&session) {
            if self.engine.open_session(session).is_err() {
                self.reject_remote(from, session, handle, Op::Lock);
                return;
            }
            self.remote_sessions.insert(session);
        }
        let request = LockRequest { handle, lockspace: id, name: key.1.into_vec(), mode, flags, timeout };
        if self.engine.handle_client(now, session, ClientRequest::Lock(request)).is_err() {
            self.reject_remote(from, session, handle, Op::Lock);
        }
    }

    /// A request this node holds (it is about to learn that it masters the
    /// resource) that its client cancels or force-unlocks: it ends here, as
    /// the engine would end a pending new lock, and is never granted.
    fn drop_held_request(&mut self, from: NodeId, session: SessionId, handle: LockHandle, unlock: bool) -> bool {
        let mut found = false;
        for held in self.early_requests.values_mut() {
            held.retain(|(_, request)| {
                let this = matches!(request, PeerMessage::Request { session: s, handle: h, .. } if *s == session && *h == handle);
                found |= this;
                !this
            });
        }
        if found {
            self.send(from, PeerMessage::Complete(ended(session, handle, Op::Lock, Status::Cancelled, None)));
            if unlock {
                self.send(from, PeerMessage::Complete(ended(session, handle, Op::Unlock, Status::Unlocked, None)));
            }
        }
        found
    }

    fn on_not_master(&mut self, from: NodeId, session: SessionId, handle: LockHandle) {
        let Some(lock) = self.remote.get_mut(&(session, handle)) else { return };
        if lock.master != Some(from) || lock.pending != Some(Op::Lock) {
            return;
        }
        self.stats.stale_masters += 1;
        let stale = (from, lock.master_generation);
        lock.master = None;
        let key: Key = (lock.lockspace, lock.name.clone());
        if lock.abandoned {
            self.remove_remote(session, handle);
            return;
        }
        if self.cache.get(&key) == Some(&stale) {
            self.cache.remove(&key);
        }
        if self.mastered.contains_key(&key) {
            // This node took mastership meanwhile.
            self.run_here(session, handle);
            return;
        }
        if let Some(waiting) = self.lookups.get_mut(&key) {
            // A lookup is out already: its answer serves this request too.
            waiting.push((session, handle));
            return;
        }
        if self.directory_of(&key) != self.config.node {
            self.start_lookup(key, session, handle, Some(stale));
            return;
        }
        // This node is the directory. An entry still naming the stale
        // mastership goes when its node's Remove arrives, which answers the
        // lookups held meanwhile.
        let next_generation = self.last_generation + 1;
        let entry = self.directory.entry(key.clone()).or_default();
        if entry.master.is_some_and(|m| (m, entry.generation) == stale) {
            entry.held.push(self.config.node);
            self.lookups.entry(key).or_default().push((session, handle));
            return;
        }
        if entry.master.is_none() {
            self.last_generation = next_generation;
            entry.master = Some(self.config.node);
            entry.generation = next_generation;
        }
        let master = (entry.master.expect("set above"), entry.generation);
        if master.0 == self.config.node {
            self.become_master(key, master.1);
            self.run_here(session, handle);
        } else {
            self.cache_master(key, master);
            self.send_request(session, handle, master);
        }
    }

    /// Runs a local client's new lock, so far meant for a remote master, on
    /// the engine (this node masters its resource now).
    fn run_here(&mut self, session: SessionId, handle: LockHandle) {
        let Some(RemoteLock { request: Some(request), .. }) = self.remove_remote(session, handle) else { return };
        if self.lock_here(self.last_now, session, request).is_err() {
            self.complete_rejected(session, handle);
        }
    }

    fn on_complete(&mut self, from: NodeId, completion: Completion) {
        let key = (completion.session, completion.handle);
        let Some(lock) = self.remote.get_mut(&key) else { return };
        if lock.master != Some(from) {
            return;
        }
        if completion.op == Op::Unlock
            && completion.status == Status::Rejected
            && lock.granted.is_none()
            && lock.pending == Some(Op::Unlock)
        {
            // A forced unlock of a new lock reached a node that never had
            // it (a stale master: its "not master" came first and was left
            // for this). The request exists nowhere: both end here.
            let abandoned = lock.abandoned;
            self.remove_remote(completion.session, completion.handle);
            if !abandoned {
                for (op, status) in [(Op::Lock, Status::Cancelled), (Op::Unlock, Status::Unlocked)] {
                    let done = ended(completion.session, completion.handle, op, status, None);
                    self.effects.push_back(Effect::Complete(done));
                }
            }
            return;
        }
        // A forced unlock of a pending request ends that request first,
        // then the lock: keep the copy for the second completion.
        let unlock_follows = lock.pending == Some(Op::Unlock) && completion.op != Op::Unlock;
        if !unlock_follows {
            lock.pending = None;
        }
        if completion.mode.is_some() {
            lock.granted = completion.mode;
        }
        if completion.status == Status::Granted {
            lock.request = None;
            lock.token = completion.token;
        }
        let gone = completion.mode.is_none() && !unlock_follows;
        let abandoned = lock.abandoned;
        if gone {
            self.remove_remote(completion.session, completion.handle);
        }
        if abandoned {
            // The client was told this request failed: undo what the master did.
            if completion.status == Status::Granted {
                if let Some(lock) = self.remote.get_mut(&key) {
                    lock.pending = Some(Op::Unlock);
                }
                self.send(
                    from,
                    PeerMessage::Unlock {
                        session: completion.session,
                        handle: completion.handle,
                        flags: UnlockFlags::FORCE,
                        lvb: None,
                    },
                );
            }
            return;
        }
        self.effects.push_back(Effect::Complete(completion));
    }

    // ----- helpers -----

    /// A local client's request refused (by a master, or for want of the
    /// lockspace there). The reason does not travel: the status says refused.
    fn complete_rejected(&mut self, session: SessionId, handle: LockHandle) {
        self.effects.push_back(Effect::Complete(ended(session, handle, Op::Lock, Status::Rejected, None)));
    }

    /// Tells a remote client's node that its request was refused here.
    fn reject_remote(&mut self, to: NodeId, session: SessionId, handle: LockHandle, op: Op) {
        let mode = self.engine.lock_info(session, handle).and_then(|info| info.granted);
        let mode = if op == Op::Lock { None } else { mode };
        self.send(to, PeerMessage::Complete(ended(session, handle, op, Status::Rejected, mode)));
        self.close_if_empty(session);
    }

    fn close_if_empty(&mut self, session: SessionId) {
        if self.remote_sessions.contains(&session) && self.engine.session_lock_count(session) == 0 {
            self.remote_sessions.remove(&session);
            let _ = self.engine.end_session(self.last_now, session);
        }
    }

    fn directory_of(&self, key: &Key) -> NodeId {
        let lockspace = self.engine.lockspace_name(key.0).unwrap_or_default();
        self.config.membership.directory(lockspace, &key.1)
    }

    fn lockspace_name(&self, id: LockspaceId) -> Vec<u8> {
        self.engine.lockspace_name(id).unwrap_or_default().to_vec()
    }

    fn token_floor(&self, id: LockspaceId) -> u64 {
        let own = self.engine.last_token(id).unwrap_or(0);
        own.max(self.token_clock.get(&id).copied().unwrap_or(0))
    }

    fn is_up(&self, node: NodeId) -> bool {
        node == self.config.node || self.links.get(&node).is_some_and(|l| l.up)
    }

    fn cache_master(&mut self, key: Key, master: (NodeId, u64)) {
        if self.cache.len() >= self.config.master_cache_max && !self.cache.contains_key(&key) {
            // The cache is advisory (a request to a stale master is
            // redirected): forgetting everything is always safe.
            self.cache.clear();
        }
        self.cache.insert(key, master);
    }

    fn send(&mut self, to: NodeId, message: PeerMessage) {
        let epoch = self.config.membership.epoch;
        let Some(link) = self.links.get_mut(&to) else { return };
        self.stats.messages_sent += 1;
        if let Some(envelope) = link.send(self.last_now, epoch, message) {
            self.transmit.push_back((to, envelope));
        }
    }

    /// Routes the engine's effects: to local clients, or as messages to the
    /// nodes of remote ones; and notes resources the engine freed.
    fn pump(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        let mut touched_remote: Vec<SessionId> = Vec::new();
        while let Some(effect) = self.engine.poll_effect() {
            let session = match &effect {
                Effect::Complete(c) => c.session,
                Effect::Blocking { session, .. } | Effect::Revoked { session, .. } => *session,
            };
            if !self.remote_sessions.contains(&session) {
                self.effects.push_back(effect);
                continue;
            }
            let node = NodeId::of_session(session);
            match effect {
                Effect::Complete(completion) => {
                    touched_remote.push(session);
                    self.send(node, PeerMessage::Complete(completion));
                }
                Effect::Blocking { session, handle, mode } => {
                    self.send(node, PeerMessage::Blocking { session, handle, mode });
                }
                Effect::Revoked { .. } => {}
            }
        }
        touched_remote.sort_unstable();
        touched_remote.dedup();
        for session in touched_remote {
            self.close_if_empty(session);
        }
        let released: Vec<(LockspaceId, Box<[u8]>)> = self.engine.drain_released().collect();
        for key in released {
            self.mark_idle(now, key);
        }
    }

    /// Takes mastership of a resource (the directory recorded this node),
    /// with fencing tokens above any handed out for it before.
    fn become_master(&mut self, key: Key, generation: u64) {
        let floor = self.token_floor(key.0);
        self.engine.raise_token_floor(key.0, floor);
        self.mastered.entry(key).or_insert(Mastered { idle_since: None, queued: false, generation });
    }

    fn mark_idle(&mut self, now: Instant, key: Key) {
        let Some(mastered) = self.mastered.get_mut(&key) else { return };
        mastered.idle_since = Some(now);
        if !mastered.queued {
            mastered.queued = true;
            self.idle.push_back((now, key));
        }
    }

    /// Releases masterships idle for the release delay.
    fn release_idle(&mut self, now: Instant) {
        let delay = self.config.release_delay;
        while let Some((at, _)) = self.idle.front() {
            if at.saturating_add(delay) > now {
                break;
            }
            let (_, key) = self.idle.pop_front().expect("front exists");
            let Some(mastered) = self.mastered.get_mut(&key) else { continue };
            if self.engine.resource_exists(key.0, &key.1) {
                // In use again (and freed later, if ever, with a new entry).
                mastered.idle_since = None;
                mastered.queued = false;
                continue;
            }
            match mastered.idle_since {
                Some(since) if since.saturating_add(delay) <= now => {
                    let generation = mastered.generation;
                    self.mastered.remove(&key);
                    self.stats.released += 1;
                    self.remove_from_directory(key, generation);
                }
                Some(since) => self.idle.push_back((since, key)),
                None => mastered.queued = false,
            }
        }
    }

    fn remove_from_directory(&mut self, key: Key, generation: u64) {
        let directory = self.directory_of(&key);
        let floor = self.token_floor(key.0);
        if directory == self.config.node {
            if self.directory.get(&key).is_some_and(|e| e.generation == generation)
                && let Some(entry) = self.directory.remove(&key)
            {
                self.answer_held(key, entry.held);
            }
            return;
        }
        let lockspace = self.lockspace_name(key.0);
        let name = key.1.into_vec();
        self.send(directory, PeerMessage::Remove { lockspace, name, generation, token_floor: floor });
    }

    // ----- deadlocks across nodes -----

    fn schedule_deadlock_report(&mut self, now: Instant) {
        if self.single() || self.deadlock_due.is_some() {
            return;
        }
        if self.engine.has_waiters() || self.reported_edges {
            self.deadlock_due = Some(now.saturating_add(self.config.deadlock_interval));
        }
    }

    fn report_wait_edges(&mut self, now: Instant) {
        let mut edges: Vec<RemoteEdge> = self
            .engine
            .wait_edges()
            .into_iter()
            .map(|(from, edge)| RemoteEdge { from, to: edge.to, wait: edge.wait })
            .collect();
        edges.truncate(WAIT_EDGES_MAX);
        if edges.is_empty() && !self.reported_edges {
            return;
        }
        self.reported_edges = !edges.is_empty();
        let coordinator = self.config.membership.coordinator();
        if coordinator == self.config.node {
            let me = self.config.node;
            self.on_message(now, me, PeerMessage::WaitEdges { edges });
        } else {
            self.send(coordinator, PeerMessage::WaitEdges { edges });
        }
    }

    /// The coordinator's search over every node's latest edges. A victim's
    /// wait is failed only if its master still has it; the reports used are
    /// dropped, so a cycle is acted on once.
    fn find_deadlocks(&mut self) {
        let graph = ReportedGraph::new(&self.edge_reports);
        let mut roots: Vec<SessionId> = graph.edges.keys().copied().collect();
        roots.sort_unstable();
        let found = deadlock::find_cycle(&graph, &roots, u32::MAX);
        let Search::Cycle(cycle) = found else { return };
        let masters: HashSet<NodeId> = cycle.iter().map(|w| graph.waits[w.lock as usize].0).collect();
        if masters.len() < 2 {
            // A cycle within one master is that master's to find; this one is stale.
            return;
        }
        let victim = cycle
            .iter()
            .max_by_key(|w| (w.seq, graph.waits[w.lock as usize].0))
            .map(|w| graph.waits[w.lock as usize])
            .expect("a cycle has waits");
        self.stats.deadlock_victims += 1;
        self.edge_reports.clear();
        let (master, wait) = victim;
        if master == self.config.node {
            self.engine.abort_wait(self.last_now, wait);
        } else {
            self.send(master, PeerMessage::AbortWait { wait });
        }
    }
}

/// The completion of a request that ended without a grant.
fn ended(session: SessionId, handle: LockHandle, op: Op, status: Status, mode: Option<Mode>) -> Completion {
    Completion { session, handle, op, status, mode, token: None, lvb: None, flags: StatusFlags::EMPTY }
}

/// Checks that a message about a client session comes from that session's node.
fn check_sessions(from: NodeId, message: &PeerMessage) -> Result<(), PeerError> {
    let session = match message {
        PeerMessage::Request { session, .. }
        | PeerMessage::Convert { session, .. }
        | PeerMessage::Unlock { session, .. }
        | PeerMessage::Cancel { session, .. }
        | PeerMessage::EndSession { session } => *session,
        _ => return Ok(()),
    };
    let owner = NodeId::of_session(session);
    if owner == from { Ok(()) } else { Err(PeerError::ForeignSession { from, owner }) }
}

/// The union of the nodes' reported edges, with each wait renamed to an
/// index into `waits` (which remembers its master and its own reference).
struct ReportedGraph {
    edges: HashMap<SessionId, Vec<Edge>>,
    waits: Vec<(NodeId, WaitRef)>,
}

impl ReportedGraph {
    fn new(reports: &BTreeMap<NodeId, Vec<RemoteEdge>>) -> ReportedGraph {
        let mut graph = ReportedGraph { edges: HashMap::new(), waits: Vec::new() };
        let mut index: HashMap<(NodeId, WaitRef), u32> = HashMap::new();
        for (&node, edges) in reports {
            for edge in edges {
                let next = u32::try_from(graph.waits.len()).unwrap_or(u32::MAX);
                let i = *index.entry((node, edge.wait)).or_insert_with(|| {
                    graph.waits.push((node, edge.wait));
                    next
                });
                let wait = WaitRef { lockspace: LockspaceId(u32::from(node.0)), lock: i, seq: edge.wait.seq };
                graph.edges.entry(edge.from).or_default().push(Edge { to: edge.to, wait });
            }
        }
        graph
    }
}

impl WaitForGraph for ReportedGraph {
    fn edges_from(&self, session: SessionId, edges: &mut Vec<Edge>) {
        if let Some(out) = self.edges.get(&session) {
            edges.extend_from_slice(out);
        }
    }
}

// ----- read-only views, as Node's -----

impl ClusterNode {
    /// Every lockspace with its counts (of the resources mastered here).
    #[must_use]
    pub fn lockspaces(&self) -> Vec<LockspaceInfo> {
        self.engine.lockspaces()
    }

    /// The resources mastered here (see [`Node::dump`]).
    ///
    /// # Errors
    /// Unknown lockspace.
    pub fn dump(
        &self,
        id: LockspaceId,
        name: Option<&[u8]>,
        max_resources: usize,
    ) -> Result<Vec<ResourceInfo>, RequestError> {
        self.engine.dump(id, name, max_resources)
    }

    /// A local client's lock as a dump shows it; for a lock mastered
    /// elsewhere, this node's copy (modes only).
    #[must_use]
    pub fn lock_info(&self, session: SessionId, handle: LockHandle) -> Option<LockInfo> {
        if let Some(info) = self.engine.lock_info(session, handle) {
            return Some(info);
        }
        let lock = self.remote.get(&(session, handle))?;
        Some(LockInfo {
            session,
            handle,
            granted: lock.granted,
            requested: lock.pending.filter(|&op| op != Op::Unlock).map(|_| lock.requested),
            token: lock.token,
            flags: lock.request.as_ref().map_or(crate::flags::LockFlags::EMPTY, |r| r.flags),
            orphan: false,
        })
    }

    /// Checks the engine's invariants (see [`Node::check_invariants`]).
    ///
    /// # Errors
    /// A description of the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.engine.check_invariants()
    }
}
