//! The `[cluster]` section: this node's id, the members, the peer
//! listener and the timings, validated and turned into the lock engine's
//! [`dlm_core::cluster::ClusterConfig`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, in_range, invalid, parse_addr, parse_duration};
use crate::bounds::{PEER_QUEUE_MAX_DEFAULT, PEER_QUEUE_MAX_RANGE};

/// The `[cluster]` section: static membership (changes come with the
/// membership issue), the peer listener, and timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The cluster's name: peers with another name are refused.
    pub name: String,
    /// This node's id among the members.
    pub node_id: u16,
    /// Where this node accepts peer connections.
    pub listen: SocketAddr,
    /// Every member, this node included.
    pub members: Vec<MemberEntry>,
    /// How long a resource nobody locks stays mastered here.
    pub release_delay: Duration,
    /// How often waiting nodes report wait-for edges to the deadlock coordinator.
    pub deadlock_interval: Duration,
    /// A peer that leaves a message unacknowledged this long counts as
    /// unreachable until its connection is made again; a quiet link carries
    /// a heartbeat every third of it, so this holds on idle links too.
    pub peer_timeout: Duration,
    /// Batches of messages queued to one peer at most (a batch is what one
    /// pass of the driver has for it); a peer that lets its queue fill has
    /// its link reset (and what it has not acknowledged resent).
    pub peer_queue_max: usize,
}

/// A `[[cluster.member]]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    /// Its node id (0 to 65535).
    pub id: u16,
    /// Its peer address.
    pub address: SocketAddr,
    /// Its share of directory entries (1 to 64).
    #[serde(default = "default_weight")]
    pub weight: u8,
}

fn default_weight() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    name: String,
    node_id: u16,
    listen: Option<String>,
    #[serde(default)]
    member: Vec<MemberEntry>,
    release_delay: Option<String>,
    deadlock_interval: Option<String>,
    peer_timeout: Option<String>,
    peer_queue_max: Option<usize>,
}

pub(super) fn cluster_settings(file: FileCluster) -> Result<ClusterSettings, ConfigError> {
    if file.name.is_empty() || file.name.len() > dlm_core::cluster::wire::CLUSTER_NAME_LEN_MAX {
        return Err(invalid("cluster.name", "must be 1 to 64 bytes"));
    }
    let me = file.member.iter().find(|m| m.id == file.node_id).ok_or_else(|| {
        invalid("cluster.node_id", format!("{} is not among the [[cluster.member]] entries", file.node_id))
    })?;
    let listen = match file.listen {
        Some(text) => {
            parse_addr("cluster.listen", &text)?.ok_or_else(|| invalid("cluster.listen", "must be an address"))?
        }
        None => me.address,
    };
    let duration = |key: &'static str, text: Option<String>, default: Duration| match text {
        Some(text) => parse_duration(&text).map_err(|m| invalid(key, m)),
        None => Ok(default),
    };
    let settings = ClusterSettings {
        name: file.name,
        node_id: file.node_id,
        listen,
        release_delay: duration("cluster.release_delay", file.release_delay, Duration::from_secs(5))?,
        deadlock_interval: duration("cluster.deadlock_interval", file.deadlock_interval, Duration::from_secs(1))?,
        peer_timeout: duration("cluster.peer_timeout", file.peer_timeout, Duration::from_secs(3))?,
        peer_queue_max: file.peer_queue_max.unwrap_or(PEER_QUEUE_MAX_DEFAULT),
        members: file.member,
    };
    if !PEER_QUEUE_MAX_RANGE.contains(&settings.peer_queue_max) {
        return Err(invalid("cluster.peer_queue_max", in_range(&PEER_QUEUE_MAX_RANGE)));
    }
    if settings.peer_timeout < Duration::from_millis(100) {
        return Err(invalid("cluster.peer_timeout", "must be at least 100ms"));
    }
    if settings.deadlock_interval < Duration::from_millis(10) {
        return Err(invalid("cluster.deadlock_interval", "must be at least 10ms"));
    }
    Ok(settings)
}

impl ClusterSettings {
    /// The members as the lock engine takes them.
    ///
    /// # Errors
    /// Duplicate ids or addresses, weights out of range.
    pub fn membership(&self) -> Result<dlm_core::cluster::Membership, String> {
        let mut addresses = std::collections::BTreeSet::new();
        for member in &self.members {
            if !addresses.insert(member.address) {
                return Err(format!("address {} is listed twice", member.address));
            }
        }
        let members = self
            .members
            .iter()
            .map(|m| dlm_core::cluster::Member { id: dlm_core::cluster::NodeId(m.id), weight: m.weight })
            .collect();
        dlm_core::cluster::Membership::new(members, 1)
    }

    /// The settings of this node's part of the cluster, as the lock engine
    /// takes them (name, members, timings).
    ///
    /// # Errors
    /// As [`ClusterSettings::membership`].
    pub fn cluster_config(&self) -> Result<dlm_core::cluster::ClusterConfig, String> {
        let node = dlm_core::cluster::NodeId(self.node_id);
        let mut config = dlm_core::cluster::ClusterConfig::new(node, self.membership()?);
        config.name = self.name.clone().into_bytes();
        config.release_delay = self.release_delay;
        config.deadlock_interval = self.deadlock_interval;
        config.set_peer_timeout(self.peer_timeout);
        Ok(config)
    }
}
