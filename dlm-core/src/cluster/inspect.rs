//! What a [`ClusterNode`] shows of itself, without changing anything: its
//! identity and counts, its links, and dumps of what it masters (as a
//! [`Node`]'s).

use crate::cluster::{ClusterConfig, ClusterNode, ClusterStats, NodeId};
use crate::dump::{LockInfo, LockspaceInfo, ResourceInfo};
use crate::effect::Op;
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::node::Node;
use crate::request::RequestError;

impl ClusterNode {
    /// This node's id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        self.config.node
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The engine (the queues of the resources mastered here).
    #[must_use]
    pub fn engine(&self) -> &Node {
        &self.engine
    }

    /// What the cluster layer did so far.
    #[must_use]
    pub fn stats(&self) -> ClusterStats {
        self.stats
    }

    /// Resources mastered here (in use or idle).
    #[must_use]
    pub fn mastered_count(&self) -> usize {
        self.masters.len()
    }

    /// Directory entries kept here.
    #[must_use]
    pub fn directory_count(&self) -> usize {
        self.directory.len()
    }

    /// Locks of local clients mastered on other nodes.
    #[must_use]
    pub fn remote_lock_count(&self) -> usize {
        self.requester.len()
    }

    /// The node mastering a local client's lock, when it is another node.
    #[must_use]
    pub fn remote_master(&self, session: SessionId, handle: LockHandle) -> Option<NodeId> {
        self.requester.get(session, handle).and_then(|l| l.master)
    }

    /// The other members, by id.
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.links.ids()
    }

    /// Whether the link to a peer is up, and how many messages to it await acknowledgement.
    #[must_use]
    pub fn link_state(&self, peer: NodeId) -> Option<(bool, usize)> {
        self.links.state(peer)
    }

    /// Whether a message other than a heartbeat awaits the peer's acknowledgement.
    #[must_use]
    pub fn link_busy(&self, peer: NodeId) -> bool {
        self.links.busy(peer)
    }

    /// Every lockspace with its counts (of the resources mastered here).
    #[must_use]
    pub fn lockspaces(&self) -> Vec<LockspaceInfo> {
        self.engine.lockspaces()
    }

    /// The resources mastered here (see [`Node::dump`]).
    ///
    /// # Errors
    /// Unknown lockspace.
    pub fn dump(
        &self,
        id: LockspaceId,
        name: Option<&[u8]>,
        max_resources: usize,
    ) -> Result<Vec<ResourceInfo>, RequestError> {
        self.engine.dump(id, name, max_resources)
    }

    /// A page of the dump of the resources mastered here (see [`Node::dump_page`]).
    ///
    /// # Errors
    /// Unknown lockspace.
    pub fn dump_page(
        &self,
        id: LockspaceId,
        name: Option<&[u8]>,
        from: Option<&crate::DumpCursor>,
        bounds: crate::PageBounds,
    ) -> Result<crate::DumpPage, RequestError> {
        self.engine.dump_page(id, name, from, bounds)
    }

    /// A local client's lock as a dump shows it; for a lock mastered
    /// elsewhere, this node's copy (modes only).
    #[must_use]
    pub fn lock_info(&self, session: SessionId, handle: LockHandle) -> Option<LockInfo> {
        if let Some(info) = self.engine.lock_info(session, handle) {
            return Some(info);
        }
        let lock = self.requester.get(session, handle)?;
        Some(LockInfo {
            session,
            handle,
            granted: lock.granted,
            requested: lock.pending.filter(|&op| op != Op::Unlock).map(|_| lock.requested),
            token: lock.token,
            flags: lock.request.as_ref().map_or(crate::flags::LockFlags::EMPTY, |r| r.flags),
            orphan: false,
        })
    }

    /// The resources mastered here, sorted (idle ones included).
    #[must_use]
    pub fn masterships(&self) -> Vec<(LockspaceId, Vec<u8>)> {
        self.masters.sorted().into_iter().map(|((id, name), _)| (id, name.into_vec())).collect()
    }

    /// The directory entries kept here: resource and master, sorted.
    #[must_use]
    pub fn directory_entries(&self) -> Vec<(LockspaceId, Vec<u8>, NodeId)> {
        self.directory.entries()
    }

    /// Checks the engine's invariants (see [`Node::check_invariants`]).
    ///
    /// # Errors
    /// A description of the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.engine.check_invariants()
    }
}
