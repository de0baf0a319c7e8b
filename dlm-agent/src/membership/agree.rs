//! How the agents of one CPG group agree on each view, sans-IO: events from
//! corosync go in, messages to multicast and views for the lock engine come
//! out.
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
//!    members it has now, and multicasts `Report(id, epoch, incarnation)`:
//!    the epoch of the last view it agreed to and the incarnation of its
//!    process. A later `Round` replaces an earlier one.
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
//! **Who may be a member.** Only configured dlm nodes, each at most once (its
//! corosync node id is its dlm id): any other member of the group is left
//! out of every view and counted.

use std::collections::BTreeMap;

use dlm_core::cluster::{NodeId, View, ViewMember};

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
    /// A member's answer in a round.
    Report {
        /// The round answered.
        round: RoundId,
        /// The epoch of the last view the member agreed to (0 before any).
        epoch: u64,
        /// The member's incarnation.
        incarnation: u64,
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
    reports: BTreeMap<u32, (u64, u64)>,
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
    /// The group as of the last configuration change.
    members: Vec<CpgMember>,
    rounds_started: u64,
    round: Option<Round>,
    /// The ring the group's membership comes from (CPG's totem change).
    cpg_ring: u64,
    quorum: Option<Quorum>,
    /// A view agreed and not yet handed (waiting for quorum's ring).
    pending: Option<View>,
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
            members: Vec::new(),
            rounds_started: 0,
            round: None,
            cpg_ring: 0,
            quorum: None,
            pending: None,
        }
    }

    /// This process joined the group as `me`.
    pub fn joined(&mut self, me: CpgMember) {
        self.me = Some(me);
    }

    /// The group's members changed (CPG's configuration change).
    pub fn confchg(&mut self, members: Vec<CpgMember>) -> Vec<Step> {
        let mut steps = Vec::new();
        let valid = self.valid(&members, &mut steps);
        self.members = members;
        self.round = None;
        self.pending = None;
        if self.is_leader(&valid) {
            steps.push(self.start_round());
        }
        steps
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
        if self.pending.is_some() {
            self.try_hand(&mut steps);
        } else if self.handed_quorate && !quorate {
            self.fence_alone(&mut steps);
        } else if !was.is_some_and(|q| q.quorate) && quorate && self.handed > 0 {
            let valid = self.valid(&self.members.clone(), &mut Vec::new());
            if self.is_leader(&valid) {
                steps.push(self.start_round());
            }
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
                    }));
                }
            }
            Message::Report { round, epoch, incarnation } => {
                let Some(current) = self.round.as_mut() else { return steps };
                if current.id != round || current.expected.get(&from.nodeid) != Some(&from) {
                    return steps;
                }
                current.reports.insert(from.nodeid, (epoch, incarnation));
                if current.reports.len() == current.expected.len() {
                    let round = self.round.take().expect("checked above");
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
        let mut steps = Vec::new();
        if self.handed_quorate {
            self.fence_alone(&mut steps);
        }
        steps
    }

    /// The group's connection broke: this node fences itself.
    pub fn lost(&mut self) -> Vec<Step> {
        self.me = None;
        self.members.clear();
        self.round = None;
        self.pending = None;
        self.quorum = None;
        let mut steps = Vec::new();
        if self.handed_quorate {
            self.fence_alone(&mut steps);
        }
        steps
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

    /// Every member reported: the view of the round becomes pending.
    fn agree(&mut self, round: &Round) {
        // From the reports alone, so every member reaches the same epoch. This
        // node's report carried its `agreed`, and `handed` is at most one
        // more, so the new epoch is later than both. Agreed epochs are even:
        // the odd one after each is for a node fencing itself alone.
        let highest = round.reports.values().map(|(epoch, _)| *epoch).max().unwrap_or(0);
        self.agreed = (highest + 2) & !1;
        let members = round
            .reports
            .iter()
            .map(|(&nodeid, &(_, incarnation))| {
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
        let Some(mut view) = self.pending.take() else { return };
        view.quorate = quorum.quorate;
        self.handed = view.epoch;
        self.handed_quorate = view.quorate;
        steps.push(Step::View(view));
    }

    /// Fences this node alone: a view of itself, not quorate, at the odd
    /// epoch after the last agreed one.
    fn fence_alone(&mut self, steps: &mut Vec<Step>) {
        let epoch = self.agreed + 1;
        if epoch <= self.handed {
            return;
        }
        self.handed = epoch;
        self.handed_quorate = false;
        let weight = self.configured.get(&self.node).copied().unwrap_or(1);
        let member = ViewMember { id: NodeId(self.node), weight, incarnation: self.incarnation };
        steps.push(Step::View(View { epoch, members: vec![member], quorate: false }));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A CPG group in one process: changes and messages delivered to every
    /// member in one order, as corosync does.
    struct Group {
        agents: BTreeMap<CpgMember, Agreement>,
        queue: VecDeque<(CpgMember, Message)>,
        views: BTreeMap<CpgMember, Vec<View>>,
        refused: Vec<(Refusal, Option<u32>)>,
    }

    fn member(nodeid: u32) -> CpgMember {
        CpgMember { nodeid, pid: 100 + nodeid }
    }

    impl Group {
        fn new() -> Group {
            Group { agents: BTreeMap::new(), queue: VecDeque::new(), views: BTreeMap::new(), refused: Vec::new() }
        }

        fn apply(&mut self, at: CpgMember, steps: Vec<Step>) {
            for step in steps {
                match step {
                    Step::Send(message) => self.queue.push_back((at, message)),
                    Step::View(view) => self.views.entry(at).or_default().push(view),
                    Step::Refused(refusal, nodeid) => self.refused.push((refusal, nodeid)),
                }
            }
        }

        /// The group becomes `members` (new ones join; `incarnation` 1000 + nodeid + pid).
        fn change(&mut self, members: &[CpgMember]) {
            self.agents.retain(|m, _| members.contains(m));
            for &m in members {
                self.agents.entry(m).or_insert_with(|| {
                    let node = u16::try_from(m.nodeid).unwrap_or(0);
                    let mut agent = Agreement::new(node, (1..=5).map(|id| (id, 1)), 1000 + u64::from(m.pid));
                    agent.joined(m);
                    agent.quorum(true, 0);
                    agent
                });
            }
            for &m in members {
                let steps = self.agents.get_mut(&m).expect("member").confchg(members.to_vec());
                self.apply(m, steps);
            }
        }

        /// Delivers every queued message to every member, in order.
        fn run(&mut self) {
            while let Some((from, message)) = self.queue.pop_front() {
                if !self.agents.contains_key(&from) {
                    // Sent by a member that left: corosync delivers what it
                    // sent before leaving, which this model does not need.
                    continue;
                }
                let members: Vec<CpgMember> = self.agents.keys().copied().collect();
                for m in members {
                    let steps = self.agents.get_mut(&m).expect("member").deliver(from, message);
                    self.apply(m, steps);
                }
            }
        }

        fn last_view(&self, m: CpgMember) -> Option<&View> {
            self.views.get(&m).and_then(|v| v.last())
        }

        fn ids(view: &View) -> Vec<u16> {
            view.members.iter().map(|m| m.id.0).collect()
        }
    }

    #[test]
    fn members_joining_one_by_one_agree_on_every_view_with_strictly_increasing_epochs() {
        let mut group = Group::new();
        let mut members = Vec::new();
        for nodeid in [2, 1, 3] {
            members.push(member(nodeid));
            group.change(&members);
            group.run();
            let first = group.last_view(members[0]).expect("a view").clone();
            assert_eq!(Group::ids(&first).len(), members.len());
            assert!(first.quorate);
            for &m in &members {
                assert_eq!(group.last_view(m), Some(&first), "member {m:?} agrees");
            }
        }
        let epochs: Vec<u64> = group.views[&member(2)].iter().map(|v| v.epoch).collect();
        assert_eq!(epochs, [2, 4, 6]);
        // The joiner of the third view took it at the epoch the others reached.
        assert_eq!(group.views[&member(3)].iter().map(|v| v.epoch).collect::<Vec<_>>(), [6]);
        let view = group.last_view(member(1)).expect("view");
        assert_eq!(view.incarnation(NodeId(3)), Some(1000 + 103));
    }

    #[test]
    fn a_member_that_leaves_is_out_of_the_survivors_next_view_and_a_restart_comes_back_with_its_new_incarnation() {
        let mut group = Group::new();
        let all = [member(1), member(2), member(3)];
        group.change(&all);
        group.run();
        group.change(&all[..2]);
        group.run();
        let after = group.last_view(member(1)).expect("view").clone();
        assert_eq!(Group::ids(&after), [1, 2]);
        assert_eq!(group.last_view(member(2)), Some(&after));
        let restarted = CpgMember { nodeid: 3, pid: 999 };
        group.change(&[member(1), member(2), restarted]);
        group.run();
        let back = group.last_view(restarted).expect("view").clone();
        assert!(back.epoch > after.epoch);
        assert_eq!(back.incarnation(NodeId(3)), Some(1000 + 999));
        assert_eq!(group.last_view(member(1)), Some(&back));
    }

    #[test]
    fn a_report_sent_for_an_earlier_round_is_not_counted_in_a_later_one() {
        let mut group = Group::new();
        let all = [member(1), member(2)];
        group.change(&all);
        group.run();
        let first = group.last_view(member(1)).expect("view").epoch;
        // A round is delivered and answered; before the answers are delivered
        // another round starts (quorum regained, say).
        group.change(&all);
        let (leader, round) = group.queue.pop_front().expect("the leader's round");
        for m in all {
            let steps = group.agents.get_mut(&m).expect("member").deliver(leader, round);
            group.apply(m, steps);
        }
        let later = Message::Round(RoundId { by: member(1), seq: 99 });
        group.queue.push_front((member(1), later));
        let (from, message) = group.queue.pop_front().expect("the later round");
        for m in all {
            let steps = group.agents.get_mut(&m).expect("member").deliver(from, message);
            group.apply(m, steps);
        }
        // Now the answers to the first round, then to the later one.
        let answers: Vec<(CpgMember, Message)> = group.queue.drain(..).collect();
        assert_eq!(answers.len(), 4);
        for (i, (from, message)) in answers.into_iter().enumerate() {
            for m in all {
                let steps = group.agents.get_mut(&m).expect("member").deliver(from, message);
                group.apply(m, steps);
            }
            let views = group.views[&member(1)].len();
            assert_eq!(views, if i < 3 { 1 } else { 2 }, "after answer {i}: the first round's answers do not count");
        }
        let views = &group.views[&member(1)];
        assert_eq!(group.views[&member(2)], *views);
        assert_eq!(views[1].epoch, first + 2);
    }

    #[test]
    fn members_that_are_not_configured_or_appear_twice_are_left_out_and_counted() {
        let mut group = Group::new();
        let stranger = CpgMember { nodeid: 70_000, pid: 1 };
        let second = CpgMember { nodeid: 2, pid: 555 };
        group.change(&[member(1), member(2), member(3), stranger]);
        group.run();
        assert_eq!(Group::ids(group.last_view(member(1)).expect("view")), [1, 2, 3]);
        assert!(group.refused.contains(&(Refusal::NotConfigured, Some(70_000))));
        group.refused.clear();
        group.change(&[member(1), member(2), member(3), second]);
        group.run();
        assert_eq!(Group::ids(group.last_view(member(1)).expect("view")), [1, 3]);
        assert!(group.refused.contains(&(Refusal::DuplicateNode, Some(2))));
    }

    #[test]
    fn a_view_waits_for_quorum_to_see_its_ring_and_takes_quorums_word() {
        let mut agent = Agreement::new(1, [(1, 1), (2, 1)], 7);
        let me = member(1);
        agent.joined(me);
        assert!(agent.totem(5).is_empty());
        let round = match agent.confchg(vec![me]).as_slice() {
            [Step::Send(Message::Round(id))] => *id,
            other => panic!("expected a round, got {other:?}"),
        };
        let _ = agent.deliver(me, Message::Round(round));
        let steps = agent.deliver(me, Message::Report { round, epoch: 0, incarnation: 7 });
        assert!(steps.is_empty(), "no quorum word yet: {steps:?}");
        assert!(agent.quorum(true, 4).is_empty(), "quorum has not seen ring 5");
        match agent.quorum(false, 5).as_slice() {
            [Step::View(view)] => assert_eq!((view.epoch, view.quorate), (2, false)),
            other => panic!("expected the view, not quorate, got {other:?}"),
        }
    }

    #[test]
    fn quorum_lost_fences_this_node_alone_and_quorum_regained_brings_a_later_view() {
        let mut group = Group::new();
        let all = [member(1), member(2)];
        group.change(&all);
        group.run();
        let agreed = group.last_view(member(1)).expect("view").epoch;
        let steps = group.agents.get_mut(&member(1)).expect("member").quorum(false, 9);
        match steps.as_slice() {
            [Step::View(view)] => {
                assert_eq!((view.epoch, view.quorate, Group::ids(view)), (agreed + 1, false, vec![1]));
            }
            other => panic!("expected a fencing view, got {other:?}"),
        }
        assert!(group.agents.get_mut(&member(1)).expect("member").quorum(false, 9).is_empty(), "once");
        let steps = group.agents.get_mut(&member(1)).expect("member").quorum(true, 10);
        group.apply(member(1), steps);
        group.run();
        let back = group.last_view(member(1)).expect("view");
        assert_eq!((back.epoch, back.quorate), (agreed + 2, true));
        assert_eq!(group.last_view(member(2)).map(|v| v.epoch), Some(agreed + 2));
    }

    #[test]
    fn losing_corosync_fences_this_node() {
        let mut group = Group::new();
        group.change(&[member(1), member(2)]);
        group.run();
        let agreed = group.last_view(member(1)).expect("view").epoch;
        match group.agents.get_mut(&member(1)).expect("member").lost().as_slice() {
            [Step::View(view)] => assert_eq!((view.epoch, view.quorate), (agreed + 1, false)),
            other => panic!("expected a fencing view, got {other:?}"),
        }
    }
}
