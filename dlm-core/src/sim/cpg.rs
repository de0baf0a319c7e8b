//! A model of corosync driving the real view agreement
//! ([`crate::cluster::agree`]) on every node, as the agent drives it with
//! corosync itself (seeds 0 and 3 modulo 4).
//!
//! What is modelled is what the agreement relies on:
//! - **the ring**: the nodes whose corosync runs and can reach each other
//!   form a component; each agent of a component is told of a change in
//!   one total order (totem's ring id, then CPG's configuration change with
//!   the nodes lost to `NODEDOWN`, then votequorum's word for that ring,
//!   quorate when the component holds more than half the nodes);
//! - **failure detection**: a node crashed, cut off, or whose corosync
//!   stopped leaves its component only `DETECTION` (token + consensus)
//!   later; an agent process that dies leaves at once (`PROCDOWN`);
//! - **multicast in agreed order**: a message goes to every agent of the
//!   sender's component, appended to each one's queue in one global order;
//! - **fencing**: the leader that is asked fences a dead node in
//!   `FENCE_DELAY`; one still running (cut off, frozen) it takes to have
//!   fenced itself after the self-fencing `GRACE`;
//! - **the membership lease**: an agent whose corosync stopped answering
//!   (frozen, or the whole node paused) for longer than `LEASE_BOUND` fences
//!   itself before it handles anything else, and starts a round once its
//!   corosync answers again.
//!
//! The faults: agent processes killed, nodes crashed, partitions into two
//! sides of any size and their merge, a corosync frozen under its running
//! agent, and a whole node paused, each either shorter than the lease's
//! bound or longer than detection and the grace together (a node that
//! wakes into a newer view), and restarts as new incarnations.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crate::cluster::agree::{Agreement, CpgMember, Message, Step};
use crate::cluster::{Membership, NodeId};
use crate::time::Instant;

use crate::sim::Sim;

/// How long corosync takes to see a node gone (token + consensus).
const DETECTION: Duration = Duration::from_millis(2);
/// The lease's bound: half of detection, as the agent's.
const LEASE_BOUND: Duration = Duration::from_millis(1);
/// The survivors' self-fencing grace: detection and the lease's detection
/// (bound and one probe) after the lost node's last word.
const GRACE: Duration = Duration::from_micros(1_500);
/// How long fencing a dead node takes.
const FENCE_DELAY: Duration = Duration::from_micros(500);
/// How long a merge takes to be seen (a node back in reach).
const MERGE: Duration = Duration::from_micros(300);
/// The largest delay of one delivery.
const DELIVERY_MAX_NS: u64 = 150_000;

/// What corosync tells one agent, in order.
#[derive(Clone, Debug)]
enum Event {
    Totem(u64),
    Confchg {
        members: Vec<CpgMember>,
        lost: Vec<u32>,
    },
    Quorum {
        quorate: bool,
        ring: u64,
    },
    Deliver {
        from: CpgMember,
        message: Message,
    },
    /// Its corosync answers again after a lapse.
    Renewed,
}

/// What one agent is told at a ring change.
struct Change {
    node: usize,
    agents: Vec<CpgMember>,
    lost: Vec<u32>,
    quorate: bool,
    component: BTreeSet<usize>,
}

pub(super) struct CpgLayer {
    agreements: Vec<Option<Agreement>>,
    /// The last epoch each node agreed to, kept across its agent's restarts
    /// (the agent's generation file).
    generations: Vec<u64>,
    queues: Vec<VecDeque<(Instant, Event)>>,
    /// Whether each node runs (false once crashed, until restarted).
    node_up: Vec<bool>,
    /// The side of the partition each node is on (all 0 without one).
    side: Vec<u8>,
    pub(super) partition_heals: Option<Instant>,
    /// Since when each node's corosync has not answered (frozen, or the
    /// node paused), and until when it is frozen.
    stopped_since: Vec<Option<Instant>>,
    frozen_until: Vec<Option<Instant>>,
    /// The lease lapsed and corosync has not answered since.
    lapsed: Vec<bool>,
    /// What each agent multicast while its corosync did not answer.
    unsent: Vec<Vec<Message>>,
    /// The agents each agent was last told make up its group.
    told: Vec<Vec<CpgMember>>,
    /// The nodes of each node's component as last announced.
    component: Vec<BTreeSet<usize>>,
    ring: u64,
    /// When the ring is looked at again (a fault's detection, a merge).
    recompute: BTreeSet<Instant>,
    /// Fencing in progress: (done at, by node, nodeid fenced).
    fences: Vec<(Instant, usize, u32)>,
}

