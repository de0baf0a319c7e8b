//! A cluster node's settings, with the protocol's timing defaults in one place.

use std::time::Duration;

use crate::cluster::members::Membership;
use crate::cluster::message::NodeId;
use crate::node::NodeConfig;

/// Settings of a cluster node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster's name: peers that say another one are refused
    /// (at most [`crate::cluster::wire::CLUSTER_NAME_LEN_MAX`] bytes).
    pub name: Vec<u8>,
    /// This node's id; must be a member.
    pub node: NodeId,
    /// The members and the epoch.
    pub membership: Membership,
    /// The engine's settings.
    pub engine: NodeConfig,
    /// How long a master keeps a resource nobody locks before releasing it.
    pub release_delay: Duration,
    /// How often waiting nodes report wait-for edges to the deadlock coordinator.
    pub deadlock_interval: Duration,
    /// How long a received message may wait for an acknowledgement to ride
    /// on a message going back before a bare one is sent.
    pub ack_delay: Duration,
    /// Masters of other nodes remembered at most (a forgotten one costs a lookup).
    pub master_cache_max: usize,
    /// A peer that leaves a message unacknowledged this long counts as
    /// unreachable: its link goes down (and the driver is asked to re-make
    /// the connection), so requests that need it fail instead of hanging.
    pub ack_timeout: Duration,
    /// A link with nothing sent for this long carries a heartbeat, so that a
    /// peer that went away is noticed (by the acknowledgement timeout) even
    /// when no request needs it.
    pub heartbeat_interval: Duration,
    /// Whether a request that needs an unreachable peer waits rather than
    /// failing with [`crate::Status::Unavailable`]: for the link to come
    /// back, or for the view that says the peer is gone, after which
    /// recovery sends it to the resource's new master (as the Linux DLM's
    /// requests wait through recovery). Only for nodes that are handed views
    /// ([`crate::cluster::ClusterNode::handle_view`]): without them nothing
    /// ends the wait for a peer that never comes back. Off by default.
    pub requests_wait_for_views: bool,
}

impl ClusterConfig {
    /// The default release delay: long enough that a resource locked now
    /// and then keeps its master, short enough that the directory forgets
    /// what nobody uses.
    pub const RELEASE_DELAY_DEFAULT: Duration = Duration::from_secs(5);
    /// The default interval of wait-for reports: cycles across nodes are
    /// rare and cost a round trip to find, so once a second.
    pub const DEADLOCK_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
    /// The default acknowledgement delay: short against a request's round
    /// trip, long enough for most acknowledgements to ride on answers.
    pub const ACK_DELAY_DEFAULT: Duration = Duration::from_millis(5);
    /// The default size of the master cache.
    pub const MASTER_CACHE_MAX_DEFAULT: usize = 65_536;
    /// The default acknowledgement timeout.
    pub const ACK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3);
    /// The default heartbeat interval: a third of the acknowledgement
    /// timeout, so that a quiet link carries two heartbeats before a peer
    /// that stopped answering is taken for gone.
    pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

    /// A configuration with default timings.
    #[must_use]
    pub fn new(node: NodeId, membership: Membership) -> ClusterConfig {
        ClusterConfig {
            name: Vec::new(),
            node,
            membership,
            engine: NodeConfig::default(),
            release_delay: Self::RELEASE_DELAY_DEFAULT,
            deadlock_interval: Self::DEADLOCK_INTERVAL_DEFAULT,
            ack_delay: Self::ACK_DELAY_DEFAULT,
            master_cache_max: Self::MASTER_CACHE_MAX_DEFAULT,
            ack_timeout: Self::ACK_TIMEOUT_DEFAULT,
            heartbeat_interval: Self::HEARTBEAT_INTERVAL_DEFAULT,
            requests_wait_for_views: false,
        }
    }

    /// Sets the acknowledgement timeout and the heartbeat interval that goes
    /// with it (a third of it, see [`ClusterConfig::HEARTBEAT_INTERVAL_DEFAULT`]).
    pub fn set_peer_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
        self.heartbeat_interval = timeout / 3;
    }
}

const _: () = assert!(
    ClusterConfig::HEARTBEAT_INTERVAL_DEFAULT.as_nanos() * 3 == ClusterConfig::ACK_TIMEOUT_DEFAULT.as_nanos(),
    "the default heartbeat is a third of the default acknowledgement timeout"
);
