//! What the peer transport must know of the membership to let a peer in
//! ([`PeerView`]): the driver updates it as it takes views, and the peer
//! transport reads it at each hello. Below both, so neither imports the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use dlm_core::cluster::{NodeId, View};

/// What the peer transport must know of the membership to let a peer in:
/// this process's incarnation, the node's epoch, and (once views come from
/// the membership) the incarnation each member has in the current view. The
/// driver updates it as it takes views; the transport reads it at each hello.
pub struct PeerView {
    /// This node's id.
    node: NodeId,
    /// This process's incarnation: drawn at start, renewed each time the
    /// node fences itself (it comes back as a new incarnation).
    own: AtomicU64,
    epoch: AtomicU64,
    /// By view: the members' incarnations in the node's current view. Without
    /// views (static membership): each peer's first incarnation seen, kept
    /// for good, since a restarted peer cannot be taken back.
    incarnations: Mutex<(bool, HashMap<NodeId, u64>)>,
}

impl PeerView {
    /// The view of a process just started, at `epoch`; `by_views`: views
    /// will come from the membership, and until the first no peer is let in.
    #[must_use]
    pub fn new(node: NodeId, epoch: u64, by_views: bool) -> PeerView {
        // Time and pid: distinct across restarts of one node, which is all
        // that is asked of it.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        PeerView {
            node,
            own: AtomicU64::new(nanos ^ (u64::from(std::process::id()) << 32)),
            epoch: AtomicU64::new(epoch),
            incarnations: Mutex::new((by_views, HashMap::new())),
        }
    }

    /// This process's incarnation now.
    #[must_use]
    pub fn own(&self) -> u64 {
        self.own.load(Ordering::Acquire)
    }

    /// The node's epoch now.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The node took `view`.
    pub fn take(&self, view: &View) {
        let mut incarnations = self.incarnations.lock().unwrap_or_else(PoisonError::into_inner);
        *incarnations = (true, view.members.iter().map(|m| (m.id, m.incarnation)).collect());
        if let Some(own) = view.incarnation(self.node) {
            self.own.store(own, Ordering::Release);
        }
        self.epoch.store(view.epoch, Ordering::Release);
    }

    /// Whether `peer` may connect as `incarnation`: the one its view names,
    /// or without views the first one seen (recorded if first).
    pub fn accept(&self, peer: NodeId, incarnation: u64) -> bool {
        let mut guard = self.incarnations.lock().unwrap_or_else(PoisonError::into_inner);
        let (viewed, incarnations) = &mut *guard;
        if *viewed {
            incarnations.get(&peer) == Some(&incarnation)
        } else {
            *incarnations.entry(peer).or_insert(incarnation) == incarnation
        }
    }
}
