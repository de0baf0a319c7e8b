//! Views from the membership: handed to the node, which recovers from them,
//! and to the peer transport, which lets peers in by them; and the links to
//! the peers, which the node starts anew in each epoch.

use dlm_core::cluster::{NodeId, View};

use super::Driver;

impl Driver {
    /// A peer's dialer connected or lost its connection.
    pub(super) fn link(&mut self, peer: NodeId, up: bool) {
        if up {
            self.connected.insert(peer);
        } else {
            self.connected.remove(&peer);
        }
        self.node.handle_link(self.clock.engine_now(), peer, up);
    }

    /// Takes a view: the node recovers from it (or fences itself), the peer
    /// transport lets in the members it names, and the node is told which
    /// links are connected: it starts its links anew in each epoch, as up,
    /// so a member whose dialer is not connected must be marked down, or
    /// what the node sends it meanwhile would be dropped with no resend
    /// until the acknowledgement timeout. (A connection made in an older
    /// epoch carries the new one's messages, which are tagged with their epoch.)
    pub(super) fn take_view(&mut self, view: &View) {
        let now = self.clock.engine_now();
        if let Err(error) = self.node.handle_view(now, view) {
            tracing::error!(epoch = view.epoch, %error, "view refused by the lock engine");
            return;
        }
        self.peer_view.take(view);
        self.observer.view_taken(view, self.node.is_fenced());
        self.observer.update_recovery(&self.node);
        if self.node.is_fenced() {
            tracing::warn!(epoch = view.epoch, "fenced: every lock revoked, requests fail until a quorate view");
            return;
        }
        let me = self.node.id();
        for peer in view.members.iter().map(|m| m.id).filter(|&id| id != me) {
            self.node.handle_link(now, peer, self.connected.contains(&peer));
        }
    }
}
