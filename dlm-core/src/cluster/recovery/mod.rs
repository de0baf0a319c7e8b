//! Recovery: what a node does when the membership layer hands it a new
//! view. The state machine, its barriers and its guarantees are described
//! in the docs of [`crate::cluster`] (from `README.md` beside this file);
//! here are the view handling and the barriers, in `rebuild` the directory
//! and masters rebuilt, in `fence` a node that is no longer a member.

mod fence;
mod form;
mod rebuild;
mod survivors;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use hashbrown::{HashMap, HashSet};

use crate::cluster::links::Links;
use crate::cluster::message::{Envelope, NodeId, PeerMessage, RecoveredLock};
use crate::cluster::phase::RecoveryPhase;
use crate::cluster::view::{View, ViewError};
use crate::cluster::{ClusterNode, Key};
use crate::effect::{RevokeReason, Status};
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::mode::{Mode, ModeSet};
use crate::request::ClientRequest;
use crate::time::Instant;
use crate::tokens::epoch_token_floor;

/// Where this node's recovery stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryStatus {
    /// The epoch recovered into.
    pub epoch: u64,
    /// The barrier this node waits at.
    pub phase: RecoveryPhase,
    /// The members that have not reached it yet.
    pub waiting_for: Vec<NodeId>,
    /// When this recovery started.
    pub started: Instant,
    /// When it reached this phase.
    pub phase_started: Instant,
    /// Its own questions still unanswered (phase `Locks`): lookups, and
    /// digests of kept locks that a member has not checked yet.
    pub lookups: usize,
    /// The members of the previous view found gone (or restarted), whose
    /// locks were purged.
    pub departed: Vec<NodeId>,
}

/// The most envelopes of a later epoch kept until this node has that view.
const FUTURE_ENVELOPES_MAX: usize = 4096;

/// A recovery in progress.
pub(super) struct Recovery {
    epoch: u64,
    pub(super) phase: RecoveryPhase,
    /// The members of the previous view that are gone (or restarted).
    departed: BTreeSet<NodeId>,
    /// Per phase, the members known to have reached its barrier (this node
    /// once it has sent its own).
    arrived: [BTreeSet<NodeId>; 4],
    /// This node's lookups not answered yet.
    pub(super) lookups: HashSet<Key>,
    /// Lookups from peers that came before this node passed the directory
    /// barrier (its entries were not all in yet).
    pub(super) early_lookups: Vec<(NodeId, Vec<u8>, Vec<u8>)>,
    /// Resources this node became master of in this recovery.
    pub(super) new_masters: BTreeSet<Key>,
    /// For those: the value block of a lock held above CR, if one came back with it.
    pub(super) lvb_votes: BTreeMap<Key, Vec<u8>>,
    /// Resources mastered here whose value block a lost request may have written.
    pub(super) lvb_unsure: BTreeSet<Key>,
    /// Locks added back here whose mode is in doubt (see `recovery_form`),
    /// with the other modes they may be in.
    pub(super) undecided: Vec<(LockspaceId, SessionId, LockHandle, ModeSet)>,
    /// This node's copies of remote locks by resource, sorted, taken once
    /// the directory is whole (client requests are held until the end, so
    /// no copy is added meanwhile).
    pub(super) copies: HashMap<Key, Vec<(SessionId, LockHandle)>>,
    /// This node's copies whose master stayed, by resource: they stay there
    /// (see `survivors`), unless that master refuses them. Made at the
    /// first refusal.
    pub(super) kept: Option<HashMap<Key, Vec<(SessionId, LockHandle)>>>,
    /// Copies voided by the view, with the master they had been sent to,
    /// which drops them if it stayed.
    pub(super) voided: Vec<(NodeId, SessionId, LockHandle, Key)>,
    /// Members whose check of this node's digest (or listing) is awaited.
    pub(super) checks: BTreeSet<NodeId>,
    started: Instant,
    phase_started: Instant,
}

/// A local client's request or session end taken while the node recovers,
/// carried out, in order, once recovery is over.
pub(super) enum Held {
    Request(SessionId, ClientRequest),
    EndSession(SessionId),
}

