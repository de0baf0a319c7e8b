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
//! # Where to look
//!
//! One [`ClusterNode`] plays every role; each role has a module with its
//! state and its handlers (as `ClusterNode` methods that borrow that state):
//!
//! | module | role |
//! |---|---|
//! | this one | the struct, its public `handle_*` / `poll_*`, dispatch of peer messages |
//! | `inspect` | what a node shows of itself: counts, links, dumps |
//! | `requester` | this node's clients' locks mastered elsewhere: lookups, the master cache, requests, answers |
//! | `directory` | entries, mastership terms, the token clock; one `claim` for every new mastership |
//! | `master` | resources mastered here: other nodes' requests, requests held for a lookup, routing the engine's effects, idle release |
//! | `coordinator` | deadlock search across masters |
//! | `links` (and `link`, one peer's) | numbering, acknowledgements, resending, heartbeats, silent peers |
//! | `pressure` | peers' pressure reports (PSI), kept per node to tell a lost node that stalled from one that died |
//! | `timer` | the closed set of timers and their table; [`ClusterNode::poll_timeout`] is its minimum |
//! | `sessions` | this node's clients' sessions: their ids, their end, the node's shutdown |
//! | `handshake` | the hello a node sends and the hellos it accepts |
//! | `recovery` (`rebuild`, `fence`) | a new view: the barriers, the directory and masters rebuilt, a node fenced (see [Recovery](#recovery)) |
//! | `view` | the views the membership layer hands in |
//! | [`agree`] | how the nodes of one CPG group agree on each view, from corosync's events (the agent drives it with corosync, the simulator with a model of it) |
//! | `config` | settings and the protocol's timing defaults |
//! | `members`, `message`, [`wire`] | membership and directory hashing, the messages, their encoding |
//!
//! Messages go through a link layer per peer that numbers them, so that
//! the network may delay, reorder and duplicate them, and a broken
//! connection loses nothing once it is back. Every message carries the
//! membership epoch.
//!
//! The node is deterministic: its effects depend only on the events fed to
//! it (with their `now`), never on a hash map's iteration order, so a
//! simulation replays exactly from its seed.
//!
#![doc = include_str!("recovery/README.md")]

pub mod agree;
mod config;
mod coordinator;
mod directory;
mod handshake;
mod inspect;
mod link;
mod links;
mod master;
mod members;
mod message;
mod phase;
mod pressure;
mod recovery;
mod requester;
mod sessions;
#[cfg(test)]
mod testing;
mod timer;
mod view;
pub mod wire;

use std::collections::VecDeque;

use crate::effect::{Completion, Effect, Op, Status};
use crate::flags::StatusFlags;
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::lockspace::LockspaceConfig;
use crate::mode::Mode;
use crate::node::Node;
use crate::request::{ClientRequest, ConvertRequest, RequestError, UnlockRequest};
use crate::time::Instant;

pub use crate::tokens::{TOKEN_EPOCH_SHIFT, TOKEN_LIMIT, epoch_token_floor};
pub use config::ClusterConfig;
use coordinator::Coordinator;
#[cfg(feature = "sim")]
pub use coordinator::DeadlockEvent;
use directory::Directory;
pub use handshake::HelloRefusal;
use links::Links;
use master::Masters;
pub use members::{MEMBERS_MAX, Member, Membership, WEIGHT_MAX};
pub use message::{
    Envelope, NodeId, PeerError, PeerMessage, RecoveredLock, RemoteEdge, SESSION_NODE_SHIFT, WAIT_EDGES_MAX,
};
pub use phase::RecoveryPhase;
pub use pressure::{NodePressure, Pressures};
pub use recovery::RecoveryStatus;
use recovery::ViewState;
use requester::Requester;
pub use timer::{Timer, TimerTable};
pub use view::{View, ViewError, ViewMember};