impl CpgLayer {
    pub(super) fn new(nodes: usize, weights: &[u8]) -> CpgLayer {
        let configured: Vec<(u16, u8)> = (0..nodes).map(|n| (n as u16 + 1, weights[n])).collect();
        let agreements = (0..nodes)
            .map(|n| {
                let mut agreement = Agreement::new(n as u16 + 1, configured.iter().copied(), 1).after_epoch(1);
                agreement.joined(member(n, 1));
                Some(agreement)
            })
            .collect();
        CpgLayer {
            agreements,
            generations: vec![1; nodes],
            queues: vec![VecDeque::new(); nodes],
            node_up: vec![true; nodes],
            side: vec![0; nodes],
            partition_heals: None,
            stopped_since: vec![None; nodes],
            frozen_until: vec![None; nodes],
            lapsed: vec![false; nodes],
            unsent: vec![Vec::new(); nodes],
            told: vec![Vec::new(); nodes],
            component: vec![BTreeSet::new(); nodes],
            ring: 0,
            recompute: BTreeSet::from([Instant::ZERO]),
            fences: Vec::new(),
        }
    }

    /// When something is next due here.
    pub(super) fn next_at(&self, paused_until: &[Instant]) -> Option<Instant> {
        let queued =
            self.queues.iter().enumerate().filter_map(|(n, q)| q.front().map(|(at, _)| (*at).max(paused_until[n])));
        let leases = (0..self.queues.len()).filter_map(|n| self.lease_due(n, paused_until));
        let thaws = self.frozen_until.iter().flatten().copied();
        let fences = self.fences.iter().map(|(at, _, _)| *at);
        queued
            .chain(leases)
            .chain(thaws)
            .chain(fences)
            .chain(self.recompute.first().copied())
            .chain(self.partition_heals)
            .min()
    }

    /// When node `n`'s agent notices its lease lapsed, if it will.
    fn lease_due(&self, n: usize, paused_until: &[Instant]) -> Option<Instant> {
        let since = self.stopped_since[n]?;
        (!self.lapsed[n] && self.agreements[n].is_some())
            .then(|| since.saturating_add(LEASE_BOUND).max(paused_until[n]))
    }

    /// Nothing is due or in progress, and no fault is open.
    pub(super) fn settled(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
            && self.recompute.is_empty()
            && self.fences.is_empty()
            && self.partition_heals.is_none()
            && self.stopped_since.iter().all(Option::is_none)
    }

    /// Whether node `n`'s corosync is in the ring at `now`: a corosync
    /// stopped for less than detection takes still counts.
    fn in_ring(&self, n: usize, now: Instant) -> bool {
        self.node_up[n] && self.stopped_since[n].is_none_or(|since| now.saturating_duration_since(since) < DETECTION)
    }
}

impl Sim {
    /// Whether node `n` is paused past the lease's bound (CPG model): what
    /// its engine holds is stale, and it fences itself before it does
    /// anything when it runs again, so no check counts it meanwhile.
    pub(super) fn frozen_out(&self, n: usize) -> bool {
        let Some(cpg) = self.cpg.as_ref() else { return false };
        let past_bound = |since: Instant| self.now.saturating_duration_since(since) >= LEASE_BOUND;
        let paused = self.members.paused(n, self.now) && past_bound(self.members.paused_from[n]);
        // Woken, or its corosync stopped, and its lapse not handled yet.
        let lapse_due = cpg.stopped_since[n].is_some_and(past_bound) && !cpg.lapsed[n];
        paused || lapse_due
    }
}

