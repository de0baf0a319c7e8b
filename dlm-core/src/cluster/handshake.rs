//! What a node says about itself when a peer connection opens, and which
//! peers' hellos it accepts: the same version and cluster, a member other
//! than itself (the one dialled, when this side dialled), in this node's
//! membership epoch or a later one (a peer that took a view first is
//! accepted: its envelopes wait for this node's view; one still in an older
//! epoch is refused until it catches up, as a restarted node is until its
//! first view).
//!
//! The epoch is passed in rather than read from the configuration: the
//! transport that checks hellos runs beside the node, whose epoch moves.
//! Telling a restarted peer from the one the view names (its incarnation)
//! is the transport's job.

use crate::cluster::ClusterConfig;
use crate::cluster::message::NodeId;
use crate::cluster::wire::{self, Hello};

/// Why a peer's hello is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloRefusal {
    /// It speaks another protocol version.
    #[error("wrong_version")]
    WrongVersion,
    /// It belongs to another cluster.
    #[error("wrong_cluster")]
    WrongCluster,
    /// It is no member, or this node, or not the member dialled.
    #[error("unknown_node")]
    UnknownNode,
    /// It is in an older membership epoch than this node.
    #[error("wrong_epoch")]
    WrongEpoch,
}

impl HelloRefusal {
    /// Every refusal.
    pub const ALL: [HelloRefusal; 4] =
        [HelloRefusal::WrongVersion, HelloRefusal::WrongCluster, HelloRefusal::UnknownNode, HelloRefusal::WrongEpoch];

    /// Its label (in metrics and logs).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            HelloRefusal::WrongVersion => "wrong_version",
            HelloRefusal::WrongCluster => "wrong_cluster",
            HelloRefusal::UnknownNode => "unknown_node",
            HelloRefusal::WrongEpoch => "wrong_epoch",
        }
    }
}

impl ClusterConfig {
    /// This node's hello in `epoch`, with the incarnation of the process that drives it.
    #[must_use]
    pub fn hello(&self, epoch: u64, incarnation: u64) -> Hello {
        Hello { version: wire::VERSION, cluster: self.name.clone(), node: self.node, epoch, incarnation }
    }

    /// Checks a peer's hello against this node in `epoch`; `dialled` is the
    /// member this node connected to (`None` for a connection it accepted).
    /// Returns the peer's id.
    ///
    /// # Errors
    /// The first reason to refuse it, in the order of [`HelloRefusal::ALL`].
    pub fn check_hello(&self, hello: &Hello, dialled: Option<NodeId>, epoch: u64) -> Result<NodeId, HelloRefusal> {
        if hello.version != wire::VERSION {
            return Err(HelloRefusal::WrongVersion);
        }
        if hello.cluster != self.name {
            return Err(HelloRefusal::WrongCluster);
        }
        let peer = hello.node;
        if peer == self.node || !self.membership.contains(peer) || dialled.is_some_and(|d| d != peer) {
            return Err(HelloRefusal::UnknownNode);
        }
        if hello.epoch < epoch {
            return Err(HelloRefusal::WrongEpoch);
        }
        Ok(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Member, Membership};

    #[test]
    fn a_members_hello_is_accepted_and_every_mismatch_refused_by_name() {
        let members = (1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect();
        let mut config = ClusterConfig::new(NodeId(1), Membership::new(members, 1).expect("members"));
        config.name = b"c1".to_vec();
        let good = Hello { node: NodeId(2), ..config.hello(4, 77) };
        assert_eq!((good.cluster.as_slice(), good.epoch, good.incarnation), (&b"c1"[..], 4, 77));
        assert_eq!(config.check_hello(&good, None, 4), Ok(NodeId(2)));
        assert_eq!(config.check_hello(&good, Some(NodeId(2)), 4), Ok(NodeId(2)));
        assert_eq!(config.check_hello(&good, None, 3), Ok(NodeId(2)), "a peer ahead is accepted");
        let cases = [
            (Hello { version: wire::VERSION + 1, ..good.clone() }, None, HelloRefusal::WrongVersion),
            (Hello { cluster: b"c2".to_vec(), ..good.clone() }, None, HelloRefusal::WrongCluster),
            (Hello { node: NodeId(1), ..good.clone() }, None, HelloRefusal::UnknownNode),
            (Hello { node: NodeId(9), ..good.clone() }, None, HelloRefusal::UnknownNode),
            (good.clone(), Some(NodeId(3)), HelloRefusal::UnknownNode),
            (Hello { epoch: 3, ..good.clone() }, None, HelloRefusal::WrongEpoch),
        ];
        for (hello, dialled, refusal) in cases {
            assert_eq!(config.check_hello(&hello, dialled, 4), Err(refusal), "{hello:?}");
        }
        let labels: Vec<&str> = HelloRefusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, ["wrong_version", "wrong_cluster", "unknown_node", "wrong_epoch"]);
    }
}
