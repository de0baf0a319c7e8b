//! Views from the membership: handed to the node, which recovers from them,
//! and to the peer transport, which lets peers in by them; and the links to
//! the peers, which the node starts anew in each epoch.

use dlm_core::cluster::{NodeId, View, ViewMember};

use super::Driver;
use crate::config::MembershipSource;
use crate::proto;

impl Driver {
    /// A peer's dialer connected or lost its connection. A peer just
    /// reached hears this node's pressure at once, not at the next report:
    /// a node lost soon after must have said how it was.
    pub(super) fn link(&mut self, peer: NodeId, up: bool) {
        if up {
            self.connected.insert(peer);
        } else {
            self.connected.remove(&peer);
        }
        let now = self.clock.engine_now();
        self.node.handle_link(now, peer, up);
        if let Some(pressure) = self.own_pressure.filter(|_| up) {
            self.node.report_pressure(now, pressure);
        }
    }

    /// Takes a view: the node recovers from it (or fences itself), told
    /// which members' dialers are connected (it starts its links anew in
    /// each epoch: one whose dialer is not connected starts down, so that
    /// what the node sends it waits for the connection instead of being
    /// dropped until the acknowledgement timeout), and the peer transport
    /// lets in the members it names. (A connection made in an older epoch
    /// carries the new one's messages, which are tagged with their epoch.)
    pub(super) fn take_view(&mut self, view: &View) {
        let now = self.clock.engine_now();
        let me = self.node.id();
        if view.quorate && self.fenced_on_lapse.is_some() && view.incarnation(me) == self.fenced_on_lapse {
            // Agreed before the membership saw the lapse (queued across a
            // pause): its clients' locks in that incarnation were revoked.
            tracing::warn!(epoch = view.epoch, "a view of the incarnation fenced on a lapsed lease: not taken");
            return;
        }
        if !view.quorate && self.node.is_fenced() && view.epoch == self.node.epoch() {
            // The membership's own fence for the lapse this driver saw first.
            return;
        }
        let before: Vec<NodeId> = self.node.config().membership.members().iter().map(|m| m.id).collect();
        if let Err(error) = self.node.handle_view(now, view, |peer| self.connected.contains(&peer)) {
            tracing::error!(epoch = view.epoch, %error, "view refused by the lock engine");
            return;
        }
        self.incarnation = if self.node.is_fenced() { None } else { view.incarnation(me) };
        self.peer_view.take(view);
        self.observer.view_taken(view, self.node.is_fenced());
        self.observer.update_recovery(&self.node);
        if self.node.is_fenced() {
            tracing::warn!(epoch = view.epoch, "fenced: every lock revoked, requests fail until a quorate view");
            return;
        }
        for lost in before.into_iter().filter(|&id| id != me && view.incarnation(id).is_none()) {
            self.node_lost(lost);
        }
        // The links start anew in each epoch: the members hear this node's
        // pressure in it at once (see `link`).
        if let Some(pressure) = self.own_pressure {
            self.node.report_pressure(now, pressure);
        }
    }

    /// Before anything that may grant: a node whose membership lease lapsed
    /// (its corosync stopped answering, or the node was paused and has just
    /// woken) fences itself at once, in the odd epoch after its view that
    /// the agreement keeps for a node fencing itself alone; the membership
    /// task, which sees the same lapse, hands the same fence after.
    pub(super) fn check_lease(&mut self) {
        let Some((lease, watch)) = &mut self.lease else { return };
        if !watch.lapsed(lease, std::time::Instant::now()) || self.node.is_fenced() {
            return;
        }
        let Some(incarnation) = self.incarnation else { return };
        let me = self.node.id();
        let weight = self.node.config().membership.members().iter().find(|m| m.id == me).map_or(1, |m| m.weight);
        let view = View {
            epoch: self.node.epoch() + 1,
            members: vec![ViewMember { id: me, weight, incarnation }],
            quorate: false,
        };
        tracing::error!(epoch = view.epoch, "the membership lease lapsed: fencing this node before anything else");
        self.take_view(&view);
        self.fenced_on_lapse = Some(incarnation);
    }

    /// An operator says `node` is fenced: passed to the membership, which
    /// tells the group.
    pub(super) fn fence_ack(&mut self, node: NodeId) -> Result<(), String> {
        let Some(acks) = &self.fence_acks else {
            return Err("nothing is fenced here: membership is not from corosync".into());
        };
        let waiting = self.membership.as_ref().is_some_and(|m| m.waiting_for_fencing.iter().any(|(n, _)| *n == node));
        if !waiting {
            return Err(format!("node {} is not waiting for fencing", node.0));
        }
        acks.try_send(node).map_err(|_| "the membership is busy; try again".to_string())
    }

    /// The membership and recovery part of the `Status` reply.
    pub(super) fn membership_status(&self, reply: &mut proto::StatusReply) {
        let Some(cluster) = &self.config.cluster else { return };
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let now = self.clock.engine_now();
        let ids = |nodes: &[NodeId]| nodes.iter().map(|n| u32::from(n.0)).collect();
        reply.membership = match cluster.membership {
            MembershipSource::Static => "static",
            MembershipSource::Corosync => "corosync",
        }
        .into();
        reply.epoch = self.node.epoch();
        reply.members = self.node.config().membership.members().iter().map(|m| u32::from(m.id.0)).collect();
        reply.fenced = self.node.is_fenced();
        reply.joining = cluster.membership == MembershipSource::Corosync && reply.epoch == 0;
        reply.quorate = !reply.fenced && !reply.joining;
        reply.recovery = self.node.recovery_status().map(|r| proto::RecoveryStatus {
            phase: r.phase.name().into(),
            waiting_for: ids(&r.waiting_for),
            elapsed_ms: millis(now.saturating_duration_since(r.started)),
            phase_elapsed_ms: millis(now.saturating_duration_since(r.phase_started)),
            departed: ids(&r.departed),
        });
        if let Some(membership) = &self.membership {
            let tokio_now = tokio::time::Instant::now();
            reply.corosync_connected = membership.connected;
            if let Some((awaited, since)) = &membership.agreeing {
                reply.view_waiting_for = ids(awaited);
                reply.view_waiting_ms = millis(tokio_now.saturating_duration_since(*since));
            }
            reply.waiting_for_fencing = membership
                .waiting_for_fencing
                .iter()
                .map(|(node, since)| proto::FencingWait {
                    node_id: u32::from(node.0),
                    waited_ms: millis(tokio_now.saturating_duration_since(*since)),
                })
                .collect();
        }
    }
}
