//! How the agents of one CPG group agree on each view, sans-IO: events from
//! corosync go in, messages to multicast and views for the lock engine come
//! out. The agent drives it with corosync (`dlm-agent`'s `membership`), the
//! simulator with a model of corosync.
//!
//! CPG delivers configuration changes and messages to every member in one
//! total order (virtual synchrony), so a member that decides from what it
//! was delivered, in order, decides as every other member does. A view is
//! made in a **round**:
//!
//! 1. After each configuration change the *leader* (the configured member
//!    with the lowest node id, then pid) multicasts `Round(id)`; a change
//!    also ends any round in progress.
//! 2. Every member that is delivered `Round(id)` starts that round over the
//!    members it has now, and multicasts `Report(id, epoch, incarnation,
//!    quorate)`: the epoch of the last view it agreed to, the incarnation of
//!    its process, and whether its last view was quorate with it in it. A
//!    later `Round` replaces an earlier one.
//! 3. When a report of the round has come from every member, each takes the
//!    view: the members with their incarnations, at epoch
//!    `max(reported) + 2`. It is later than every member's own epoch, and
//!    the odd epoch in between is left for a node to fence itself alone
//!    (below) without taking an epoch the others might use.
//!
//! Reports carry their round's id, so a report sent for an earlier round and
//! delivered in a later one is not counted there.
//!
//! **Quorum.** A view is handed to the lock engine only once votequorum has
//! seen the ring that CPG's membership comes from (as dlm_controld waits
//! for the quorum ring id to match the CPG ring id), with the quorate flag
//! votequorum gives then: a node of a partition that lost quorum never
//! takes a view of that partition as quorate. Quorum lost with no change of
//! the group fences this node at `agreed + 1`; quorum regained makes the
//! leader start a round.
//!
//! **A majority of agents.** Votequorum counts nodes, and a node whose
//! agent died still has its vote. A view is quorate only when quorum says so
//! *and* its agents carry more than half the configured weight (with more
//! than two nodes configured): any two such views share an agent, so the
//! later one's epoch is above every epoch granted in before, and fencing
//! tokens never go back (part 6 of [`crate::tokens`]). A cluster with a majority of corosyncs but a
//! minority of agents grants nothing until more agents join.
//!
//! **Fencing.** A node that left because its corosync was lost (CPG's
//! reason `NODEDOWN`, as every member is told in the same change) may still
//! be running and holding locks, so a quorate view without it is handed only
//! once it is fenced. The leader of a quorate group is asked to fence it
//! ([`Step::Fence`]: the fencing command, or the self-fencing grace); when
//! that is done it multicasts `Fenced(node)` (so does `fence-ack` by hand),
//! and every member hands the view when that is delivered. An agent that
//! exited (`PROCDOWN`, `LEAVE`: its node's corosync is still in the ring)
//! took its clients' sessions with it: nothing to fence. A group without
//! quorum fences nobody; its views fence its own members instead.
//!
//! **The lease.** A corosync that stops answering sends no callback at
//! all; the agent's own lease on its answers (`membership::lease`) lapses
//! first, and this node fences itself as on quorum loss, dropping any round
//! in progress ([`Agreement::lease_lapsed`]); when corosync answers again,
//! it starts a round itself ([`Agreement::lease_renewed`]): the group may
//! not have changed, and its leader would start none.
//!
//! **A fenced node comes back anew.** A node that fenced itself revoked its
//! clients' locks, so when it comes back it reports a new incarnation: the
//! others then purge what they still held for it, as for a restart. A node
//! that finds in a round that the others agreed to views it did not (it
//! was left out of them) while it still holds a quorate view fences itself
//! before it takes the round's view: no node merges back with state the
//! others may have recovered.
//!
//! **Who may be a member.** Only configured dlm nodes, each at most once (its
//! corosync node id is its dlm id): any other member of the group is left
//! out of every view and counted.

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::{NodeId, View, ViewMember};

/// A member of the CPG group: a process on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpgMember {
    /// Its corosync node id.
    pub nodeid: u32,
    /// Its process id.
    pub pid: u32,
}

/// Which round a report answers: who started it and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundId {
    /// The member that started it.
    pub by: CpgMember,
    /// That member's count of rounds it started.
    pub seq: u64,
}