impl Sim {
    /// Whether node `n` has just woken from a pause of agent and corosync
    /// together past the lease's bound, and not run yet: its agent fences
    /// itself (revoking its clients' locks) before anything else when it
    /// does, so until then it is still as good as paused.
    pub(super) fn woken_before_its_lapse(&self, n: usize) -> bool {
        let Some(cpg) = self.cpg.as_ref() else { return false };
        let from = self.members.paused_from[n];
        !self.members.paused(n, self.now)
            && cpg.stopped_since[n] == Some(from)
            && !cpg.lapsed[n]
            && self.members.paused_until[n].saturating_duration_since(from) >= LEASE_BOUND
    }
}

/// The CPG member of node `n`'s agent of incarnation `incarnation`.
fn member(n: usize, incarnation: u64) -> CpgMember {
    CpgMember { nodeid: n as u32 + 1, pid: u32::try_from(incarnation).unwrap_or(u32::MAX) }
}

impl Sim {
    fn cpg(&mut self) -> &mut CpgLayer {
        self.cpg.as_mut().expect("the CPG model runs")
    }

    /// Appends `event` to node `n`'s queue, after what is there.
    fn enqueue(&mut self, n: usize, event: Event) {
        let delay = Duration::from_nanos(self.rng.below(DELIVERY_MAX_NS));
        let now = self.now;
        let queue = &mut self.cpg().queues[n];
        let at = now.saturating_add(delay).max(queue.back().map_or(Instant::ZERO, |(at, _)| *at));
        queue.push_back((at, event));
    }

    /// Looks at the ring: each component whose agents changed is told, in
    /// one order, its new ring, configuration and quorum.
    fn recompute_ring(&mut self) {
        let n = self.nodes.len();
        let cpg = self.cpg.as_ref().expect("the CPG model runs");
        let mut components: Vec<BTreeSet<usize>> = Vec::new();
        for x in (0..n).filter(|&x| cpg.in_ring(x, self.now)) {
            match components.iter_mut().find(|c| c.first().is_some_and(|&y| cpg.side[y] == cpg.side[x])) {
                Some(c) => {
                    c.insert(x);
                }
                None => components.push(BTreeSet::from([x])),
            }
        }
        // Who is told what, decided before anything is queued.
        let mut changes: Vec<Change> = Vec::new();
        for component in components {
            let agents: Vec<CpgMember> = component
                .iter()
                .filter(|&&x| cpg.agreements[x].is_some())
                .map(|&x| member(x, self.members.incarnations[x]))
                .collect();
            let quorate = component.len() * 2 > n;
            for &x in &component {
                if cpg.agreements[x].is_none() || (cpg.told[x] == agents && cpg.component[x] == component) {
                    continue;
                }
                let lost = cpg.component[x].iter().filter(|y| !component.contains(y)).map(|&y| y as u32 + 1).collect();
                changes.push(Change { node: x, agents: agents.clone(), lost, quorate, component: component.clone() });
            }
        }
        // A corosync out of the ring (stopped past detection) has left its
        // group: when it is back, it is told the whole group anew.
        let now = self.now;
        let cpg = self.cpg();
        for x in 0..n {
            if cpg.node_up[x] && !cpg.in_ring(x, now) {
                cpg.told[x].clear();
                cpg.component[x].clear();
            }
        }
        if changes.is_empty() {
            return;
        }
        self.cpg().ring += 1;
        let ring = self.cpg().ring;
        for Change { node: x, agents, lost, quorate, component } in changes {
            self.enqueue(x, Event::Totem(ring));
            self.enqueue(x, Event::Confchg { members: agents.clone(), lost });
            self.enqueue(x, Event::Quorum { quorate, ring });
            let cpg = self.cpg();
            cpg.told[x] = agents;
            cpg.component[x] = component;
        }
    }

