//! One node's end of the message stream with one peer: numbering, in-order
//! delivery without duplicates, acknowledgements, and resending after a
//! reconnection (as the Linux DLM's midcomms layer does over its TCP links).

use std::collections::{BTreeMap, VecDeque};

use crate::cluster::message::{Envelope, PeerMessage};
use crate::time::Instant;

/// Messages received ahead of a gap that are kept for in-order delivery;
/// beyond that they are dropped and the sender resends them.
const EARLY_MAX: usize = 1024;

pub(crate) struct Link {
    /// Whether the driver says the peer is reachable.
    pub(crate) up: bool,
    next_seq: u64,
    /// Sent and not yet acknowledged, in order.
    unacked: VecDeque<(u64, PeerMessage)>,
    /// The next sequence number expected from the peer.
    recv_next: u64,
    /// Received ahead of `recv_next`.
    early: BTreeMap<u64, PeerMessage>,
    /// When a bare acknowledgement is due (something arrived and nothing
    /// went back since).
    pub(crate) ack_due: Option<Instant>,
    /// Since when the oldest unacknowledged message has waited for its
    /// acknowledgement (reset whenever acknowledgements make progress).
    pub(crate) unacked_since: Option<Instant>,
    /// When a numbered message last went out (heartbeats fill the silence).
    pub(crate) last_sent: Instant,
}

impl Link {
    pub(crate) fn new() -> Link {
        Link {
            up: true,
            next_seq: 1,
            unacked: VecDeque::new(),
            recv_next: 1,
            early: BTreeMap::new(),
            ack_due: None,
            unacked_since: None,
            last_sent: Instant::ZERO,
        }
    }

    /// The highest sequence number received in order.
    fn acked(&self) -> u64 {
        self.recv_next - 1
    }

    /// Numbers a message and keeps it until acknowledged. Returns the
    /// envelope to transmit now (none while the peer is down: it goes out on
    /// reconnection).
    pub(crate) fn send(&mut self, now: Instant, epoch: u64, message: PeerMessage) -> Option<Envelope> {
        self.unacked_since.get_or_insert(now);
        self.last_sent = now;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back((seq, message.clone()));
        if !self.up {
            return None;
        }
        self.ack_due = None;
        Some(Envelope { epoch, seq, ack: self.acked(), message: Some(message) })
    }

    /// A bare acknowledgement.
    pub(crate) fn ack(&mut self, epoch: u64) -> Envelope {
        self.ack_due = None;
        Envelope { epoch, seq: 0, ack: self.acked(), message: None }
    }

    /// Everything not acknowledged, to transmit again after a reconnection.
    pub(crate) fn resend(&mut self, now: Instant, epoch: u64) -> Vec<Envelope> {
        self.ack_due = None;
        self.unacked_since = (!self.unacked.is_empty()).then_some(now);
        let ack = self.acked();
        self.unacked
            .iter()
            .map(|(seq, message)| Envelope { epoch, seq: *seq, ack, message: Some(message.clone()) })
            .collect()
    }

    /// Takes in an envelope; returns the messages now deliverable, in order.
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        ack_delay: std::time::Duration,
        envelope: Envelope,
    ) -> Vec<PeerMessage> {
        let before = self.unacked.len();
        while self.unacked.front().is_some_and(|&(seq, _)| seq <= envelope.ack) {
            self.unacked.pop_front();
        }
        if self.unacked.is_empty() {
            self.unacked_since = None;
        } else if self.unacked.len() < before {
            self.unacked_since = Some(now);
        }
        let Some(message) = envelope.message else { return Vec::new() };
        if envelope.seq == 0 {
            return Vec::new();
        }
        // Anything numbered, new or a duplicate, is acknowledged (a duplicate
        // means the peer has not heard our acknowledgement).
        self.ack_due.get_or_insert(now.saturating_add(ack_delay));
        if envelope.seq < self.recv_next {
            return Vec::new();
        }
        if envelope.seq > self.recv_next {
            if self.early.len() < EARLY_MAX {
                self.early.insert(envelope.seq, message);
            }
            return Vec::new();
        }
        let mut delivered = vec![message];
        self.recv_next += 1;
        while let Some(message) = self.early.remove(&self.recv_next) {
            delivered.push(message);
            self.recv_next += 1;
        }
        delivered
    }

    /// Whether a message other than a heartbeat awaits acknowledgement.
    pub(crate) fn busy(&self) -> bool {
        self.unacked.iter().any(|(_, message)| *message != PeerMessage::Heartbeat)
    }

    /// Messages sent and not yet acknowledged.
    pub(crate) fn unacked(&self) -> usize {
        self.unacked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SessionId;

    fn msg(n: u64) -> PeerMessage {
        PeerMessage::EndSession { session: SessionId(n) }
    }

    #[test]
    fn delivers_in_order_once_and_resends_what_was_not_acknowledged() {
        let (mut a, mut b) = (Link::new(), Link::new());
        let delay = std::time::Duration::from_millis(1);
        let e1 = a.send(Instant::ZERO, 1, msg(1)).unwrap();
        let e2 = a.send(Instant::ZERO, 1, msg(2)).unwrap();
        let e3 = a.send(Instant::ZERO, 1, msg(3)).unwrap();
        assert!(b.receive(Instant::ZERO, delay, e2.clone()).is_empty());
        assert_eq!(b.receive(Instant::ZERO, delay, e1.clone()), vec![msg(1), msg(2)]);
        assert!(b.receive(Instant::ZERO, delay, e1).is_empty(), "a duplicate is dropped");
        assert!(b.receive(Instant::ZERO, delay, e2).is_empty());
        let ack = b.ack(1);
        assert_eq!(ack.ack, 2);
        assert!(a.receive(Instant::ZERO, delay, ack).is_empty());
        assert_eq!(a.unacked(), 1);
        let resent = a.resend(Instant::ZERO, 1);
        assert_eq!(resent.len(), 1);
        assert_eq!(resent[0].seq, e3.seq);
        assert_eq!(b.receive(Instant::ZERO, delay, resent[0].clone()), vec![msg(3)]);
    }
}
