//! The deadlock coordinator role: cycles of waits that span masters.
//!
//! Every node with waiting requests reports its wait-for edges to the
//! coordinator (the lowest member id) every
//! [`crate::cluster::ClusterConfig::deadlock_interval`]. Cycles within one
//! master are found at once by its engine; the coordinator searches the
//! union of the latest reports for cycles across masters.
//!
//! Reports are sent at different times, so their union may hold a cycle
//! that never existed: an edge that was gone before another appeared. A
//! cycle found is therefore only a candidate: the coordinator asks every
//! master on it to confirm its edges of the cycle (`ConfirmEdges`), and
//! chooses a victim only when all have. An edge names its wait and the very
//! blocker in the way (a lock granted or waiting anew is another blocker), so
//! an edge confirmed was there all along from its report to its confirmation;
//! every report was made before the search and every confirmation after it,
//! so at the moment of the search the whole cycle existed at once. One
//! candidate is confirmed at a time; one whose answers do not come within
//! [`PROBE_TIMEOUT_INTERVALS`] report intervals is given up.
//!
//! [`Coordinator`] is the state of both sides (this node's reporting, and the
//! reports and the candidate it has as coordinator) and the search, with no
//! messages; the `ClusterNode` methods below carry them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::cluster::ClusterNode;
use crate::cluster::message::{NodeId, PeerMessage, RemoteEdge, WAIT_EDGES_MAX};
use crate::deadlock::{self, Blocker, Edge, Search, WaitForGraph, WaitRef};
use crate::ids::{LockspaceId, SessionId};
use crate::time::Instant;

/// What the coordinator decided, for the simulator's checker (which knows
/// every node's real waits at the moment a candidate cycle was found).
#[cfg(feature = "sim")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadlockEvent {
    /// A cycle across masters was found in the reports: each of its edges
    /// with the master that reported it and, for the edges of this node's
    /// own engine, whether the engine has that edge now (`None` for other
    /// masters' edges: the checker looks at their engines itself).
    Candidate {
        /// Numbers the candidates of this coordinator.
        probe: u64,
        /// The cycle's edges.
        edges: Vec<(NodeId, RemoteEdge, Option<bool>)>,
    },
    /// A request of the candidate's cycle chosen as its victim.
    Victim {
        /// The candidate.
        probe: u64,
        /// The victim's master.
        master: NodeId,
        /// The victim's wait.
        wait: WaitRef,
    },
}

/// Report intervals a candidate may wait for its confirmations before it
/// is given up (a master that does not answer must not stop the search
/// for ever; its waits are reported again).
pub const PROBE_TIMEOUT_INTERVALS: u32 = 4;

#[derive(Default)]
pub(super) struct Coordinator {
    /// When this node's next report is due.
    pub(super) report_due: Option<Instant>,
    /// Whether the last report to the coordinator had edges.
    reported_edges: bool,
    /// As coordinator: the latest report from each node.
    reports: BTreeMap<NodeId, Vec<RemoteEdge>>,
    /// The candidates found so far.
    probes: u64,
    /// The candidate whose edges the masters are confirming.
    probe: Option<Probe>,
    /// Candidates and victims, for the simulator's checker.
    #[cfg(feature = "sim")]
    pub(super) log: Vec<DeadlockEvent>,
}

/// A candidate waiting for its masters' confirmations.
struct Probe {
    number: u64,
    victim: (NodeId, WaitRef),
    /// The masters that have not confirmed yet.
    awaiting: BTreeSet<NodeId>,
    /// When it gives up.
    until: Instant,
}

impl Coordinator {
    /// Forgets what the last epoch reported and probed (a new view starts
    /// over); probe numbers keep growing.
    pub(super) fn reset(&mut self) {
        self.report_due = None;
        self.reported_edges = false;
        self.reports.clear();
        self.probe = None;
    }