    /// Node `n`'s agent multicasts `message` to its group as its corosync
    /// knows it now.
    fn multicast(&mut self, n: usize, message: Message) {
        let cpg = self.cpg.as_ref().expect("the CPG model runs");
        let from = member(n, self.members.incarnations[n]);
        // Back from outside the ring and not told its group yet, it is
        // alone in a ring of its own.
        let mut to: Vec<usize> = cpg.component[n].iter().copied().filter(|&y| cpg.agreements[y].is_some()).collect();
        if to.is_empty() {
            to.push(n);
        }
        for y in to {
            self.enqueue(y, Event::Deliver { from, message });
        }
    }

    /// Carries out what node `n`'s agreement asked for.
    fn apply_steps(&mut self, n: usize, steps: Vec<Step>) -> Result<(), String> {
        for step in steps {
            match step {
                Step::Send(message) => {
                    if self.cpg().stopped_since[n].is_some() {
                        // Its corosync does not answer: the message waits
                        // in the agent's connection until it does.
                        self.cpg().unsent[n].push(message);
                        continue;
                    }
                    self.multicast(n, message);
                }
                Step::View(view) => {
                    self.report.faults.views += 1;
                    self.log(1, || format!("node {} view {view:?}", n + 1));
                    self.nodes[n].handle_view(self.now, &view, |_| true).map_err(|e| {
                        format!("at {:?}: node {} refused view {}: {e}", self.elapsed(), n + 1, view.epoch)
                    })?;
                    if self.nodes[n].is_fenced() {
                        self.report.faults.fenced += 1;
                    }
                    let cpg = self.cpg();
                    cpg.generations[n] = cpg.generations[n].max(view.epoch);
                    self.after(n)?;
                }
                Step::Refused(..) => {}
                Step::Fence(nodeid) => {
                    let target = nodeid as usize - 1;
                    let delay = if self.cpg().node_up[target] { GRACE } else { FENCE_DELAY };
                    let at = self.now.saturating_add(delay);
                    self.cpg().fences.push((at, n, nodeid));
                }
            }
        }
        Ok(())
    }

    /// Before node `n`'s agent handles anything: a lease that lapsed fences
    /// it first (a whole node paused is seen here, when it runs again), and
    /// a corosync that answers again (a pause over) renews it.
    pub(super) fn check_lease(&mut self, n: usize) -> Result<(), String> {
        let Some(cpg) = self.cpg.as_ref() else { return Ok(()) };
        let Some(since) = cpg.stopped_since[n] else { return Ok(()) };
        if cpg.agreements[n].is_none() || self.members.paused(n, self.now) {
            return Ok(());
        }
        if !cpg.lapsed[n] && self.now.saturating_duration_since(since) >= LEASE_BOUND {
            self.cpg().lapsed[n] = true;
            self.log(1, || format!("node {} lease lapsed", n + 1));
            let steps = self.cpg().agreements[n].as_mut().expect("checked").lease_lapsed();
            self.apply_steps(n, steps)?;
        }
        if self.cpg().frozen_until[n].is_none() {
            // A pause is over: corosync runs again.
            self.thaw(n);
        }
        Ok(())
    }

    /// Node `n`'s corosync answers again. One that was out of the ring
    /// finds its ring gone: before anything it sends, it delivers a
    /// configuration of itself alone (virtual synchrony: what it sends now
    /// is not delivered in the old configuration), and merges later.
    fn thaw(&mut self, n: usize) {
        let now = self.now;
        let nodes = self.nodes.len();
        let cpg = self.cpg();
        cpg.stopped_since[n] = None;
        cpg.frozen_until[n] = None;
        cpg.recompute.insert(now.saturating_add(MERGE));
        if cpg.told[n].is_empty() && cpg.agreements[n].is_some() {
            cpg.ring += 1;
            let ring = cpg.ring;
            let me = member(n, self.members.incarnations[n]);
            self.enqueue(n, Event::Totem(ring));
            self.enqueue(n, Event::Confchg { members: vec![me], lost: Vec::new() });
            self.enqueue(n, Event::Quorum { quorate: 2 > nodes, ring });
            let cpg = self.cpg();
            cpg.told[n] = vec![me];
            cpg.component[n] = BTreeSet::from([n]);
        }
        for message in std::mem::take(&mut self.cpg().unsent[n]) {
            self.multicast(n, message);
        }
        let cpg = self.cpg();
        if cpg.lapsed[n] {
            cpg.lapsed[n] = false;
            self.enqueue(n, Event::Renewed);
        }
    }