/// A resource: its lockspace and name.
type Key = (LockspaceId, Box<[u8]>);

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
    /// Recovery: locks of this node's clients sent to a master (or told to
    /// drop them there).
    pub recovery_locks_sent: u64,
    /// Recovery, as master: locks of other nodes' clients kept as they were
    /// (their node's digest matched).
    pub recovery_locks_kept: u64,
    /// Recovery, as master: digests of other nodes that did not match (their
    /// locks here went, and came back one by one).
    pub recovery_digest_mismatches: u64,
    /// Recovery: resources whose old master, which stayed, refused this
    /// node's copies (it masters them no more): looked up instead.
    pub recovery_refused: u64,
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
///
/// Every `handle_*` and mutator takes the caller's `now`; after each, drain
/// [`ClusterNode::poll_effect`], [`ClusterNode::poll_transmit`] and
/// [`ClusterNode::poll_reset`], then ask [`ClusterNode::poll_timeout`].
pub struct ClusterNode {
    /// Made as the only member: no view ever brings another (see `single`).
    standalone: bool,
    engine: Node,
    config: ClusterConfig,
    links: Links,
    /// Effects for local clients, oldest first.
    effects: VecDeque<Effect>,
    requester: Requester,
    directory: Directory,
    masters: Masters,
    coordinator: Coordinator,
    stats: ClusterStats,
    /// The serial of the next session [`ClusterNode::open_next_session`] opens.
    next_session: u64,
    /// Views: the recovery in progress, requests held meanwhile, fencing.
    views: ViewState,
    /// The last pressure report of each peer.
    pressures: Pressures,
}

