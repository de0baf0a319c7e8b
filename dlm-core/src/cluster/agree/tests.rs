//! The agreement's rounds, quorum and fencing, over a CPG group modelled in one process.

use std::collections::VecDeque;

use super::*;

/// A CPG group in one process: changes and messages delivered to every
/// member in one order, as corosync does.
struct Group {
    agents: BTreeMap<CpgMember, Agreement>,
    queue: VecDeque<(CpgMember, Message)>,
    views: BTreeMap<CpgMember, Vec<View>>,
    refused: Vec<(Refusal, Option<u32>)>,
    fence_asked: Vec<(CpgMember, u32)>,
    /// Nodes 1 to this are configured, each of weight 1.
    configured: u16,
}

fn member(nodeid: u32) -> CpgMember {
    CpgMember { nodeid, pid: 100 + nodeid }
}

impl Group {
    fn new() -> Group {
        Group::of(3)
    }

    /// A group of `configured` configured nodes.
    fn of(configured: u16) -> Group {
        Group {
            configured,
            agents: BTreeMap::new(),
            queue: VecDeque::new(),
            views: BTreeMap::new(),
            refused: Vec::new(),
            fence_asked: Vec::new(),
        }
    }

    fn apply(&mut self, at: CpgMember, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Send(message) => self.queue.push_back((at, message)),
                Step::View(view) => self.views.entry(at).or_default().push(view),
                Step::Refused(refusal, nodeid) => self.refused.push((refusal, nodeid)),
                Step::Fence(nodeid) => self.fence_asked.push((at, nodeid)),
            }
        }
    }

    /// The group becomes `members` (new ones join; `incarnation` 1000 + pid).
    fn change(&mut self, members: &[CpgMember]) {
        self.change_losing(members, &[]);
    }

    /// As [`Group::change`], `lost` having left with their corosync.
    fn change_losing(&mut self, members: &[CpgMember], lost: &[u32]) {
        self.agents.retain(|m, _| members.contains(m));
        for &m in members {
            self.agents.entry(m).or_insert_with(|| {
                let node = u16::try_from(m.nodeid).unwrap_or(0);
                let mut agent = Agreement::new(node, (1..=self.configured).map(|id| (id, 1)), 1000 + u64::from(m.pid));
                agent.joined(m);
                agent.quorum(true, 0);
                agent
            });
        }
        for &m in members {
            let steps = self.agents.get_mut(&m).expect("member").confchg(members.to_vec(), lost);
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
            self.deliver(from, message);
        }
    }

    /// Delivers one message to every member (as corosync does, in order).
    fn deliver(&mut self, from: CpgMember, message: Message) {
        let members: Vec<CpgMember> = self.agents.keys().copied().collect();
        for m in members {
            let steps = self.agents.get_mut(&m).expect("member").deliver(from, message);
            self.apply(m, steps);
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
        // One agent of three configured is not a majority, whatever
        // corosync's quorum says.
        assert_eq!(first.quorate, members.len() >= 2, "{first:?}");
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
    group.deliver(leader, round);
    let later = Message::Round(RoundId { by: member(1), seq: 99 });
    group.queue.push_front((member(1), later));
    let (from, message) = group.queue.pop_front().expect("the later round");
    group.deliver(from, message);
    // Now the answers to the first round, then to the later one.
    let answers: Vec<(CpgMember, Message)> = group.queue.drain(..).collect();
    assert_eq!(answers.len(), 4);
    for (i, (from, message)) in answers.into_iter().enumerate() {
        group.deliver(from, message);
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
    let round = match agent.confchg(vec![me], &[]).as_slice() {
        [Step::Send(Message::Round(id))] => *id,
        other => panic!("expected a round, got {other:?}"),
    };
    let _ = agent.deliver(me, Message::Round(round));
    let steps = agent.deliver(me, Message::Report { round, epoch: 0, incarnation: 7, quorate: false });
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

#[test]
fn a_lost_node_is_fenced_by_the_leader_before_any_member_takes_a_view_without_it() {
    let mut group = Group::new();
    let all = [member(1), member(2), member(3)];
    group.change(&all);
    group.run();
    let before = group.last_view(member(2)).expect("view").epoch;
    group.change_losing(&all[1..], &[1]);
    group.run();
    assert_eq!(group.fence_asked, [(member(2), 1)], "the new leader, once");
    for m in &all[1..] {
        assert_eq!(group.last_view(*m).map(|v| v.epoch), Some(before), "no view before fencing");
    }
    let steps = group.agents.get_mut(&member(2)).expect("leader").fence_done(1);
    group.apply(member(2), steps);
    group.run();
    let after = group.last_view(member(3)).expect("view");
    assert_eq!((Group::ids(after), after.quorate), (vec![2, 3], true));
    assert_eq!(group.last_view(member(2)), Some(after));
    assert!(group.agents[&member(3)].unfenced().is_empty());
}

#[test]
fn an_agent_that_exited_needs_no_fencing_and_a_group_without_quorum_fences_nobody() {
    let mut group = Group::new();
    let all = [member(1), member(2), member(3)];
    group.change(&all);
    group.run();
    group.change(&all[1..]);
    group.run();
    assert!(group.fence_asked.is_empty());
    assert_eq!(Group::ids(group.last_view(member(2)).expect("view")), [2, 3]);
    // Node 3 alone, without quorum, sees node 2 lost: it fences nobody
    // and takes its view as not quorate at once.
    let alone = [member(3)];
    group.agents.get_mut(&member(3)).expect("member").quorum(false, 50);
    group.agents.get_mut(&member(3)).expect("member").totem(50);
    group.change_losing(&alone, &[2]);
    group.run();
    assert!(group.fence_asked.is_empty(), "{:?}", group.fence_asked);
    let view = group.last_view(member(3)).expect("view");
    assert!(!view.quorate);
}

#[test]
fn a_node_that_fenced_itself_comes_back_as_a_new_incarnation() {
    let mut group = Group::new();
    let all = [member(1), member(2), member(3)];
    group.change(&all);
    group.run();
    let first = group.last_view(member(1)).expect("view").incarnation(NodeId(3));
    let steps = group.agents.get_mut(&member(3)).expect("member").quorum(false, 60);
    group.apply(member(3), steps);
    assert!(!group.last_view(member(3)).expect("view").quorate);
    let steps = group.agents.get_mut(&member(3)).expect("member").quorum(true, 61);
    group.apply(member(3), steps);
    group.change(&all);
    group.run();
    let back = group.last_view(member(1)).expect("view");
    assert_ne!(back.incarnation(NodeId(3)), first);
    assert_eq!(back.incarnation(NodeId(3)), Some(group.agents[&member(3)].incarnation()));
}

#[test]
fn a_round_says_whose_report_it_still_waits_for() {
    let mut group = Group::new();
    let all = [member(1), member(2), member(3)];
    group.change(&all);
    let (leader, round) = group.queue.pop_front().expect("the leader's round");
    group.deliver(leader, round);
    assert_eq!(group.agents[&member(1)].waiting_for(), [1, 2, 3]);
    let (from, report) = group.queue.pop_front().expect("node 1's report");
    group.deliver(from, report);
    assert_eq!(group.agents[&member(3)].waiting_for(), [2, 3]);
    group.run();
    assert!(group.agents[&member(2)].waiting_for().is_empty());
}

#[test]
fn a_lapsed_lease_fences_this_node_alone_and_it_comes_back_as_a_new_incarnation() {
    let mut group = Group::new();
    let all = [member(1), member(2), member(3)];
    group.change(&all);
    group.run();
    let first = group.last_view(member(1)).cloned().expect("view");
    let old = first.incarnation(NodeId(2)).expect("a member");
    let steps = group.agents.get_mut(&member(2)).expect("member").lease_lapsed();
    match steps.as_slice() {
        [Step::View(view)] => {
            assert_eq!((view.epoch, view.quorate, Group::ids(view)), (first.epoch + 1, false, vec![2]));
        }
        other => panic!("expected a fencing view, got {other:?}"),
    }
    assert!(group.agents.get_mut(&member(2)).expect("member").lease_lapsed().is_empty(), "once");
    // Its corosync answers again: it starts a round itself, though the
    // group did not change.
    let steps = group.agents.get_mut(&member(2)).expect("member").lease_renewed();
    group.apply(member(2), steps);
    group.run();
    for m in all {
        let view = group.last_view(m).expect("view");
        assert!(view.quorate && view.epoch > first.epoch + 1, "{view:?}");
        let again = view.incarnation(NodeId(2)).expect("back in the view");
        assert_ne!(again, old, "node 2 came back with the incarnation its clients' locks were revoked in");
    }
}

#[test]
fn a_member_that_never_reports_is_fenced_by_the_leader_once_when_asked() {
    let mut group = Group::new();
    let all = [member(1), member(2), member(3)];
    group.change(&all);
    group.run();
    // A change, and member 3 never reports (its agent is stopped): deliver
    // the round and the reports of 1 and 2 only.
    group.change(&all);
    let queued: Vec<(CpgMember, Message)> = group.queue.drain(..).collect();
    for (from, message) in queued {
        group.deliver(from, message);
    }
    let mut reports: Vec<(CpgMember, Message)> = group.queue.drain(..).filter(|(from, _)| *from != member(3)).collect();
    for (from, message) in reports.drain(..) {
        group.deliver(from, message);
    }
    let leader = group.agents.get_mut(&member(1)).expect("member");
    assert_eq!(leader.waiting_for(), vec![3]);
    assert_eq!(leader.fence_stalled(&[3]), vec![Step::Fence(3)]);
    assert!(leader.fence_stalled(&[3]).is_empty(), "once");
    assert!(leader.fence_stalled(&[2]).is_empty(), "not a member that reported");
    let other = group.agents.get_mut(&member(2)).expect("member");
    assert!(other.fence_stalled(&[3]).is_empty(), "only the leader fences");
}

#[test]
fn a_node_lost_while_this_node_had_lost_quorum_is_fenced_before_a_quorate_view_without_it() {
    // Seen in the nemesis: node 3's corosync said quorum was lost before it
    // said node 1 was lost; node 3 fenced itself alone, then formed a quorate
    // group with node 2 and took a view without node 1 at once, while node
    // 1, slower to see the split, still granted in the old view.
    let mut group = Group::new();
    let all = [member(1), member(2), member(3)];
    group.change(&all);
    group.run();
    let before = group.last_view(member(3)).expect("view").epoch;
    for m in [member(2), member(3)] {
        let steps = group.agents.get_mut(&m).expect("member").quorum(false, 0);
        group.apply(m, steps);
    }
    assert!(group.last_view(member(3)).is_some_and(|v| !v.quorate), "fenced alone");
    group.change_losing(&[member(2), member(3)], &[1]);
    for m in [member(2), member(3)] {
        let steps = group.agents.get_mut(&m).expect("member").quorum(true, 0);
        group.apply(m, steps);
    }
    group.run();
    for m in [member(2), member(3)] {
        let last = group.last_view(m).expect("view");
        assert!(!last.quorate || last.epoch <= before, "a quorate view without node 1 before it was fenced: {last:?}");
    }
    assert!(group.fence_asked.contains(&(member(2), 1)), "the leader fences node 1: {:?}", group.fence_asked);
    // Fenced: the view goes on without it.
    let steps = group.agents.get_mut(&member(2)).expect("member").fence_done(1);
    group.apply(member(2), steps);
    group.run();
    for m in [member(2), member(3)] {
        let last = group.last_view(m).expect("view");
        assert!(last.quorate && Group::ids(last) == vec![2, 3], "{last:?}");
    }
}

#[test]
fn a_quorate_partition_with_a_minority_of_agents_takes_no_quorate_view() {
    // The simulator's seed 11783, in short: five nodes configured, node 5's
    // agent never started and node 4's left the others' group unseen (its
    // corosync frozen), so nodes 1, 2 and 3 go on in views node 4 never
    // agreed to. Then node 2's agent dies too. Node 4, cut off with nodes 2
    // and 5 (their corosyncs run: votequorum counts them), would take a view
    // of itself alone as quorate, at an epoch below the one nodes 1, 2 and 3
    // granted in: fencing tokens would go back.
    let mut group = Group::of(5);
    let four = [member(1), member(2), member(3), member(4)];
    group.change(&four);
    group.run();
    assert!(group.last_view(member(4)).expect("view").quorate, "four agents of five");
    let mut stale = group.agents.remove(&member(4)).expect("member");
    group.change(&four[..3]);
    group.run();
    group.change(&[member(1), member(2), member(3), CpgMember { nodeid: 5, pid: 7 }]);
    group.run();
    group.change(&four[..3]);
    group.run();
    let granted = group.last_view(member(1)).expect("view").clone();
    assert!(granted.quorate, "three agents of five: {granted:?}");
    group.change(&[member(1), member(3)]);
    group.run();
    let two = group.last_view(member(1)).expect("view");
    assert!(!two.quorate, "two agents of five grant nothing: {two:?}");
    // Node 4 alone, its corosync quorate.
    let mut queue = stale.confchg(vec![member(4)], &[]);
    let mut views = Vec::new();
    while let Some(step) = queue.pop() {
        match step {
            Step::Send(message) => queue.extend(stale.deliver(member(4), message)),
            Step::View(view) => views.push(view),
            _ => {}
        }
    }
    let alone = views.last().expect("a view of node 4 alone");
    assert_eq!(Group::ids(alone), [4]);
    assert!(alone.epoch < granted.epoch, "behind the others, as in the seed: {alone:?} vs {granted:?}");
    assert!(!alone.quorate, "one agent of five grants nothing: {alone:?}");
}

#[test]
fn a_member_left_out_of_a_view_fences_itself_before_it_takes_the_next() {
    let mut group = Group::new();
    let (a, b, c) = (member(1), member(2), member(3));
    group.change(&[a, b, c]);
    group.run();
    // c is left out without hearing of it (stopped, and its lease did not
    // lapse: the defence behind the lease), while a and b agree without it.
    let stale = group.agents.remove(&c).expect("c is a member");
    group.change(&[a, b]);
    group.run();
    let seen = group.views[&c].len();
    group.agents.insert(c, stale);
    group.change(&[a, b, c]);
    group.run();
    let after: Vec<&View> = group.views[&c][seen..].iter().collect();
    assert_eq!(after.len(), 2, "c fences itself, then takes the merged view: {after:?}");
    assert!(!after[0].quorate && after[0].members.len() == 1, "first it fences itself: {after:?}");
    assert!(after[1].quorate && after[1].members.len() == 3);
    assert_eq!(group.views[&a].last(), Some(after[1]), "every member takes the same view");
    // A member that missed nothing takes the view at once.
    assert_eq!(group.views[&a].iter().filter(|v| !v.quorate).count(), 0);
}