/// What the agents multicast to each other in the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Start a round over the members as they are when this is delivered.
    Round(RoundId),
    /// A lost node was fenced (by the leader's command or grace, or by
    /// hand): views without it may be handed.
    Fenced {
        /// Its node id.
        nodeid: u32,
    },
    /// A member's answer in a round.
    Report {
        /// The round answered.
        round: RoundId,
        /// The epoch of the last view the member agreed to (0 before any).
        epoch: u64,
        /// The member's incarnation.
        incarnation: u64,
        /// Whether the last view the member took was quorate and had it
        /// in it (it may hold locks): a member that finds a later one among
        /// the reports was left out of a view that others held.
        quorate: bool,
    },
}

/// Why a member or a message was left out, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A group member that is not a configured dlm node.
    NotConfigured,
    /// A second process of one node in the group.
    DuplicateNode,
    /// A message that does not decode.
    BadMessage,
}

impl Refusal {
    /// Every refusal.
    pub const ALL: [Refusal; 3] = [Refusal::NotConfigured, Refusal::DuplicateNode, Refusal::BadMessage];

    /// Its label in metrics and logs.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::NotConfigured => "not_configured",
            Refusal::DuplicateNode => "duplicate_node",
            Refusal::BadMessage => "bad_message",
        }
    }
}

/// What the caller does next, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Multicast this to the group (agreed order).
    Send(Message),
    /// Hand this view to the lock engine.
    View(View),
    /// Count (and log) something refused; `nodeid` names the member if any.
    Refused(Refusal, Option<u32>),
    /// Fence this lost node, then call [`Agreement::fence_done`] (this node
    /// leads a quorate group).
    Fence(u32),
}

/// Votequorum's word: quorate or not, as of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quorum {
    quorate: bool,
    ring: u64,
}

struct Round {
    id: RoundId,
    /// The members that must report, by node.
    expected: BTreeMap<u32, CpgMember>,
    reports: BTreeMap<u32, Report>,
}

/// One member's answer in a round.
#[derive(Clone, Copy)]
struct Report {
    epoch: u64,
    incarnation: u64,
    quorate: bool,
}

/// One agent's side of the agreement.
pub struct Agreement {
    /// This node's dlm id (its corosync node id).
    node: u16,
    /// The configured dlm nodes and their weights.
    configured: BTreeMap<u16, u8>,
    /// This process in the group, once joined.
    me: Option<CpgMember>,
    incarnation: u64,
    /// The epoch of the last view agreed in a round.
    agreed: u64,
    /// The epoch of the last view handed to the lock engine.
    handed: u64,
    /// Whether the last view handed was quorate (and included this node).
    handed_quorate: bool,
    /// The members of the last quorate view handed: the nodes that may hold
    /// locks, which must be fenced before a quorate view goes on without them.
    handed_members: BTreeSet<u32>,
    /// The group as of the last configuration change.
    members: Vec<CpgMember>,
    rounds_started: u64,
    round: Option<Round>,
    /// The ring the group's membership comes from (CPG's totem change).
    cpg_ring: u64,
    quorum: Option<Quorum>,
    /// A view agreed and not yet handed (waiting for quorum's ring, or for
    /// a lost node's fencing).
    pending: Option<View>,
    /// Nodes lost (`NODEDOWN`) and not fenced yet: no quorate view without
    /// them is handed.
    unfenced: BTreeSet<u32>,
    /// Of those, the ones this node was asked to fence ([`Step::Fence`]).
    fencing: BTreeSet<u32>,
}

impl Agreement {
    /// The agent of node `node`, incarnation `incarnation`, among the
    /// configured nodes (`(id, weight)`, `node` among them), not yet in the group.
    #[must_use]
    pub fn new(node: u16, configured: impl IntoIterator<Item = (u16, u8)>, incarnation: u64) -> Agreement {
        Agreement {
            node,
            configured: configured.into_iter().collect(),
            me: None,
            incarnation,
            agreed: 0,
            handed: 0,
            handed_quorate: false,
            handed_members: BTreeSet::new(),
            members: Vec::new(),
            rounds_started: 0,
            round: None,
            cpg_ring: 0,
            quorum: None,
            pending: None,
            unfenced: BTreeSet::new(),
            fencing: BTreeSet::new(),
        }
    }

    /// The members whose report the round in progress waits for (none
    /// without a round). A member that never reports (a stopped process:
    /// corosync still counts it) holds every view up until it does or
    /// leaves the group.
    #[must_use]
    pub fn waiting_for(&self) -> Vec<u32> {
        self.round.as_ref().map_or_else(Vec::new, |round| {
            round.expected.keys().filter(|n| !round.reports.contains_key(n)).copied().collect()
        })
    }