    /// Takes a node's report (the coordinator's side). Returns a candidate
    /// when the reports now show a cycle across masters and no other
    /// candidate is being confirmed; the reports used are then dropped, so a
    /// cycle is acted on once.
    pub(super) fn receive(&mut self, now: Instant, from: NodeId, mut edges: Vec<RemoteEdge>) -> Option<Candidate> {
        edges.truncate(WAIT_EDGES_MAX);
        if edges.is_empty() {
            self.reports.remove(&from);
            return None;
        }
        self.reports.insert(from, edges);
        if self.probe.as_ref().is_some_and(|probe| now < probe.until) {
            return None;
        }
        self.probe = None;
        let candidate = self.find_candidate()?;
        self.reports.clear();
        Some(candidate)
    }

    /// Waits for the confirmations of a candidate's masters other than this node.
    pub(super) fn start_probe(&mut self, candidate: &Candidate, awaiting: BTreeSet<NodeId>, until: Instant) {
        self.probe = Some(Probe { number: candidate.probe, victim: candidate.victim, awaiting, until });
    }

    /// A master's answer. Returns the candidate's number and victim once
    /// every master has confirmed; a refusal gives the candidate up.
    pub(super) fn answer(&mut self, from: NodeId, probe: u64, confirmed: bool) -> Option<(u64, (NodeId, WaitRef))> {
        let current = self.probe.as_mut().filter(|p| p.number == probe && p.awaiting.contains(&from))?;
        if !confirmed {
            self.probe = None;
            return None;
        }
        current.awaiting.remove(&from);
        if !current.awaiting.is_empty() {
            return None;
        }
        let done = self.probe.take()?;
        Some((done.number, done.victim))
    }

    /// The search over every node's latest edges: a cycle across masters.
    fn find_candidate(&mut self) -> Option<Candidate> {
        let graph = ReportedGraph::new(&self.reports);
        let mut roots: Vec<SessionId> = graph.edges.keys().copied().collect();
        roots.sort_unstable();
        let Search::Cycle(cycle) = deadlock::find_cycle(&graph, &roots, u32::MAX) else { return None };
        let masters: HashSet<NodeId> = cycle.iter().map(|w| graph.waits[w.lock as usize].0).collect();
        if masters.len() < 2 {
            // A cycle within one master is that master's to find; this one is stale.
            return None;
        }
        let victim = cycle
            .iter()
            .max_by_key(|w| (w.seq, graph.waits[w.lock as usize].0))
            .map(|w| graph.waits[w.lock as usize])
            .expect("a cycle has waits");
        // Each wait leaves its owner for the owner of the next wait on the cycle.
        let edges: Vec<(NodeId, RemoteEdge)> = (0..cycle.len())
            .map(|i| {
                let (at, next) = (cycle[i].lock as usize, cycle[(i + 1) % cycle.len()].lock as usize);
                let (master, wait) = graph.waits[at];
                let blocker = graph.blockers[at].iter().find(|b| b.0 == graph.owners[next]).map(|b| b.1);
                let blocker = blocker.expect("a cycle's edge was reported");
                (master, RemoteEdge { from: graph.owners[at], to: graph.owners[next], wait, blocker })
            })
            .collect();
        // Each master confirms every reported blocker of its cycle edges.
        let mut confirm: BTreeMap<NodeId, Vec<RemoteEdge>> = BTreeMap::new();
        for &(master, edge) in &edges {
            let reported = self.reports.get(&master).into_iter().flatten();
            let same = reported.filter(|e| e.from == edge.from && e.to == edge.to && e.wait == edge.wait);
            confirm.entry(master).or_default().extend(same);
        }
        self.probes += 1;
        Some(Candidate { probe: self.probes, confirm, victim })
    }
}

/// A cycle across masters found in the reports.
pub(super) struct Candidate {
    /// Its number.
    pub(super) probe: u64,
    /// What each master is asked to confirm: its reported edges of the
    /// cycle, with every blocker it reported for them.
    pub(super) confirm: BTreeMap<NodeId, Vec<RemoteEdge>>,
    /// The request to fail: the youngest wait (ties: the higher master id).
    pub(super) victim: (NodeId, WaitRef),
}

