//! The deadlock coordinator role: cycles of waits that span masters.
//!
//! Every node with waiting requests reports its wait-for edges to the
//! coordinator (the lowest member id) every
//! [`crate::cluster::ClusterConfig::deadlock_interval`]; the coordinator
//! searches the union of the latest reports and asks the master of the
//! victim's wait to fail it, if that wait is still the one reported. Cycles
//! within one master are found at once by its engine.
//!
//! [`Coordinator`] is the state of both sides (this node's reporting, and the
//! reports it collects as coordinator) and the search, with no messages; the
//! `ClusterNode` methods below carry them.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::cluster::ClusterNode;
use crate::cluster::message::{NodeId, PeerMessage, RemoteEdge, WAIT_EDGES_MAX};
use crate::deadlock::{self, Edge, Search, WaitForGraph, WaitRef};
use crate::ids::{LockspaceId, SessionId};
use crate::time::Instant;

#[derive(Default)]
pub(super) struct Coordinator {
    /// When this node's next report is due.
    pub(super) report_due: Option<Instant>,
    /// Whether the last report to the coordinator had edges.
    reported_edges: bool,
    /// As coordinator: the latest report from each node.
    reports: BTreeMap<NodeId, Vec<RemoteEdge>>,
}

impl Coordinator {
    /// Takes a node's report (the coordinator's side). Returns the victim of
    /// a cycle across masters, if the reports now show one: its master and
    /// its wait. The reports used are then dropped, so a cycle is acted on once.
    pub(super) fn receive(&mut self, from: NodeId, mut edges: Vec<RemoteEdge>) -> Option<(NodeId, WaitRef)> {
        edges.truncate(WAIT_EDGES_MAX);
        if edges.is_empty() {
            self.reports.remove(&from);
            return None;
        }
        self.reports.insert(from, edges);
        let victim = self.find_victim()?;
        self.reports.clear();
        Some(victim)
    }

    /// The search over every node's latest edges.
    fn find_victim(&self) -> Option<(NodeId, WaitRef)> {
        let graph = ReportedGraph::new(&self.reports);
        let mut roots: Vec<SessionId> = graph.edges.keys().copied().collect();
        roots.sort_unstable();
        let Search::Cycle(cycle) = deadlock::find_cycle(&graph, &roots, u32::MAX) else { return None };
        let masters: HashSet<NodeId> = cycle.iter().map(|w| graph.waits[w.lock as usize].0).collect();
        if masters.len() < 2 {
            // A cycle within one master is that master's to find; this one is stale.
            return None;
        }
        cycle.iter().max_by_key(|w| (w.seq, graph.waits[w.lock as usize].0)).map(|w| graph.waits[w.lock as usize])
    }
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
            .map(|(from, edge)| RemoteEdge { from, to: edge.to, wait: edge.wait })
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

    /// A node's wait-for edges, at the coordinator.
    pub(super) fn on_wait_edges(&mut self, now: Instant, from: NodeId, edges: Vec<RemoteEdge>) {
        let Some((master, wait)) = self.coordinator.receive(from, edges) else { return };
        self.stats.deadlock_victims += 1;
        if master == self.config.node {
            self.engine.abort_wait(now, wait);
        } else {
            self.send(now, master, PeerMessage::AbortWait { wait });
        }
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
        RemoteEdge { from, to, wait }
    }

    #[test]
    fn a_cycle_across_two_masters_fails_the_youngest_wait_and_is_acted_on_once() {
        let mut coordinator = Coordinator::default();
        let (a, b) = (s(1, 1), s(2, 1));
        // Node 1 masters a resource b waits for a on; node 2 one a waits for b on.
        assert_eq!(coordinator.receive(NodeId(1), vec![edge(b, a, wait(7, 10))]), None);
        assert_eq!(coordinator.receive(NodeId(2), vec![edge(a, b, wait(3, 12))]), Some((NodeId(2), wait(3, 12))));
        assert!(coordinator.reports.is_empty(), "the reports used are dropped");
    }

    #[test]
    fn a_cycle_within_one_master_is_left_to_that_master() {
        let mut coordinator = Coordinator::default();
        let (a, b) = (s(1, 1), s(2, 1));
        let edges = vec![edge(a, b, wait(1, 1)), edge(b, a, wait(2, 2))];
        assert_eq!(coordinator.receive(NodeId(3), edges), None);
    }

    #[test]
    fn an_empty_report_withdraws_the_nodes_edges() {
        let mut coordinator = Coordinator::default();
        let (a, b) = (s(1, 1), s(2, 1));
        assert_eq!(coordinator.receive(NodeId(1), vec![edge(b, a, wait(7, 10))]), None);
        assert_eq!(coordinator.receive(NodeId(1), Vec::new()), None);
        assert_eq!(coordinator.receive(NodeId(2), vec![edge(a, b, wait(3, 12))]), None, "node 1's edge is gone");
    }
}