    /// Members of the round in progress that have not reported for longer
    /// than the caller allows (their agent stopped or stuck: corosync still
    /// counts the process): the leader of a quorate group is asked to fence
    /// their nodes, once each. When a node is off, corosync reports it lost
    /// and the change goes on without it.
    pub fn fence_stalled(&mut self, stalled: &[u32]) -> Vec<Step> {
        let valid = self.valid(&self.members.clone(), &mut Vec::new());
        let quorate = self.quorum.is_some_and(|q| q.quorate && q.ring >= self.cpg_ring);
        if !quorate || !self.is_leader(&valid) {
            return Vec::new();
        }
        let me = self.me.map(|m| m.nodeid);
        let waiting = self.waiting_for();
        stalled
            .iter()
            .filter(|&&n| Some(n) != me && waiting.contains(&n))
            .filter(|&&n| self.fencing.insert(n))
            .map(|&n| Step::Fence(n))
            .collect()
    }

    /// The nodes lost and not fenced yet.
    #[must_use]
    pub fn unfenced(&self) -> &BTreeSet<u32> {
        &self.unfenced
    }

    /// This process's incarnation (it changes when the node fences itself).
    #[cfg(test)]
    #[must_use]
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// This process joined the group as `me`.
    pub fn joined(&mut self, me: CpgMember) {
        self.me = Some(me);
    }

    /// The group's members changed (CPG's configuration change); `lost`:
    /// the nodes that left because their corosync was lost (`NODEDOWN`).
    pub fn confchg(&mut self, members: Vec<CpgMember>, lost: &[u32]) -> Vec<Step> {
        let mut steps = Vec::new();
        let valid = self.valid(&members, &mut steps);
        let in_view = |nodeid: &u32| self.handed_members.contains(nodeid);
        self.unfenced.extend(lost.iter().copied().filter(in_view));
        // A lost node back in the group needs no fencing: if it fenced
        // itself it comes back as a new incarnation, and its old locks are
        // purged like a restarted node's.
        self.unfenced.retain(|n| !valid.contains_key(n));
        self.fencing.retain(|n| !valid.contains_key(n));
        self.members = members;
        self.round = None;
        self.pending = None;
        if self.is_leader(&valid) {
            steps.push(self.start_round());
        }
        self.ask_fencing(&valid, &mut steps);
        steps
    }

    /// This node fenced `nodeid` (or was told by hand that it is fenced).
    pub fn fence_done(&mut self, nodeid: u32) -> Vec<Step> {
        self.fencing.remove(&nodeid);
        vec![Step::Send(Message::Fenced { nodeid })]
    }

    /// Asks this node to fence the lost nodes, if it leads a quorate group.
    fn ask_fencing(&mut self, valid: &BTreeMap<u32, CpgMember>, steps: &mut Vec<Step>) {
        let quorate = self.quorum.is_some_and(|q| q.quorate && q.ring >= self.cpg_ring);
        if !quorate || !self.is_leader(valid) {
            return;
        }
        for &nodeid in &self.unfenced {
            if self.fencing.insert(nodeid) {
                steps.push(Step::Fence(nodeid));
            }
        }
    }

    /// CPG's ring changed (its totem configuration change).
    pub fn totem(&mut self, ring: u64) -> Vec<Step> {
        self.cpg_ring = self.cpg_ring.max(ring);
        Vec::new()
    }

    /// Votequorum's word changed.
    pub fn quorum(&mut self, quorate: bool, ring: u64) -> Vec<Step> {
        let was = self.quorum.replace(Quorum { quorate, ring });
        let mut steps = Vec::new();
        let valid = self.valid(&self.members.clone(), &mut Vec::new());
        self.ask_fencing(&valid, &mut steps);
        if self.pending.is_some() {
            self.try_hand(&mut steps);
        } else if self.handed_quorate && !quorate {
            self.fence_alone(&mut steps);
        } else if !was.is_some_and(|q| q.quorate) && quorate && self.handed > 0 && self.is_leader(&valid) {
            steps.push(self.start_round());
        }
        steps
    }