    /// Carries out what is due: ring changes, fencing done, frozen corosyncs
    /// continued, lapsed leases, and every node's due events in order.
    pub(super) fn deliver_cpg(&mut self) -> Result<(), String> {
        let now = self.now;
        while self.cpg().recompute.first().is_some_and(|&at| at <= now) {
            self.cpg().recompute.pop_first();
            self.recompute_ring();
        }
        if self.cpg().partition_heals.is_some_and(|at| at <= now) {
            self.heal_partition();
        }
        for n in 0..self.nodes.len() {
            if self.cpg().frozen_until[n].is_some_and(|at| at <= now) {
                // The agent notices a lapse before its corosync answers again.
                self.check_lease(n)?;
                self.cpg().frozen_until[n] = None;
                if self.cpg().agreements[n].is_some() {
                    self.check_lease(n)?;
                } else {
                    self.thaw(n);
                }
            }
        }
        let due: Vec<(usize, u32)> =
            self.cpg().fences.iter().filter(|(at, _, _)| *at <= now).map(|&(_, by, nodeid)| (by, nodeid)).collect();
        self.cpg().fences.retain(|(at, _, _)| *at > now);
        for (by, nodeid) in due {
            if let Some(agreement) = self.cpg().agreements[by].as_mut() {
                let steps = agreement.fence_done(nodeid);
                self.apply_steps(by, steps)?;
            }
        }
        for n in 0..self.nodes.len() {
            if self.members.paused(n, now) {
                continue;
            }
            self.check_lease(n)?;
            while self.cpg().queues[n].front().is_some_and(|(at, _)| *at <= now) {
                let (_, event) = self.cpg().queues[n].pop_front().expect("front exists");
                let Some(agreement) = self.cpg().agreements[n].as_mut() else { continue };
                let steps = match event {
                    Event::Totem(ring) => agreement.totem(ring),
                    Event::Confchg { members, lost } => agreement.confchg(members, &lost),
                    Event::Quorum { quorate, ring } => agreement.quorum(quorate, ring),
                    Event::Deliver { from, message } => agreement.deliver(from, message),
                    Event::Renewed => agreement.lease_renewed(),
                };
                self.apply_steps(n, steps)?;
            }
        }
        Ok(())
    }

    /// Node `x`'s agent process is gone (its corosync too, when
    /// `node_down`): with the process its clients and events go; the others
    /// see it gone at once, or (a node) after detection.
    pub(super) fn cpg_gone(&mut self, x: usize, node_down: bool) {
        self.log(1, || {
            format!("node {} {} crashes", x + 1, if node_down { "(the whole node)" } else { "(its agent)" })
        });
        let now = self.now;
        let cpg = self.cpg();
        cpg.agreements[x] = None;
        cpg.queues[x].clear();
        cpg.told[x].clear();
        cpg.component[x].clear();
        cpg.lapsed[x] = false;
        cpg.unsent[x].clear();
        if node_down {
            cpg.node_up[x] = false;
            cpg.stopped_since[x] = None;
            cpg.frozen_until[x] = None;
            cpg.recompute.insert(now.saturating_add(DETECTION));
        } else {
            cpg.recompute.insert(now);
        }
    }