/// The union of the nodes' reported edges, with each wait renamed to an
/// index into `waits` (which remembers its master and its own reference).
struct ReportedGraph {
    edges: HashMap<SessionId, Vec<Edge>>,
    waits: Vec<(NodeId, WaitRef)>,
    /// The session each wait belongs to, by the same index.
    owners: Vec<SessionId>,
    /// The sessions each wait was reported to wait for, with a blocker each.
    blockers: Vec<Vec<(SessionId, Blocker)>>,
}

impl ReportedGraph {
    fn new(reports: &BTreeMap<NodeId, Vec<RemoteEdge>>) -> ReportedGraph {
        let mut graph =
            ReportedGraph { edges: HashMap::new(), waits: Vec::new(), owners: Vec::new(), blockers: Vec::new() };
        let mut index: HashMap<(NodeId, WaitRef), u32> = HashMap::new();
        for (&node, edges) in reports {
            for edge in edges {
                let next = u32::try_from(graph.waits.len()).unwrap_or(u32::MAX);
                let i = *index.entry((node, edge.wait)).or_insert_with(|| {
                    graph.waits.push((node, edge.wait));
                    graph.owners.push(edge.from);
                    graph.blockers.push(Vec::new());
                    next
                });
                graph.blockers[i as usize].push((edge.to, edge.blocker));
                let wait = WaitRef { lockspace: LockspaceId(u32::from(node.0)), lock: i, seq: edge.wait.seq };
                graph.edges.entry(edge.from).or_default().push(Edge { to: edge.to, wait, blocker: edge.blocker });
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

impl ClusterNode {
    /// Schedules this node's next report, if it has waiters or must say it
    /// has none any more.
    pub(super) fn schedule_deadlock_report(&mut self, now: Instant) {
        if self.links.is_empty() || self.coordinator.report_due.is_some() {
            return;
        }
        if self.engine.has_waiters() || self.coordinator.reported_edges {
            self.coordinator.report_due = Some(now.saturating_add(self.config.deadlock_interval));
        }
    }

    /// Sends this node's wait-for edges to the coordinator (or takes them,
    /// as the coordinator).
    pub(super) fn report_wait_edges(&mut self, now: Instant) {
        let mut edges: Vec<RemoteEdge> = self
            .engine
            .wait_edges()
            .into_iter()
            .map(|(from, edge)| RemoteEdge { from, to: edge.to, wait: edge.wait, blocker: edge.blocker })
            .collect();
        edges.truncate(WAIT_EDGES_MAX);
        if edges.is_empty() && !self.coordinator.reported_edges {
            return;
        }
        self.coordinator.reported_edges = !edges.is_empty();
        let coordinator = self.config.membership.coordinator();
        if coordinator == self.config.node {
            self.on_wait_edges(now, coordinator, edges);
        } else {
            self.send(now, coordinator, PeerMessage::WaitEdges { edges });
        }
    }

    /// A node's wait-for edges, at the coordinator: a candidate cycle found
    /// goes to its masters for confirmation (this node's own edges are
    /// confirmed at once).
    pub(super) fn on_wait_edges(&mut self, now: Instant, from: NodeId, edges: Vec<RemoteEdge>) {
        let Some(candidate) = self.coordinator.receive(now, from, edges) else { return };
        #[cfg(feature = "sim")]
        self.log_candidate(&candidate);
        let me = self.config.node;
        if candidate.confirm.get(&me).is_some_and(|edges| !self.engine_confirms(edges)) {
            return;
        }
        let awaiting: BTreeSet<NodeId> = candidate.confirm.keys().copied().filter(|&m| m != me).collect();
        if awaiting.is_empty() {
            self.fail_victim(now, candidate.probe, candidate.victim);
            return;
        }
        for &master in &awaiting {
            let edges = candidate.confirm[&master].clone();
            self.send(now, master, PeerMessage::ConfirmEdges { probe: candidate.probe, edges });
        }
        let until = now.saturating_add(self.config.deadlock_interval * PROBE_TIMEOUT_INTERVALS);
        self.coordinator.start_probe(&candidate, awaiting, until);
    }

    /// The coordinator asks whether edges of this node's report are still there.
    pub(super) fn on_confirm_edges(&mut self, now: Instant, from: NodeId, probe: u64, edges: &[RemoteEdge]) {
        let confirmed = self.engine_confirms(edges);
        self.send(now, from, PeerMessage::EdgesConfirmed { probe, confirmed });
    }

    /// A master's answer about a candidate, at the coordinator.
    pub(super) fn on_edges_confirmed(&mut self, now: Instant, from: NodeId, probe: u64, confirmed: bool) {
        if let Some((probe, victim)) = self.coordinator.answer(from, probe, confirmed) {
            self.fail_victim(now, probe, victim);
        }
    }

    /// Whether, for each wait and session waited for among `edges`, one of
    /// the blockers listed is still in the way in this node's engine.
    fn engine_confirms(&self, edges: &[RemoteEdge]) -> bool {
        edges.iter().all(|edge| {
            edges
                .iter()
                .filter(|e| e.from == edge.from && e.to == edge.to && e.wait == edge.wait)
                .any(|e| self.engine.has_wait_edge(e.from, &Edge { to: e.to, wait: e.wait, blocker: e.blocker }))
        })
    }

    /// Fails a confirmed cycle's victim, at its master (which fails it only
    /// if that wait is still there).
    fn fail_victim(&mut self, now: Instant, probe: u64, (master, wait): (NodeId, WaitRef)) {
        #[cfg(feature = "sim")]
        self.coordinator.log.push(DeadlockEvent::Victim { probe, master, wait });
        // The candidate's number serves only the simulator's log.
        let _ = probe;
        self.stats.deadlock_victims += 1;
        if master == self.config.node {
            self.engine.abort_wait(now, wait);
        } else {
            self.send(now, master, PeerMessage::AbortWait { wait });
        }
    }
}

#[cfg(feature = "sim")]
impl ClusterNode {
    fn log_candidate(&mut self, candidate: &Candidate) {
        let me = self.config.node;
        let edges = candidate
            .confirm
            .iter()
            .flat_map(|(&master, edges)| edges.iter().map(move |&edge| (master, edge)))
            .map(|(master, edge)| {
                // Judged as the simulator's checker judges the others' (`waits_for`).
                let exists = (master == me).then(|| self.engine.waits_for(edge.from, &edge.wait, edge.to));
                (master, edge, exists)
            })
            .collect();
        self.coordinator.log.push(DeadlockEvent::Candidate { probe: candidate.probe, edges });
    }

    /// The coordinator's candidates and victims since the last call (for
    /// the simulator's checker).
    pub fn drain_deadlock_events(&mut self) -> Vec<DeadlockEvent> {
        std::mem::take(&mut self.coordinator.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(node: u16, serial: u64) -> SessionId {
        NodeId(node).session(serial)
    }

    fn wait(lock: u32, seq: u64) -> WaitRef {
        WaitRef { lockspace: LockspaceId(0), lock, seq }
    }

    fn edge(from: SessionId, to: SessionId, wait: WaitRef) -> RemoteEdge {
        RemoteEdge { from, to, wait, blocker: Blocker { lock: 1, token: 2, seq: 3 } }
    }

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    /// Node 1 reports that b waits for a; node 2 that a waits for b.
    fn cycle_across_nodes_1_and_2(coordinator: &mut Coordinator) -> Candidate {
        let (a, b) = (s(1, 1), s(2, 1));
        assert!(coordinator.receive(at(0), NodeId(1), vec![edge(b, a, wait(7, 10))]).is_none());
        coordinator.receive(at(0), NodeId(2), vec![edge(a, b, wait(3, 12))]).expect("a cycle")
    }

    #[test]
    fn a_cycle_across_two_masters_is_a_candidate_whose_edges_each_master_confirms() {
        let mut coordinator = Coordinator::default();
        let candidate = cycle_across_nodes_1_and_2(&mut coordinator);
        let (a, b) = (s(1, 1), s(2, 1));
        assert_eq!(candidate.victim, (NodeId(2), wait(3, 12)), "the youngest wait");
        let confirm: Vec<(NodeId, Vec<RemoteEdge>)> = candidate.confirm.clone().into_iter().collect();
        assert_eq!(
            confirm,
            vec![(NodeId(1), vec![edge(b, a, wait(7, 10))]), (NodeId(2), vec![edge(a, b, wait(3, 12))])]
        );
        assert!(coordinator.reports.is_empty(), "the reports used are dropped");
    }

    #[test]
    fn the_victim_is_chosen_only_when_every_master_has_confirmed() {
        let mut coordinator = Coordinator::default();
        let candidate = cycle_across_nodes_1_and_2(&mut coordinator);
        coordinator.start_probe(&candidate, [NodeId(1), NodeId(2)].into(), at(20));
        assert_eq!(coordinator.answer(NodeId(3), candidate.probe, true), None, "not asked");
        assert_eq!(coordinator.answer(NodeId(1), candidate.probe + 1, true), None, "another candidate");
        assert_eq!(coordinator.answer(NodeId(1), candidate.probe, true), None, "node 2 has not answered");
        assert_eq!(coordinator.answer(NodeId(2), candidate.probe, true), Some((candidate.probe, candidate.victim)));
        assert_eq!(coordinator.answer(NodeId(2), candidate.probe, true), None, "acted on once");
    }

    #[test]
    fn one_refusal_gives_the_candidate_up() {
        let mut coordinator = Coordinator::default();
        let candidate = cycle_across_nodes_1_and_2(&mut coordinator);
        coordinator.start_probe(&candidate, [NodeId(1), NodeId(2)].into(), at(20));
        assert_eq!(coordinator.answer(NodeId(2), candidate.probe, false), None);
        assert_eq!(coordinator.answer(NodeId(1), candidate.probe, true), None);
    }

    #[test]
    fn no_second_candidate_while_one_is_confirmed_unless_its_answers_are_overdue() {
        let mut coordinator = Coordinator::default();
        let candidate = cycle_across_nodes_1_and_2(&mut coordinator);
        coordinator.start_probe(&candidate, [NodeId(2)].into(), at(20));
        // The same cycle reported again: kept, not searched yet.
        let (a, b) = (s(1, 1), s(2, 1));
        assert!(coordinator.receive(at(5), NodeId(1), vec![edge(b, a, wait(7, 10))]).is_none());
        assert!(coordinator.receive(at(19), NodeId(2), vec![edge(a, b, wait(3, 12))]).is_none());
        let next =
            coordinator.receive(at(20), NodeId(2), vec![edge(a, b, wait(3, 12))]).expect("overdue: a new candidate");
        assert_eq!(next.probe, candidate.probe + 1);
        assert_eq!(coordinator.answer(NodeId(2), candidate.probe, true), None, "the old one was given up");
    }

    #[test]
    fn a_cycle_within_one_master_is_left_to_that_master() {
        let mut coordinator = Coordinator::default();
        let (a, b) = (s(1, 1), s(2, 1));
        let edges = vec![edge(a, b, wait(1, 1)), edge(b, a, wait(2, 2))];
        assert!(coordinator.receive(at(0), NodeId(3), edges).is_none());
    }

    #[test]
    fn an_empty_report_withdraws_the_nodes_edges() {
        let mut coordinator = Coordinator::default();
        let (a, b) = (s(1, 1), s(2, 1));
        assert!(coordinator.receive(at(0), NodeId(1), vec![edge(b, a, wait(7, 10))]).is_none());
        assert!(coordinator.receive(at(0), NodeId(1), Vec::new()).is_none());
        assert!(
            coordinator.receive(at(0), NodeId(2), vec![edge(a, b, wait(3, 12))]).is_none(),
            "node 1's edge is gone"
        );
    }
}
