//! The links to every peer: what goes out (numbered by each peer's
//! [`Link`]), what came in, acknowledgements owed, heartbeats on quiet links,
//! and peers that fell silent.
//!
//! This layer knows nothing of locks: the roles above hand it messages for a
//! peer and take the messages it delivers, in order and once each.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::cluster::PeerError;
use crate::cluster::link::Link;
use crate::cluster::message::{Envelope, NodeId, PeerMessage};
use crate::time::Instant;

pub(super) struct Links {
    peers: BTreeMap<NodeId, Link>,
    /// Envelopes for the driver to send, oldest first.
    transmit: VecDeque<(NodeId, Envelope)>,
    /// Peers whose connection the driver should drop and make again.
    resets: Vec<NodeId>,
}

impl Links {
    /// Links, all up, to every peer.
    pub(super) fn new(peers: impl Iterator<Item = NodeId>) -> Links {
        Links { peers: peers.map(|id| (id, Link::new())).collect(), transmit: VecDeque::new(), resets: Vec::new() }
    }

    /// Whether there is no peer (a single node).
    pub(super) fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peers, by id.
    pub(super) fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.keys().copied()
    }

    /// Whether a peer's link is up, and how many messages to it await acknowledgement.
    pub(super) fn state(&self, peer: NodeId) -> Option<(bool, usize)> {
        self.peers.get(&peer).map(|l| (l.up, l.unacked()))
    }

    /// Whether a message other than a heartbeat awaits the peer's acknowledgement.
    pub(super) fn busy(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(Link::busy)
    }

    /// Whether the link to a peer is up.
    pub(super) fn is_up(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|l| l.up)
    }

    /// Numbers a message for a peer and queues it (kept for resending until
    /// acknowledged; sent when the link is up). False for a node that is no peer.
    pub(super) fn send(&mut self, now: Instant, epoch: u64, to: NodeId, message: PeerMessage) -> bool {
        let Some(link) = self.peers.get_mut(&to) else { return false };
        if let Some(envelope) = link.send(now, epoch, message) {
            self.transmit.push_back((to, envelope));
        }
        true
    }

    /// Takes in an envelope from a peer: the messages now deliverable, in order.
    pub(super) fn receive(
        &mut self,
        now: Instant,
        ack_delay: Duration,
        from: NodeId,
        envelope: Envelope,
    ) -> Result<Vec<PeerMessage>, PeerError> {
        let link = self.peers.get_mut(&from).ok_or(PeerError::NotAPeer(from))?;
        Ok(link.receive(now, ack_delay, envelope))
    }

    /// The link to a peer went down or came back. False if nothing changed.
    /// Back up, everything the peer has not acknowledged is queued again;
    /// down, nothing more is queued for it and what was queued is dropped
    /// (it is resent when the link is back).
    pub(super) fn set_up(&mut self, now: Instant, epoch: u64, peer: NodeId, up: bool) -> bool {
        let Some(link) = self.peers.get_mut(&peer) else { return false };
        if link.up == up {
            return false;
        }
        link.up = up;
        if up {
            for envelope in link.resend(now, epoch) {
                self.transmit.push_back((peer, envelope));
            }
        } else {
            self.transmit.retain(|(to, _)| *to != peer);
        }
        true
    }

    /// Asks the driver to drop a peer's connection and make it again.
    pub(super) fn reset(&mut self, peer: NodeId) {
        self.resets.push(peer);
    }

    /// Sends the bare acknowledgements that are due.
    pub(super) fn send_due_acks(&mut self, now: Instant, epoch: u64) {
        for (&peer, link) in &mut self.peers {
            if link.up && link.ack_due.is_some_and(|at| at <= now) {
                self.transmit.push_back((peer, link.ack(epoch)));
            }
        }
    }

    /// Peers (up) that have left a message unacknowledged for `timeout`.
    pub(super) fn silent(&self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        self.up()
            .filter(|(_, l)| l.unacked_since.is_some_and(|since| since.saturating_add(timeout) <= now))
            .map(|(&peer, _)| peer)
            .collect()
    }

    /// Peers (up, nothing unacknowledged) sent nothing for `interval`.
    pub(super) fn quiet(&self, now: Instant, interval: Duration) -> Vec<NodeId> {
        self.up()
            .filter(|(_, l)| l.unacked_since.is_none() && l.last_sent.saturating_add(interval) <= now)
            .map(|(&peer, _)| peer)
            .collect()
    }

    /// When the next bare acknowledgement is due.
    pub(super) fn ack_deadline(&self) -> Option<Instant> {
        self.up().filter_map(|(_, l)| l.ack_due).min()
    }

    /// When the next peer counts as silent, unless acknowledgements come.
    pub(super) fn silence_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.up().filter_map(|(_, l)| l.unacked_since).min().map(|since| since.saturating_add(timeout))
    }

    /// When the next quiet link needs a heartbeat.
    pub(super) fn heartbeat_deadline(&self, interval: Duration) -> Option<Instant> {
        self.up().filter(|(_, l)| l.unacked_since.is_none()).map(|(_, l)| l.last_sent.saturating_add(interval)).min()
    }

    fn up(&self) -> impl Iterator<Item = (&NodeId, &Link)> {
        self.peers.iter().filter(|(_, l)| l.up)
    }

    /// The next envelope to send.
    pub(super) fn poll_transmit(&mut self) -> Option<(NodeId, Envelope)> {
        self.transmit.pop_front()
    }

    /// The next peer whose connection should be made again.
    pub(super) fn poll_reset(&mut self) -> Option<NodeId> {
        self.resets.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SessionId;

    const EPOCH: u64 = 1;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    fn message() -> PeerMessage {
        PeerMessage::EndSession { session: SessionId(1) }
    }

    fn drain(links: &mut Links) -> Vec<(NodeId, u64, u64, bool)> {
        std::iter::from_fn(|| links.poll_transmit()).map(|(to, e)| (to, e.seq, e.ack, e.message.is_some())).collect()
    }

    #[test]
    fn a_message_to_a_peer_is_numbered_and_one_to_a_stranger_is_refused() {
        let mut links = Links::new([NodeId(2), NodeId(3)].into_iter());
        assert!(links.send(at(0), EPOCH, NodeId(3), message()));
        assert!(links.send(at(0), EPOCH, NodeId(3), message()));
        assert!(!links.send(at(0), EPOCH, NodeId(9), message()));
        assert_eq!(drain(&mut links), vec![(NodeId(3), 1, 0, true), (NodeId(3), 2, 0, true)]);
        assert_eq!(links.state(NodeId(3)), Some((true, 2)));
    }

    #[test]
    fn a_link_down_drops_what_was_queued_and_resends_it_when_back() {
        let mut links = Links::new([NodeId(2)].into_iter());
        links.send(at(0), EPOCH, NodeId(2), message());
        assert!(links.set_up(at(1), EPOCH, NodeId(2), false));
        assert!(!links.set_up(at(1), EPOCH, NodeId(2), false), "no change");
        links.send(at(1), EPOCH, NodeId(2), message());
        assert!(drain(&mut links).is_empty());
        assert!(links.set_up(at(2), EPOCH, NodeId(2), true));
        assert_eq!(drain(&mut links), vec![(NodeId(2), 1, 0, true), (NodeId(2), 2, 0, true)]);
    }

    #[test]
    fn timers_of_acknowledgement_silence_and_heartbeat() {
        let mut links = Links::new([NodeId(2), NodeId(3)].into_iter());
        let (timeout, heartbeat, delay) =
            (Duration::from_millis(30), Duration::from_millis(10), Duration::from_millis(5));
        // Node 2 sends something numbered: an acknowledgement is owed 5 ms later.
        let from_2 = Envelope { epoch: EPOCH, seq: 1, ack: 0, message: Some(message()) };
        assert_eq!(links.receive(at(0), delay, NodeId(2), from_2), Ok(vec![message()]));
        assert_eq!(links.ack_deadline(), Some(at(5)));
        links.send_due_acks(at(4), EPOCH);
        assert!(drain(&mut links).is_empty());
        links.send_due_acks(at(5), EPOCH);
        assert_eq!(drain(&mut links), vec![(NodeId(2), 0, 1, false)]);
        assert_eq!(links.ack_deadline(), None);
        // Node 3 is sent a message it never acknowledges: silent after the timeout.
        links.send(at(6), EPOCH, NodeId(3), message());
        drain(&mut links);
        assert_eq!(links.silence_deadline(timeout), Some(at(36)));
        assert!(links.silent(at(35), timeout).is_empty());
        assert_eq!(links.silent(at(36), timeout), vec![NodeId(3)]);
        // Node 2, with nothing unacknowledged and nothing sent since the start, is quiet.
        assert_eq!(links.heartbeat_deadline(heartbeat), Some(at(10)));
        assert_eq!(links.quiet(at(10), heartbeat), vec![NodeId(2)]);
        assert_eq!(
            links.receive(at(0), delay, NodeId(7), Envelope { epoch: EPOCH, seq: 0, ack: 0, message: None }),
            Err(PeerError::NotAPeer(NodeId(7)))
        );
    }
}