/// What the node keeps across views.
#[derive(Default)]
pub(super) struct ViewState {
    /// The recovery in progress.
    pub(super) recovery: Option<Recovery>,
    /// Requests held until recovery is over.
    pub(super) held: VecDeque<Held>,
    /// Sessions whose end is held: nothing more is said to them.
    pub(super) ending: BTreeSet<SessionId>,
    /// The node left the quorate view and fenced itself.
    pub(super) fenced: bool,
    /// The node was made to join a running cluster and has not had its
    /// first view yet: it holds requests, as if recovering.
    pub(super) joining: bool,
    /// Members' incarnations as the last view gave them.
    incarnations: BTreeMap<NodeId, u64>,
    /// Envelopes of a later epoch than this node's, kept until it has that view.
    future: Vec<(NodeId, Envelope)>,
    /// When this node last saw a member depart (or joined): a resource it
    /// becomes master of within the lock-delay after that may have been
    /// held on the departed node, so its grants wait (see `become_master`).
    pub(super) departure_at: Option<Instant>,
    /// PW and EX locks of other nodes' clients purged here and not back yet
    /// (a node whose digest did not match: its locks come back one by one,
    /// and a newer view may abandon the recovery that was to bring them
    /// back): should such a node depart, the value block it may have
    /// written is not valid. Emptied when a recovery settles.
    pub(super) spared_writers: BTreeMap<(SessionId, LockHandle), Key>,
    /// This node's unlocks that counted as done in a recovery although their
    /// value block may be lost, by resource: the master is told again in
    /// every recovery until one is done everywhere (a newer view may void the
    /// message that told it, and the copy it came from is gone).
    pub(super) unsure_unlocks: BTreeMap<Key, Vec<RecoveredLock>>,
}

impl ViewState {
    /// The state of a node made at its first epoch, or (`joining`) to join
    /// a running cluster at its first view.
    pub(super) fn new(joining: bool) -> ViewState {
        ViewState { joining, ..ViewState::default() }
    }
}

impl ClusterNode {
    /// A new view from the membership layer. A view that leaves this node
    /// out or has no quorum fences it: every lock of its clients is revoked
    /// ([`RevokeReason::Fenced`]), every pending request fails
    /// ([`Status::Fenced`]), and until a quorate view includes it again
    /// new locks fail the same way. Otherwise recovery starts (see the
    /// module docs), abandoning any recovery of an earlier view.
    ///
    /// A node joining a running cluster is made with [`ClusterNode::new`]
    /// from the view's members at epoch 0 (it then holds its clients'
    /// requests, as if recovering), creates its lockspaces, and is then
    /// handed the view.
    ///
    /// The links to the members start anew in each epoch; `connected` says
    /// which peers' connections are up now (the others' links start down,
    /// and what is sent to them waits until [`ClusterNode::handle_link`]
    /// says they are back).
    ///
    /// # Errors
    /// The epoch is not after this node's, or the members are not valid;
    /// nothing changed.
    pub fn handle_view(
        &mut self,
        now: Instant,
        view: &View,
        connected: impl Fn(NodeId) -> bool,
    ) -> Result<(), ViewError> {
        let current = self.config.membership.epoch;
        if view.epoch <= current {
            return Err(ViewError::StaleEpoch { got: view.epoch, current });
        }
        let membership = view.membership().map_err(ViewError::Members)?;
        let me = self.config.node;
        let restarted =
            |id: NodeId| self.views.incarnations.get(&id).is_some_and(|&old| view.incarnation(id) != Some(old));
        let departed: BTreeSet<NodeId> = self
            .config
            .membership
            .members()
            .iter()
            .map(|m| m.id)
            .filter(|&id| id != me && (!membership.contains(id) || restarted(id)))
            .collect();
        self.views.incarnations = view.members.iter().map(|m| (m.id, m.incarnation)).collect();
        self.config.membership = membership;
        let epoch = view.epoch;
        let mut ready = Vec::new();
        self.views.future.retain(|(from, envelope)| {
            if envelope.epoch == epoch {
                ready.push((*from, envelope.clone()));
            }
            envelope.epoch > epoch
        });
        if !view.quorate || !self.config.membership.contains(me) {
            self.fence_self(now, Status::Fenced, RevokeReason::Fenced);
            self.links = Links::new(std::iter::empty());
            self.views.fenced = true;
            return Ok(());
        }
        // A node joining, or coming back after it fenced itself, cannot know
        // whom the cluster lost meanwhile, so its view counts as a departure
        // for lock-delay.
        if !departed.is_empty() || self.views.joining || self.views.fenced {
            self.views.departure_at = Some(now);
        }
        self.views.fenced = false;
        self.views.joining = false;
        self.begin_recovery(now, departed, connected);
        for (from, envelope) in ready {
            // A peer that broke the protocol in an envelope it sent early
            // is heard of again when it resends on a new connection.
            let _ = self.handle_peer(now, from, envelope);
        }
        Ok(())
    }

