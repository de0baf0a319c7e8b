//! The `[cluster]` section: this node's id, the members, the peer
//! listener and the timings, validated and turned into the lock engine's
//! [`dlm_core::cluster::ClusterConfig`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, in_range, invalid, parse_addr, parse_duration};
use crate::bounds::{PEER_QUEUE_MAX_DEFAULT, PEER_QUEUE_MAX_RANGE, REALTIME_PRIORITY_DEFAULT, REALTIME_PRIORITY_RANGE};

/// Where the members and their changes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MembershipSource {
    /// The `[[cluster.member]]` list, all members from the start, never
    /// changing: a member that fails stays unavailable until the whole
    /// cluster restarts (no recovery). For development on one host.
    Static,
    /// The node's corosync: CPG for who is up, votequorum for quorum; the
    /// `[[cluster.member]]` list says which nodes may join and where their
    /// agents listen. A lost member's locks are recovered.
    Corosync,
}

/// The `[cluster]` section: the members and where they come from, the peer
/// listener, and timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The cluster's name: peers with another name are refused.
    pub name: String,
    /// Where the members and their changes come from.
    pub membership: MembershipSource,
    /// The CPG group the agents join (corosync membership): `dlm:<name>` by default.
    pub cpg_group: Option<String>,
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
    /// How a lost node is fenced before its locks are recovered (corosync membership).
    pub fencing: FencingSettings,
    /// Every lockspace's lock-delay unless its `[[lockspace]]` entry says
    /// otherwise: how long a lock taken from a lost node stays in the way of
    /// conflicting requests (see the README's "Lock-delay").
    pub lock_delay: Duration,
    /// The `SCHED_RR` priority of the membership's threads when permitted
    /// (0: normal priority); see `membership::realtime`.
    pub realtime_priority: u8,
}

/// The `[cluster.fencing]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FencingSettings {
    /// The command that fences a node: run with the node's id and address
    /// appended, until it exits 0 (as dlm_controld runs fence agents).
    pub command: Option<Vec<String>>,
    /// Without a command: how long after a node is lost the survivors take
    /// it to have fenced itself (it has, if its corosync lost quorum, its
    /// agent lost corosync, or its membership lease lapsed: each revokes
    /// every lock it holds). `None`: computed at start from corosync's own
    /// timeouts (`membership::lease::Timing::grace_floor`), which also
    /// refuse a configured grace below that floor.
    pub self_fence_grace: Option<Duration>,
    /// A watchdog device (softdog's `/dev/watchdog`) fed only while this
    /// node is a quorate member and its corosync answers: backs self-fencing
    /// for a node that cannot tell it was cut off (a frozen corosync).
    pub watchdog: Option<std::path::PathBuf>,
    /// With a command: how long a member whose agent does not report in a
    /// round (stopped, stuck) may hold up a membership change before its
    /// node is fenced. Without a command the change waits, visibly.
    pub member_stall_timeout: Duration,
}

/// The default `member_stall_timeout`: long enough for an agent that is
/// only slow (a GC-free process, but a loaded node) to report, short enough
/// that a stopped one does not keep the cluster's recovery waiting long.
pub const MEMBER_STALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(20);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileFencing {
    command: Option<Vec<String>>,
    self_fence_grace: Option<String>,
    watchdog: Option<std::path::PathBuf>,
    member_stall_timeout: Option<String>,
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
    /// The DNS name its TLS certificate must be valid for (a subjectAltName):
    /// a peer is let in as this member only with a certificate naming it.
    /// `node<ID>` by default.
    pub tls_name: Option<String>,
}

impl MemberEntry {
    /// The name its certificate must carry.
    #[must_use]
    pub fn certificate_name(&self) -> String {
        self.tls_name.clone().unwrap_or_else(|| format!("node{}", self.id))
    }
}

fn default_weight() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    name: String,
    node_id: u16,
    membership: Option<MembershipSource>,
    cpg_group: Option<String>,
    listen: Option<String>,
    #[serde(default)]
    member: Vec<MemberEntry>,
    release_delay: Option<String>,
    deadlock_interval: Option<String>,
    peer_timeout: Option<String>,
    peer_queue_max: Option<usize>,
    lock_delay: Option<String>,
    realtime_priority: Option<u8>,
    #[serde(default)]
    fencing: FileFencing,
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
    if file.cpg_group.as_ref().is_some_and(|g| g.is_empty() || g.len() > CPG_GROUP_LEN_MAX) {
        return Err(invalid("cluster.cpg_group", format!("must be 1 to {CPG_GROUP_LEN_MAX} bytes")));
    }
    let settings = ClusterSettings {
        name: file.name,
        membership: file.membership.unwrap_or(MembershipSource::Static),
        cpg_group: file.cpg_group,
        node_id: file.node_id,
        listen,
        release_delay: duration("cluster.release_delay", file.release_delay, Duration::from_secs(5))?,
        deadlock_interval: duration("cluster.deadlock_interval", file.deadlock_interval, Duration::from_secs(1))?,
        peer_timeout: duration("cluster.peer_timeout", file.peer_timeout, Duration::from_secs(3))?,
        peer_queue_max: file.peer_queue_max.unwrap_or(PEER_QUEUE_MAX_DEFAULT),
        fencing: FencingSettings {
            self_fence_grace: file
                .fencing
                .self_fence_grace
                .map(|text| duration("cluster.fencing.self_fence_grace", Some(text), Duration::ZERO))
                .transpose()?,
            command: file.fencing.command,
            watchdog: file.fencing.watchdog,
            member_stall_timeout: duration(
                "cluster.fencing.member_stall_timeout",
                file.fencing.member_stall_timeout,
                MEMBER_STALL_TIMEOUT_DEFAULT,
            )?,
        },
        members: file.member,
        lock_delay: duration("cluster.lock_delay", file.lock_delay, dlm_core::LOCK_DELAY_DEFAULT)?,
        realtime_priority: file.realtime_priority.unwrap_or(REALTIME_PRIORITY_DEFAULT),
    };
    if !REALTIME_PRIORITY_RANGE.contains(&settings.realtime_priority) {
        return Err(invalid("cluster.realtime_priority", in_range(&REALTIME_PRIORITY_RANGE)));
    }
    if settings.lock_delay > super::LOCK_DELAY_MAX {
        return Err(invalid("cluster.lock_delay", "must be at most 10m"));
    }
    if settings.fencing.command.as_ref().is_some_and(|c| c.is_empty() || c[0].is_empty()) {
        return Err(invalid("cluster.fencing.command", "must name a program"));
    }
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

/// CPG group names are at most 127 bytes.
const CPG_GROUP_LEN_MAX: usize = 127;

impl ClusterSettings {
    /// The CPG group of the cluster's agents.
    #[must_use]
    pub fn cpg_group(&self) -> String {
        self.cpg_group.clone().unwrap_or_else(|| format!("dlm:{}", self.name))
    }

    /// The members as the lock engine takes them: every configured member
    /// at epoch 1 for static membership; at epoch 0 for corosync's, where
    /// the node talks to nobody and holds its clients' requests until its
    /// first view.
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
        let epoch = match self.membership {
            MembershipSource::Static => 1,
            MembershipSource::Corosync => 0,
        };
        dlm_core::cluster::Membership::new(members, epoch)
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
        config.requests_wait_for_views = self.membership == MembershipSource::Corosync;
        Ok(config)
    }
}
