//! What each node says of its own pressure, and what this node last heard.
//!
//! Why: a node stalled by memory pressure (in reclaim, or starved of CPU by
//! reclaiming real-time threads) stops answering corosync's token, and the
//! others remove and fence it exactly as if it had died. After the fact,
//! nothing tells a false fencing of a healthy but squeezed node from a real
//! failure. So each agent tells its peers, over their own links (not
//! corosync's, which is what stalls), the kernel's pressure stall figures
//! of its node ([`NodePressure`], from `/proc/pressure`); each node keeps
//! the last report of every peer with when it came ([`Pressures`]), and a
//! node removed by a view can be told apart: "it said it was under
//! pressure 2 s before it went" is evidence the driver logs and counts.
//!
//! Nothing here decides anything: the reports change no view, lock or
//! grant. They are kept per node id, so at most [`super::MEMBERS_MAX`].

use std::collections::BTreeMap;

use crate::cluster::ClusterNode;
use crate::cluster::message::{NodeId, PeerMessage};
use crate::time::Instant;

/// A node's pressure stall figures, each the share of the last 10 seconds
/// (the kernel's `avg10`) in thousandths: `memory_some` of the time some
/// task waited for memory, `memory_full` all non-idle tasks did, and
/// `cpu_some` some runnable task waited for a CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodePressure {
    /// Memory, some tasks stalled (‰).
    pub memory_some: u16,
    /// Memory, every non-idle task stalled (‰).
    pub memory_full: u16,
    /// CPU, some runnable task waited (‰).
    pub cpu_some: u16,
}

impl NodePressure {
    /// The largest figure: 1000‰ is all of the time.
    pub const PERMILLE_MAX: u16 = 1000;

    /// Whether every figure is a share (at most [`Self::PERMILLE_MAX`]).
    #[must_use]
    pub fn is_valid(self) -> bool {
        [self.memory_some, self.memory_full, self.cpu_some].iter().all(|&f| f <= Self::PERMILLE_MAX)
    }

    /// Whether a node reporting this is under memory pressure: every task
    /// stalled at least `full` ‰ of the time, or some task `some` ‰.
    #[must_use]
    pub fn memory_at_least(self, some: u16, full: u16) -> bool {
        self.memory_some >= some || self.memory_full >= full
    }
}

/// The last report of each peer, with when it arrived.
#[derive(Clone, Debug, Default)]
pub struct Pressures {
    last: BTreeMap<NodeId, (NodePressure, Instant)>,
}

impl Pressures {
    /// `node` reported `pressure` at `now`.
    pub fn record(&mut self, node: NodeId, pressure: NodePressure, now: Instant) {
        self.last.insert(node, (pressure, now));
    }

    /// `node`'s last report and when it came. Kept after the node leaves a
    /// view: that is when it is asked for.
    #[must_use]
    pub fn last(&self, node: NodeId) -> Option<(NodePressure, Instant)> {
        self.last.get(&node).copied()
    }
}

impl ClusterNode {
    /// Tells every peer whose link is up this node's pressure figures (the
    /// driver reads them and calls this at its own pace).
    pub fn report_pressure(&mut self, now: Instant, pressure: NodePressure) {
        let me = self.config.node;
        let peers: Vec<NodeId> = self
            .config
            .membership
            .members()
            .iter()
            .map(|m| m.id)
            .filter(|&id| id != me && self.links.is_up(id))
            .collect();
        for peer in peers {
            self.send(now, peer, PeerMessage::Pressure(pressure));
        }
    }

    /// `node`'s last pressure report and when it arrived, also after the
    /// node left the view (what a lost node said before it went).
    #[must_use]
    pub fn peer_pressure(&self, node: NodeId) -> Option<(NodePressure, Instant)> {
        self.pressures.last(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_report_of_a_node_replaces_the_one_before() {
        let mut pressures = Pressures::default();
        let squeezed = NodePressure { memory_some: 450, memory_full: 310, cpu_some: 20 };
        pressures.record(NodeId(2), NodePressure::default(), Instant::from_nanos(1));
        pressures.record(NodeId(2), squeezed, Instant::from_nanos(2));
        assert_eq!(pressures.last(NodeId(2)), Some((squeezed, Instant::from_nanos(2))));
        assert_eq!(pressures.last(NodeId(3)), None);
        assert!(squeezed.memory_at_least(1000, 300));
        assert!(!squeezed.memory_at_least(500, 400));
    }

    #[test]
    fn a_figure_over_the_whole_time_is_not_valid() {
        assert!(NodePressure { memory_some: 1000, memory_full: 1000, cpu_some: 1000 }.is_valid());
        assert!(!NodePressure { cpu_some: 1001, ..NodePressure::default() }.is_valid());
    }
}
