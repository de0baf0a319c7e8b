//! Pressure: this node's figures read and sent to the peers every
//! [`REPORT_EVERY`], and a node lost while it reported memory pressure
//! told apart from one that said nothing (see `crate::psi`).

use std::time::Duration;

use dlm_core::Instant;
use dlm_core::cluster::{NodeId, NodePressure};

use super::Driver;
use crate::proto;

/// How often the node's pressure is read and sent to the peers: PSI's
/// shortest average is over 10 s, so a report a second is fresh enough.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(1);

/// A lost node's report counts if it came this soon before the view.
const RECENT: Duration = Duration::from_secs(10);

/// Memory pressure worth a word (thousandths of the last 10 s): some task
/// stalled 10 % of the time (the `DlmMemoryPressure` alert's level), or
/// every task 5 %.
const SOME_PERMILLE: u16 = 100;
const FULL_PERMILLE: u16 = 50;

impl Driver {
    /// Reads this node's pressure and the agent's run delay; in a
    /// cluster, tells the peers and brings their reports' metrics up to date.
    pub(super) fn report_pressure(&mut self) {
        let pressure = crate::psi::node_pressure();
        self.own_pressure = Some(pressure);
        self.observer.pressure.run_delay(crate::psi::run_delay());
        if self.config.cluster.is_none() {
            return;
        }
        let now = self.clock.engine_now();
        self.node.report_pressure(now, pressure);
        for peer in self.node.peers().collect::<Vec<_>>() {
            if let Some((reported, _)) = self.node.peer_pressure(peer) {
                self.observer.pressure.peer_reported(peer, reported);
            }
        }
    }

    /// `node` left the view: logged and counted as lost under pressure when
    /// it had said so in the last [`RECENT`].
    pub(super) fn node_lost(&self, node: NodeId) {
        let now = self.clock.engine_now();
        let squeezed = squeezed_when_lost(self.node.peer_pressure(node), now);
        self.observer.pressure.node_lost(squeezed.is_some());
        if let Some((pressure, at)) = squeezed {
            tracing::warn!(
                node = node.0,
                memory_some_pct = f64::from(pressure.memory_some) / 10.0,
                memory_full_pct = f64::from(pressure.memory_full) / 10.0,
                cpu_some_pct = f64::from(pressure.cpu_some) / 10.0,
                reported_ms_before = now.saturating_duration_since(at).as_millis() as u64,
                "lost a node that was reporting memory pressure: it may have stalled rather than died, \
                 and its fencing may be a false one"
            );
        }
    }

    /// The pressure part of the `Status` reply: this node's, and each
    /// peer's last report with its age.
    pub(super) fn pressure_status(&self, reply: &mut proto::StatusReply) {
        let now = self.clock.engine_now();
        reply.pressure = self.own_pressure.map(|p| status_of(p, Duration::ZERO));
        reply.run_delay_ms = u64::try_from(crate::psi::run_delay().as_millis()).unwrap_or(u64::MAX);
        for peer in &mut reply.peers {
            let id = NodeId(u16::try_from(peer.node_id).unwrap_or(u16::MAX));
            peer.pressure = self.node.peer_pressure(id).map(|(p, at)| status_of(p, now.saturating_duration_since(at)));
        }
    }
}

/// A lost node's last report, if it came in the last [`RECENT`] before
/// `now` and says the node was under memory pressure.
fn squeezed_when_lost(report: Option<(NodePressure, Instant)>, now: Instant) -> Option<(NodePressure, Instant)> {
    report.filter(|(p, at)| {
        now.saturating_duration_since(*at) <= RECENT && p.memory_at_least(SOME_PERMILLE, FULL_PERMILLE)
    })
}

fn status_of(pressure: NodePressure, age: Duration) -> proto::Pressure {
    proto::Pressure {
        memory_some_permille: u32::from(pressure.memory_some),
        memory_full_permille: u32::from(pressure.memory_full),
        cpu_some_permille: u32::from(pressure.cpu_some),
        age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_lost_counts_as_squeezed_only_on_a_recent_report_of_memory_pressure() {
        let at = Instant::from_nanos(1_000_000_000);
        let now = at.saturating_add(Duration::from_secs(2));
        let full = NodePressure { memory_full: 60, ..NodePressure::default() };
        let some = NodePressure { memory_some: 150, ..NodePressure::default() };
        let calm = NodePressure { memory_some: 99, memory_full: 49, cpu_some: 900 };
        assert_eq!(squeezed_when_lost(Some((full, at)), now), Some((full, at)));
        assert_eq!(squeezed_when_lost(Some((some, at)), now), Some((some, at)));
        assert_eq!(squeezed_when_lost(Some((calm, at)), now), None, "CPU pressure alone is not memory pressure");
        assert_eq!(squeezed_when_lost(None, now), None);
        let late = at.saturating_add(RECENT + Duration::from_millis(1));
        assert_eq!(squeezed_when_lost(Some((full, at)), late), None, "a report older than {RECENT:?}");
    }
}
