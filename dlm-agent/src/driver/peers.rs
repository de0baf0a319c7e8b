//! Peer batching: the node's envelopes handed to the peers' dialers, one
//! batch per peer per pass, and the links of peers that do not keep up (or
//! leave messages unacknowledged) reset.

use dlm_core::cluster::{Envelope, NodeId};

use super::Driver;
use crate::codes::LinkReset;

impl Driver {
    /// Hands the node's envelopes to the peers' dialers. A full queue
    /// means the peer does not keep up: its link counts as down (requests
    /// that need it fail rather than pile up) and its connection is re-made.
    pub(super) fn transmit(&mut self) {
        // One batch per peer per pass: a resend after a reconnection, however
        // long, is one queue entry, so it cannot overflow the queue by itself.
        let mut batches: Vec<(NodeId, Vec<Envelope>)> = Vec::new();
        while let Some((peer, envelope)) = self.node.poll_transmit() {
            match batches.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, batch)) => batch.push(envelope),
                None => batches.push((peer, vec![envelope])),
            }
        }
        let mut stalled: Vec<NodeId> = Vec::new();
        for (peer, batch) in batches {
            let Some(sender) = self.peers.get(&peer) else { continue };
            if sender.queue.try_send(batch).is_err() {
                // The link goes down below; everything the peer has not
                // acknowledged is resent when it is back.
                stalled.push(peer);
            }
        }
        while let Some(peer) = self.node.poll_reset() {
            tracing::warn!(peer = peer.0, "peer left messages unacknowledged; re-making its connection");
            self.reset_link(peer, LinkReset::Unacknowledged);
        }
        for peer in stalled {
            tracing::warn!(peer = peer.0, "queue to peer full; resetting its link");
            self.node.handle_link(self.clock.engine_now(), peer, false);
            self.reset_link(peer, LinkReset::QueueFull);
        }
    }

    /// Counts a reset and tells the peer's dialer to re-make its connection.
    fn reset_link(&self, peer: NodeId, reason: LinkReset) {
        self.observer.link_reset(reason);
        if let Some(sender) = self.peers.get(&peer) {
            sender.reset.notify_one();
        }
    }
}