    /// A message multicast by `from` was delivered.
    pub fn deliver(&mut self, from: CpgMember, message: Message) -> Vec<Step> {
        let mut steps = Vec::new();
        match message {
            Message::Round(id) => {
                let valid = self.valid(&self.members.clone(), &mut Vec::new());
                let in_group = self.me.is_some_and(|me| valid.get(&me.nodeid) == Some(&me));
                self.pending = None;
                self.round = Some(Round { id, expected: valid, reports: BTreeMap::new() });
                if in_group {
                    steps.push(Step::Send(Message::Report {
                        round: id,
                        epoch: self.agreed,
                        incarnation: self.incarnation,
                        quorate: self.handed_quorate,
                    }));
                }
            }
            Message::Fenced { nodeid } => {
                if self.unfenced.remove(&nodeid) {
                    self.fencing.remove(&nodeid);
                    self.try_hand(&mut steps);
                }
            }
            Message::Report { round, epoch, incarnation, quorate } => {
                let Some(current) = self.round.as_mut() else { return steps };
                if current.id != round || current.expected.get(&from.nodeid) != Some(&from) {
                    return steps;
                }
                current.reports.insert(from.nodeid, Report { epoch, incarnation, quorate });
                if current.reports.len() == current.expected.len() {
                    let round = self.round.take().expect("checked above");
                    self.fence_if_views_missed(&round, &mut steps);
                    self.agree(&round);
                    self.try_hand(&mut steps);
                }
            }
        }
        steps
    }

    /// The quorum service's connection broke: this node fences itself
    /// until votequorum's word comes again.
    pub fn quorum_lost(&mut self) -> Vec<Step> {
        self.quorum = None;
        self.fence_alone_if_quorate()
    }

    /// This node's membership lease lapsed (its corosync stopped answering,
    /// or the whole node was paused; see `crate::lease`): it fences
    /// itself as on quorum loss. A round in progress is dropped with what it
    /// would hand: this node reported its old incarnation there, and comes
    /// back only through a new round, as its new one.
    pub fn lease_lapsed(&mut self) -> Vec<Step> {
        self.round = None;
        self.pending = None;
        self.fence_alone_if_quorate()
    }

    /// This node's corosync answers again after a lapse fenced it: it
    /// starts a round itself (any member's `Round` is taken by all; the
    /// leader's rule only avoids needless ones), so that it comes back, as
    /// its new incarnation, though the group may not have changed.
    pub fn lease_renewed(&mut self) -> Vec<Step> {
        if self.me.is_none() || self.handed_quorate {
            return Vec::new();
        }
        vec![self.start_round()]
    }

    /// The group's connection broke: this node fences itself.
    pub fn lost(&mut self) -> Vec<Step> {
        self.me = None;
        self.members.clear();
        self.round = None;
        self.pending = None;
        self.quorum = None;
        self.fence_alone_if_quorate()
    }

    /// The configured members of `members`, one process per node (a node
    /// with two is left out altogether); the others are refused.
    fn valid(&self, members: &[CpgMember], steps: &mut Vec<Step>) -> BTreeMap<u32, CpgMember> {
        let mut by_node: BTreeMap<u32, Vec<CpgMember>> = BTreeMap::new();
        for member in members {
            by_node.entry(member.nodeid).or_default().push(*member);
        }
        let mut valid = BTreeMap::new();
        for (nodeid, processes) in by_node {
            let configured = u16::try_from(nodeid).is_ok_and(|id| self.configured.contains_key(&id));
            if !configured {
                steps.push(Step::Refused(Refusal::NotConfigured, Some(nodeid)));
            } else if processes.len() > 1 {
                steps.push(Step::Refused(Refusal::DuplicateNode, Some(nodeid)));
            } else {
                valid.insert(nodeid, processes[0]);
            }
        }
        valid
    }

    fn is_leader(&self, valid: &BTreeMap<u32, CpgMember>) -> bool {
        self.me.is_some() && valid.values().next() == self.me.as_ref()
    }

    fn start_round(&mut self) -> Step {
        self.rounds_started += 1;
        let by = self.me.expect("only a joined member leads");
        Step::Send(Message::Round(RoundId { by, seq: self.rounds_started }))
    }

    /// No stateful merge: a member that reports a quorate view later than
    /// any this node agreed to means this node missed that view, which a
    /// member of it would have agreed to as well (virtual synchrony): it was
    /// left out, and the others may have recovered its locks. (Views that
    /// fenced their members, as a minority's, leave nothing to miss.) If it still holds a
    /// quorate view (its lease should have lapsed: this is the defence
    /// behind it), it fences itself before it takes the new view, and comes
    /// back holding nothing; its later views carry a new incarnation.
    fn fence_if_views_missed(&mut self, round: &Round, steps: &mut Vec<Step>) {
        let missed = round.reports.values().any(|r| r.quorate && r.epoch > self.agreed);
        if missed && self.handed_quorate {
            self.fence_alone(steps);
        }
    }

