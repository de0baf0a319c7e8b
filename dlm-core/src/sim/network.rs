//! The simulated network: messages in flight with random delays and
//! duplicates, and link faults (cuts, told or silent) that start and heal.

use std::time::Duration;

use crate::cluster::{Envelope, NodeId};

use crate::sim::{FAULT_TICK, InFlight, Sim};

impl Sim {
    pub(super) fn is_cut(&self, a: usize, b: usize) -> bool {
        let (a, b) = (a.min(b), a.max(b));
        self.cuts.iter().any(|&(x, y, _)| (x, y) == (a, b))
    }

    /// Heals cuts that are over, starts new ones (not while draining), and
    /// reconnects links that are down across no cut.
    pub(super) fn fault_tick(&mut self) -> Result<(), String> {
        self.next_fault_tick = self.now.saturating_add(FAULT_TICK);
        let now = self.now;
        self.cuts.retain(|&(_, _, until)| until > now);
        self.membership_tick()?;
        let n = self.nodes.len();
        if self.config.link_faults && !self.draining && self.rng.chance(2) {
            let a = self.rng.below(n as u64) as usize;
            let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
            if !self.is_cut(a, b) && self.members.alive[a] && self.members.alive[b] {
                let until = now.saturating_add(Duration::from_micros(500 + self.rng.below(15_000)));
                self.cuts.push((a.min(b), a.max(b), until));
                if self.rng.chance(50) {
                    // A reset connection: both ends hear of it at once.
                    for (x, y) in [(a, b), (b, a)] {
                        self.nodes[x].handle_link(now, NodeId(y as u16 + 1), false);
                        self.after(x)?;
                    }
                }
            }
        }
        for x in 0..n {
            for y in 0..n {
                if x == y || self.is_cut(x, y) || !self.members.alive[x] {
                    continue;
                }
                let peer = NodeId(y as u16 + 1);
                if self.nodes[x].link_state(peer).is_some_and(|(up, _)| !up) {
                    self.nodes[x].handle_link(now, peer, true);
                    self.after(x)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn send(&mut self, from: NodeId, to: NodeId, envelope: Envelope) {
        let copies = if self.rng.chance(self.config.duplicate_percent) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.below(self.config.max_delay.as_nanos() as u64 + 1);
            self.order += 1;
            self.network.push(InFlight {
                at: self.now.saturating_add(Duration::from_nanos(delay)),
                order: self.order,
                from,
                to,
                envelope: envelope.clone(),
            });
        }
    }
}