/// What became of an accepted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A lock or conversion that waits for its grant: queued behind locks in
    /// its way here, or sent to its resource's master on another node.
    Queued,
    /// Anything else: answered among the effects already, or an unlock or
    /// cancel on its way.
    NotQueued,
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
        let config_epoch = config.membership.epoch;
        // A node joining a running cluster talks to nobody before its first view.
        let joining = config_epoch == 0;
        let peers = config.membership.members().iter().map(|m| m.id).filter(|&id| id != config.node && !joining);
        let links = Links::new(peers.collect::<Vec<_>>().into_iter());
        let standalone = config.membership.members().len() == 1;
        engine.track_released(!standalone);
        Ok(ClusterNode {
            standalone,
            engine,
            config,
            links,
            effects: VecDeque::new(),
            requester: Requester::default(),
            directory: Directory::default(),
            masters: Masters::default(),
            coordinator: Coordinator::default(),
            stats: ClusterStats::default(),
            next_session: 1,
            views: ViewState::new(joining),
            pressures: Pressures::default(),
        })
    }

    /// Whether this node is made alone (it is then exactly a [`Node`]). A
    /// node made with others stays a cluster node when views leave it
    /// alone for a while: what it masters then must be found by the
    /// members that come back, and its sessions' ids must name it.
    pub(in crate::cluster) fn single(&self) -> bool {
        self.standalone
    }

    // ----- lockspaces and sessions (local) -----

    /// Creates a lockspace. A lockspace needs to be made only on the
    /// members whose clients use it (as `dlm_new_lockspace` makes the
    /// Linux DLM's): a member asked about it by a peer (as its resources'
    /// directory or master) makes it then, with the default configuration
    /// (`ClusterNode::peer_lockspace`). Lockspaces with another
    /// configuration (value block length, lock-delay) must be made alike on
    /// every member.
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

    /// The lockspace a peer's message names, made here with the default
    /// configuration if this member has not got it: the directory and the
    /// masters of a lockspace's resources are wherever the hash puts them,
    /// on members whose clients never made it too. `None` if it cannot be
    /// made (an invalid name, or `lockspaces_max` reached): the peer's
    /// request is refused.
    pub(in crate::cluster) fn peer_lockspace(&mut self, name: &[u8]) -> Option<LockspaceId> {
        if let Some(id) = self.engine.lockspace_id(name) {
            return Some(id);
        }
        self.engine.create_lockspace(name, LockspaceConfig::default()).ok()
    }

    /// Releases a lockspace (see [`Node::release_lockspace`]). In a cluster
    /// only a lockspace with no lock of this node's clients anywhere.
    ///
    /// # Errors
    /// As [`Node::release_lockspace`]; `LockspaceBusy` while local clients hold remote locks in it.
    pub fn release_lockspace(&mut self, now: Instant, id: LockspaceId, force: bool) -> Result<(), RequestError> {
        // Its remote locks, the resources it masters (even idle) and its
        // directory entries are the cluster's: until recovery can move them,
        // a lockspace that has any is not released here.
        let remote = self.requester.count_in(id) + self.masters.count_in(id) + self.directory.count_in(id);
        if remote > 0 || self.recovering() {
            return Err(RequestError::LockspaceBusy { locks: u32::try_from(remote).unwrap_or(u32::MAX) });
        }
        self.engine.release_lockspace(id, force)?;
        self.masters.forget_lockspace(id);
        self.requester.forget_lockspace(id);
        self.directory.forget_lockspace(id);
        self.pump(now);
        Ok(())
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
    ) -> Result<Outcome, RequestError> {
        if self.views.fenced {
            return self.refuse_fenced(session, &request);
        }
        if self.recovering() {
            return self.hold(session, request);
        }
        let asks_grant = match &request {
            ClientRequest::Lock(req) => Some(req.handle),
            ClientRequest::Convert(req) => Some(req.handle),
            ClientRequest::Unlock(_) | ClientRequest::Cancel { .. } => None,
        };
        let result = if self.single() {
            self.engine.handle_client(now, session, request)
        } else if !self.engine.has_session(session) || self.masters.is_remote_session(session) {
            return Err(RequestError::UnknownSession);
        } else {
            match request {
                ClientRequest::Lock(req) => self.client_lock(now, session, req),
                ClientRequest::Convert(req) => match self.requester.get(session, req.handle) {
                    Some(lock) => self.remote_convert(now, session, lock.clone(), req),
                    None => self.engine.handle_client(now, session, ClientRequest::Convert(req)),
                },
                ClientRequest::Unlock(req) => match self.requester.get(session, req.handle) {
                    Some(lock) => self.remote_unlock(now, session, lock.clone(), req),
                    None => self.engine.handle_client(now, session, ClientRequest::Unlock(req)),
                },
                ClientRequest::Cancel { handle } => match self.requester.get(session, handle) {
                    Some(lock) => self.remote_cancel(now, session, handle, lock.clone()),
                    None => self.engine.handle_client(now, session, ClientRequest::Cancel { handle }),
                },
            }
        };
        self.pump(now);
        result?;
        // Waiting shows as a requested mode on the lock once the event is over
        // (a grant, a refusal or a failure has cleared it already).
        let waits =
            asks_grant.is_some_and(|handle| self.lock_info(session, handle).is_some_and(|l| l.requested.is_some()));
        Ok(if waits { Outcome::Queued } else { Outcome::NotQueued })
    }

    // ----- time -----

    /// The deadline of each timer, derived from the state now.
    #[must_use]
    pub fn timers(&self) -> TimerTable {
        let mut table = TimerTable::default();
        for timer in Timer::ALL {
            table.set(timer, self.deadline(timer));
        }
        table
    }

    /// One timer's deadline: the earliest of what it watches.
    fn deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            // Nothing is granted, timed out or released while recovering.
            Timer::Engine | Timer::IdleRelease | Timer::DeadlockReport if self.recovering() => None,
            Timer::Engine => self.engine.poll_timeout(),
            Timer::IdleRelease => self.masters.release_deadline(self.config.release_delay),
            Timer::Ack => self.links.ack_deadline(),
            Timer::Silence => self.links.silence_deadline(self.config.ack_timeout),
            Timer::Heartbeat => self.links.heartbeat_deadline(self.config.heartbeat_interval),
            Timer::DeadlockReport => self.coordinator.report_due,
        }
    }

    /// Time has passed: the timers that are due run, in [`Timer::ALL`]'s
    /// order (each one judged due just before it runs, after the ones before
    /// it have changed the state).
    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in Timer::ALL {
            if self.deadline(timer).is_some_and(|at| at <= now) {
                self.on_timer(now, timer);
            }
        }
        if !self.single() {
            self.schedule_deadlock_report(now);
            self.pump(now);
        }
    }

    fn on_timer(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::Engine => {
                self.engine.handle_timeout(now);
                self.pump(now);
            }
            Timer::IdleRelease => self.release_idle(now),
            Timer::Ack => self.links.send_due_acks(now, self.config.membership.epoch),
            Timer::Silence => {
                for peer in self.links.silent(now, self.config.ack_timeout) {
                    self.handle_link(now, peer, false);
                    self.links.reset(peer);
                }
            }
            Timer::Heartbeat => {
                for peer in self.links.quiet(now, self.config.heartbeat_interval) {
                    self.send(now, peer, PeerMessage::Heartbeat);
                }
            }
            Timer::DeadlockReport => {
                self.coordinator.report_due = None;
                self.report_wait_edges(now);
            }
        }
    }

    /// When [`ClusterNode::handle_timeout`] should be called next, if ever:
    /// the earliest deadline of [`ClusterNode::timers`].
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers().next()
    }

    /// The next effect for a local client, oldest first.
    #[must_use]
    pub fn poll_effect(&mut self) -> Option<Effect> {
        // A session whose end is held (recovery) hears nothing more.
        while let Some(effect) = self.effects.pop_front() {
            let session = effect.session();
            if !self.ending(session) {
                return Some(effect);
            }
        }
        None
    }

    /// A peer whose connection should be dropped and made again (it left
    /// messages unacknowledged past [`ClusterConfig::ack_timeout`]; its link
    /// is down until [`ClusterNode::handle_link`] says it is up again).
    #[must_use]
    pub fn poll_reset(&mut self) -> Option<NodeId> {
        self.links.poll_reset()
    }

    /// The next envelope to send, and to which peer.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Envelope)> {
        self.links.poll_transmit()
    }

    /// The connection to `peer` went down (`up == false`) or is back. While
    /// down, requests that need the peer fail with [`Status::Unavailable`];
    /// those already sent to it fail the same way, and what the peer makes of
    /// them later is undone (unless [`ClusterConfig::requests_wait_for_views`]:
    /// then they wait). Back up, everything it has not acknowledged is sent again.
    pub fn handle_link(&mut self, now: Instant, peer: NodeId, up: bool) {
        let changed = self.links.set_up(now, self.config.membership.epoch, peer, up);
        if !changed || up || self.recovering() || self.config.requests_wait_for_views {
            // While recovering, a link that goes down loses nothing: it
            // resends when back, and a member that is gone is the next view's.
            return;
        }
        self.strand_requests_of(peer);
        self.pump(now);
    }

    // ----- peer messages -----

    /// An envelope from a peer.
    ///
    /// # Errors
    /// The peer broke the protocol; drop its connection. Nothing was changed
    /// by the offending message.
    pub fn handle_peer(&mut self, now: Instant, from: NodeId, envelope: Envelope) -> Result<(), PeerError> {
        let expected = self.config.membership.epoch;
        if envelope.epoch > expected {
            self.keep_for_later(from, envelope);
            return Ok(());
        }
        if envelope.epoch < expected || self.views.fenced {
            // Of an epoch that is over (its messages are void), or to a node
            // outside the view.
            return Ok(());
        }
        if let Some(message) = &envelope.message {
            message::check_sessions(from, message)?;
        }
        let delivered = self.links.receive(now, self.config.ack_delay, from, envelope)?;
        for message in delivered {
            self.stats.messages_received += 1;
            self.on_message(now, from, message);
            self.pump(now);
        }
        self.schedule_deadlock_report(now);
        Ok(())
    }

    /// Hands a peer's message to the role it is for.
    fn on_message(&mut self, now: Instant, from: NodeId, message: PeerMessage) {
        if let PeerMessage::Pressure(pressure) = message {
            // Whatever the phase: it is news of the peer, not of a lock.
            self.pressures.record(from, pressure, now);
            return;
        }
        if self.rebuilding() {
            self.on_recovery_message(now, from, message);
            return;
        }
        match message {
            PeerMessage::Lookup { lockspace, name, stale } => self.on_lookup(now, from, lockspace, name, stale),
            PeerMessage::LookupReply { lockspace, name, master, term, token_floor } => {
                // Only the directory of a resource answers for it.
                if self.config.membership.directory(&lockspace, &name) == from {
                    self.on_lookup_reply(now, lockspace, name, master.map(|m| (m, term)), token_floor);
                }
            }
            PeerMessage::Remove { lockspace, name, term, token_floor } => {
                self.on_remove(now, from, &lockspace, name, term, token_floor);
            }
            request @ PeerMessage::Request { .. } => self.on_request(now, from, request),
            PeerMessage::Convert { session, handle, mode, flags, lvb, timeout } => {
                self.on_convert(now, from, session, ConvertRequest { handle, mode, flags, lvb, timeout });
            }
            PeerMessage::Unlock { session, handle, flags, lvb } => {
                self.on_unlock(now, from, session, UnlockRequest { handle, flags, lvb });
            }
            PeerMessage::Cancel { session, handle } => self.on_cancel(now, from, session, handle),
            PeerMessage::NotMaster { session, handle } => self.on_not_master(now, from, session, handle),
            PeerMessage::Complete(completion) => self.on_complete(now, from, completion),
            PeerMessage::Blocking { session, handle, mode } => self.on_blocking(from, session, handle, mode),
            PeerMessage::EndSession { session } => self.on_end_session(now, session),
            PeerMessage::WaitEdges { edges } => self.on_wait_edges(now, from, edges),
            PeerMessage::ConfirmEdges { probe, edges } => self.on_confirm_edges(now, from, probe, &edges),
            PeerMessage::EdgesConfirmed { probe, confirmed } => self.on_edges_confirmed(now, from, probe, confirmed),
            PeerMessage::AbortWait { wait } => {
                self.engine.abort_wait(now, wait);
            }
            PeerMessage::Barrier { phase } => self.on_barrier(now, from, phase),
            // Recovery's, which is over here (or never began).
            PeerMessage::Mastered { .. }
            | PeerMessage::RecoverLock(_)
            | PeerMessage::RecoverDigest { .. }
            | PeerMessage::RecoverListed
            | PeerMessage::RecoverChecked { .. }
            | PeerMessage::RecoverRefused { .. } => {}
            // Its acknowledgement is the point; pressure is taken above.
            PeerMessage::Heartbeat | PeerMessage::Pressure(_) => {}
        }
    }

    // ----- helpers shared by the roles -----

    fn lockspace_name(&self, id: LockspaceId) -> Vec<u8> {
        self.engine.lockspace_name(id).unwrap_or_default().to_vec()
    }

    /// Whether a node can be reached now (this node always can).
    fn is_up(&self, node: NodeId) -> bool {
        node == self.config.node || self.links.is_up(node)
    }

    /// Whether a request for `node` goes ahead: it is reachable, or requests
    /// wait for it (to be back, or for the view that says it is gone).
    fn can_wait_for(&self, node: NodeId) -> bool {
        self.config.requests_wait_for_views || self.is_up(node)
    }

    /// Sends a message to a peer through its link, in this membership epoch.
    fn send(&mut self, now: Instant, to: NodeId, message: PeerMessage) {
        if self.links.send(now, self.config.membership.epoch, to, message) {
            self.stats.messages_sent += 1;
        }
    }
}

/// The completion of a request that ended without a grant.
fn ended(session: SessionId, handle: LockHandle, op: Op, status: Status, mode: Option<Mode>) -> Completion {
    Completion { session, handle, op, status, mode, token: None, lvb: None, flags: StatusFlags::EMPTY }
}