    /// Every member reported: the view of the round becomes pending.
    fn agree(&mut self, round: &Round) {
        // From the reports alone, so every member reaches the same epoch. This
        // node's report carried its `agreed`, and `handed` is at most one
        // more, so the new epoch is later than both. Agreed epochs are even:
        // the odd one after each is for a node fencing itself alone.
        let highest = round.reports.values().map(|r| r.epoch).max().unwrap_or(0);
        self.agreed = (highest + 2) & !1;
        let members = round
            .reports
            .iter()
            .map(|(&nodeid, &Report { incarnation, .. })| {
                let id = u16::try_from(nodeid).expect("configured ids are u16");
                ViewMember { id: NodeId(id), weight: self.configured[&id], incarnation }
            })
            .collect();
        self.pending = Some(View { epoch: self.agreed, members, quorate: false });
    }

    /// Hands the pending view once quorum has seen CPG's ring.
    fn try_hand(&mut self, steps: &mut Vec<Step>) {
        let Some(quorum) = self.quorum else { return };
        if quorum.ring < self.cpg_ring {
            return;
        }
        let Some(view) = self.pending.as_ref() else { return };
        let fenced =
            |nodeid: &u32| u16::try_from(*nodeid).map_or(true, |id| view.members.iter().any(|m| m.id == NodeId(id)));
        if quorum.quorate && !self.unfenced.iter().all(fenced) {
            return;
        }
        let mut view = self.pending.take().expect("checked above");
        view.quorate = quorum.quorate && self.agents_are_a_majority(&view);
        self.hand(view, steps);
    }

    /// Whether the agents of `view` carry more than half the configured
    /// weight (always, with two nodes or fewer configured: corosync's
    /// `two_node` and fencing decide there). Votequorum counts a node whose
    /// corosync runs even when its agent is dead, so a partition can be
    /// quorate while none of its agents saw the last quorate view: its view
    /// would then take an epoch below the one the others granted in, and
    /// fencing tokens would go back. Two majorities of agents share one, and
    /// that one reports the later epoch.
    #[must_use]
    pub fn agents_are_a_majority(&self, view: &View) -> bool {
        if self.configured.len() <= 2 {
            return true;
        }
        let total: u32 = self.configured.values().map(|&w| u32::from(w)).sum();
        let present: u32 = view.members.iter().map(|m| u32::from(m.weight)).sum();
        present * 2 > total
    }

    /// Hands `view` to the lock engine. A view that fences this node gives
    /// it a new incarnation for the views after (see the module docs).
    fn hand(&mut self, view: View, steps: &mut Vec<Step>) {
        let me = NodeId(self.node);
        let fences_me = !view.quorate || !view.members.iter().any(|m| m.id == me);
        self.handed = view.epoch;
        self.handed_quorate = !fences_me;
        // The members that may hold locks are those of the last quorate
        // view: a view that fences this node alone does not change who must
        // be fenced before the others go on without them. (Its corosync may
        // report quorum lost before the change that says who was lost: a
        // node lost then must still be fenced by a quorate group formed
        // right after, or that group grants while the lost node, slower to
        // see it, still does too.)
        if !fences_me {
            self.handed_members = view.members.iter().map(|m| u32::from(m.id.0)).collect();
        }
        if fences_me {
            self.incarnation = self.incarnation.wrapping_add(1);
        }
        steps.push(Step::View(view));
    }

    /// This agent, as one that last agreed to `epoch`: the agent's
    /// generation (`crate::generation`), so that the first view after a
    /// restart, of this agent or of the whole cluster, is later than every
    /// epoch it took before.
    #[must_use]
    pub fn after_epoch(mut self, epoch: u64) -> Agreement {
        self.agreed = self.agreed.max(epoch);
        self
    }

    /// Fences this node alone if it is in a quorate view (else it grants
    /// nothing already).
    fn fence_alone_if_quorate(&mut self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.handed_quorate {
            self.fence_alone(&mut steps);
        }
        steps
    }

    /// Fences this node alone: a view of itself, not quorate, at the odd
    /// epoch after the last agreed one.
    fn fence_alone(&mut self, steps: &mut Vec<Step>) {
        let epoch = self.agreed + 1;
        if epoch <= self.handed {
            return;
        }
        let weight = self.configured.get(&self.node).copied().unwrap_or(1);
        let member = ViewMember { id: NodeId(self.node), weight, incarnation: self.incarnation };
        self.hand(View { epoch, members: vec![member], quorate: false }, steps);
    }
}

#[cfg(test)]
mod tests;