    /// Where recovery stands, while it runs.
    #[must_use]
    pub fn recovery_status(&self) -> Option<RecoveryStatus> {
        let recovery = self.views.recovery.as_ref()?;
        let arrived = &recovery.arrived[usize::from(recovery.phase.index())];
        Some(RecoveryStatus {
            epoch: recovery.epoch,
            phase: recovery.phase,
            waiting_for: self.member_ids().filter(|id| !arrived.contains(id)).collect(),
            started: recovery.started,
            phase_started: recovery.phase_started,
            lookups: recovery.lookups.len() + recovery.checks.len(),
            departed: recovery.departed.iter().copied().collect(),
        })
    }

    /// Whether this node fenced itself (its last view left it out or had no quorum).
    #[must_use]
    pub fn is_fenced(&self) -> bool {
        self.views.fenced
    }

    /// The epoch of this node's view.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.config.membership.epoch
    }

    /// Whether client requests are held (recovery is running).
    pub(in crate::cluster) fn recovering(&self) -> bool {
        self.views.recovery.is_some() || self.views.joining
    }

    /// Whether this node is still rebuilding (it has not passed its own
    /// part of recovery): peers' normal messages cannot come yet.
    pub(in crate::cluster) fn rebuilding(&self) -> bool {
        self.views.recovery.as_ref().is_some_and(|r| r.phase < RecoveryPhase::Done)
    }

    /// Keeps an envelope of a later epoch until this node has its view.
    pub(in crate::cluster) fn keep_for_later(&mut self, from: NodeId, envelope: Envelope) {
        if self.views.future.len() < FUTURE_ENVELOPES_MAX {
            self.views.future.push((from, envelope));
        }
    }

    fn member_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.config.membership.members().iter().map(|m| m.id)
    }

    /// Starts recovery into the view just taken: voids what the old epoch
    /// had in flight, purges the departed nodes' locks, and says it has stopped.
    fn begin_recovery(&mut self, now: Instant, departed: BTreeSet<NodeId>, connected: impl Fn(NodeId) -> bool) {
        let me = self.config.node;
        let epoch = self.config.membership.epoch;
        let peers: Vec<NodeId> = self.member_ids().filter(|&id| id != me).collect();
        self.links = Links::new(peers.iter().copied());
        for &peer in peers.iter().filter(|&&peer| !connected(peer)) {
            self.links.set_up(now, epoch, peer, false);
        }
        self.engine.track_released(!self.single());
        self.coordinator.reset();
        self.directory.clear_entries();
        let voided = self.requester.start_recovery();
        // A recovery abandoned before every lock came back purged locks as
        // spared that may now belong to a departed node: what they held is
        // unknown here, so every resource mastered here waits the lock-delay.
        let abandoned = self.views.recovery.as_ref().is_some_and(|r| r.phase <= RecoveryPhase::Locks);
        if abandoned && !departed.is_empty() {
            for (key, _) in self.masters.sorted() {
                self.engine.delay_grants(key.0, &key.1, Mode::Ex, now);
            }
        }
        // Only the departed nodes' locks go: the other members' stay where
        // they are, each checked against its node's copies (`survivors`).
        let gone = |s: SessionId| departed.contains(&NodeId::of_session(s));
        // Every lock purged here is suspect, so none is spared.
        let spared = self.engine.recovery_purge(now, gone, gone);
        debug_assert!(spared.is_empty(), "a departed node's lock spared");
        // A writer purged by a recovery that a newer view abandoned never came
        // back, so this purge did not see it: its departure counts all the same.
        let lost: Vec<Key> = self
            .views
            .spared_writers
            .iter()
            .filter(|((session, _), _)| departed.contains(&NodeId::of_session(*session)))
            .map(|(_, key)| key.clone())
            .collect();
        self.views.spared_writers.retain(|(session, _), _| !departed.contains(&NodeId::of_session(*session)));
        for key in lost {
            self.engine.recovery_set_lvb(key.0, &key.1, None);
        }
        for session in self.masters.start_recovery(|node| departed.contains(&node)) {
            let _ = self.engine.end_session(now, session);
        }
        for lockspace in self.engine.lockspaces() {
            self.engine.raise_token_floor(lockspace.id, epoch_token_floor(epoch));
        }
        self.views.recovery = Some(Recovery {
            epoch,
            phase: RecoveryPhase::Stop,
            departed,
            arrived: Default::default(),
            lookups: HashSet::new(),
            early_lookups: Vec::new(),
            new_masters: BTreeSet::new(),
            lvb_votes: BTreeMap::new(),
            lvb_unsure: BTreeSet::new(),
            undecided: Vec::new(),
            copies: HashMap::new(),
            kept: None,
            voided,
            checks: BTreeSet::new(),
            started: now,
            phase_started: now,
        });
        self.reach_barrier(now, RecoveryPhase::Stop);
    }

    /// This node has reached a barrier: it says so to every member.
    pub(in crate::cluster) fn reach_barrier(&mut self, now: Instant, phase: RecoveryPhase) {
        let me = self.config.node;
        let peers: Vec<NodeId> = self.member_ids().filter(|&id| id != me).collect();
        for peer in peers {
            self.send(now, peer, PeerMessage::Barrier { phase });
        }
        self.on_barrier(now, me, phase);
    }

    /// A peer's message while the directory and masters are rebuilt: only
    /// recovery's own messages mean anything; a member sends nothing else
    /// before every member is done.
    pub(in crate::cluster) fn on_recovery_message(&mut self, now: Instant, from: NodeId, message: PeerMessage) {
        match message {
            PeerMessage::Barrier { phase } => self.on_barrier(now, from, phase),
            PeerMessage::Mastered { lockspace, name, term } => {
                self.on_mastered(from, &lockspace, name, term);
            }
            PeerMessage::Lookup { lockspace, name, .. } => self.on_recovery_lookup(now, from, lockspace, name),
            // Only the directory of a resource answers for it.
            PeerMessage::LookupReply { lockspace, name, master, term, token_floor }
                if self.config.membership.directory(&lockspace, &name) == from =>
            {
                let master = master.map(|m| (m, term));
                self.on_recovery_lookup_reply(now, &lockspace, name, master, token_floor);
            }
            PeerMessage::RecoverLock(lock) => self.on_recover_lock(now, from, lock),
            PeerMessage::RecoverDigest { locks, digest } => self.on_recover_digest(now, from, locks, digest),
            PeerMessage::RecoverListed => self.send(now, from, PeerMessage::RecoverChecked { matched: true }),
            PeerMessage::RecoverChecked { matched } => self.on_recover_checked(now, from, matched),
            PeerMessage::RecoverRefused { lockspace, name } => self.on_recover_refused(now, from, &lockspace, name),
            _ => {}
        }
    }

    /// A member (this node included) reached a barrier: passes every
    /// barrier that is now complete.
    pub(in crate::cluster) fn on_barrier(&mut self, now: Instant, from: NodeId, phase: RecoveryPhase) {
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        recovery.arrived[usize::from(phase.index())].insert(from);
        loop {
            let Some(recovery) = self.views.recovery.as_ref() else { return };
            let arrived = &recovery.arrived[usize::from(recovery.phase.index())];
            if !self.member_ids().all(|id| arrived.contains(&id)) {
                return;
            }
            let passed = recovery.phase;
            if let Some(next) = RecoveryPhase::from_index(passed.index() + 1) {
                let recovery = self.views.recovery.as_mut().expect("checked above");
                recovery.phase = next;
                recovery.phase_started = now;
            }
            match passed {
                RecoveryPhase::Stop => self.rebuild_directory(now),
                RecoveryPhase::Directory => self.recover_masters(now),
                RecoveryPhase::Locks => self.settle_recovered(now),
                RecoveryPhase::Done => {
                    // Every member has settled, so every master has heard
                    // what this node told it.
                    self.views.unsure_unlocks.clear();
                    self.views.recovery = None;
                    self.resume(now);
                    return;
                }
            }
        }
    }
}