    /// Node `x` starts again (its corosync too, if it was down) with a new
    /// agent, which joins the group.
    pub(super) fn cpg_restart(&mut self, x: usize) -> Membership {
        let now = self.now;
        let incarnation = self.members.incarnations[x];
        let weights = self.weights();
        let configured: Vec<(u16, u8)> = (0..self.nodes.len()).map(|n| (n as u16 + 1, weights[n])).collect();
        let cpg = self.cpg();
        let mut agreement =
            Agreement::new(x as u16 + 1, configured.iter().copied(), incarnation).after_epoch(cpg.generations[x]);
        agreement.joined(member(x, incarnation));
        cpg.agreements[x] = Some(agreement);
        cpg.node_up[x] = true;
        cpg.stopped_since[x] = None;
        cpg.frozen_until[x] = None;
        cpg.recompute.insert(now.saturating_add(MERGE));
        let members =
            configured.iter().map(|&(id, weight)| crate::cluster::Member { id: NodeId(id), weight }).collect();
        Membership::new(members, 0).expect("the configured members are valid")
    }

    /// The nodes up split into two sides that cannot reach each other
    /// (corosync's ring and the agents' links alike) until the cut heals.
    pub(super) fn cpg_partition(&mut self) {
        let cpg = self.cpg.as_ref().expect("the CPG model runs");
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&x| cpg.node_up[x]).collect();
        if up.len() < 2 {
            return;
        }
        // Each node up goes to side 1 or 2, both sides non-empty.
        let mut sides: Vec<u8> = up.iter().map(|_| 1 + self.rng.below(2) as u8).collect();
        if sides.iter().all(|&s| s == sides[0]) {
            let flip = self.rng.below(up.len() as u64) as usize;
            sides[flip] = 3 - sides[flip];
        }
        self.report.faults.partitions += 1;
        let heal = self.now.saturating_add(Duration::from_micros(3_000 + self.rng.below(8_000)));
        for (i, &x) in up.iter().enumerate() {
            self.cpg().side[x] = sides[i];
        }
        for (i, &x) in up.iter().enumerate() {
            for (j, &y) in up.iter().enumerate() {
                if x < y && sides[i] != sides[j] && !self.is_cut(x, y) {
                    self.cuts.push((x, y, heal));
                }
            }
        }
        self.log(1, || format!("partition {sides:?} of nodes {up:?} (0-based) until {heal:?}"));
        let now = self.now;
        let cpg = self.cpg();
        cpg.partition_heals = Some(heal);
        cpg.recompute.insert(now.saturating_add(DETECTION));
    }

    /// The partition heals: the sides merge.
    pub(super) fn heal_partition(&mut self) {
        let now = self.now;
        let cpg = self.cpg();
        cpg.partition_heals = None;
        cpg.side.iter_mut().for_each(|s| *s = 0);
        cpg.recompute.insert(now.saturating_add(MERGE));
        self.cuts.retain(|&(_, _, until)| until > now);
    }

    /// Node `x`'s corosync stops for `length` under its running agent.
    pub(super) fn cpg_freeze(&mut self, x: usize, length: Duration) {
        self.log(1, || format!("node {} corosync frozen for {length:?}", x + 1));
        let now = self.now;
        let cpg = self.cpg();
        if !cpg.node_up[x] || cpg.stopped_since[x].is_some() {
            return;
        }
        cpg.stopped_since[x] = Some(now);
        cpg.frozen_until[x] = Some(now.saturating_add(length));
        cpg.recompute.insert(now.saturating_add(DETECTION));
    }

    /// Node `x` (agent and corosync) is paused for `length`.
    pub(super) fn cpg_pause(&mut self, x: usize, length: Duration) {
        self.log(1, || format!("node {} paused for {length:?}", x + 1));
        let now = self.now;
        self.members.paused_from[x] = now;
        self.members.paused_until[x] = now.saturating_add(length);
        let cpg = self.cpg();
        if cpg.node_up[x] && cpg.stopped_since[x].is_none() {
            cpg.stopped_since[x] = Some(now);
            cpg.recompute.insert(now.saturating_add(DETECTION));
        }
    }

    /// The faults end: partitions heal, frozen corosyncs continue.
    pub(super) fn cpg_end_faults(&mut self) {
        if self.cpg().partition_heals.is_some() {
            self.heal_partition();
        }
        for x in 0..self.nodes.len() {
            if self.cpg().frozen_until[x].is_some() {
                let now = self.now;
                self.cpg().frozen_until[x] = Some(now);
            }
        }
    }
}
