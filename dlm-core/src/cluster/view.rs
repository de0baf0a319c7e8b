//! A membership view, as the membership layer (corosync's CPG and
//! votequorum, through the agent) hands it to a node: who is in the cluster
//! from now on, in which epoch, and whether that part of the cluster has
//! quorum.

use crate::cluster::members::{Member, Membership};
use crate::cluster::message::NodeId;

/// One member of a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewMember {
    /// Its id.
    pub id: NodeId,
    /// Its share of directory entries (see [`Member::weight`]).
    pub weight: u8,
    /// Which start of that node's process this is: a member that comes back
    /// with another incarnation restarted and lost its state, and its locks
    /// are recovered as if it had left.
    pub incarnation: u64,
}

/// The members of the cluster from one epoch on.
///
/// Every member is handed the same views in the same order (the membership
/// layer's guarantee), each with an epoch larger than the one before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Strictly increasing from one view to the next.
    pub epoch: u64,
    /// The members (any order; the view sorts them).
    pub members: Vec<ViewMember>,
    /// Whether this part of the cluster has quorum. A node handed a view
    /// that is not quorate, or that leaves it out, fences itself.
    pub quorate: bool,
}

impl View {
    /// The membership this view describes.
    ///
    /// # Errors
    /// As [`Membership::new`].
    pub fn membership(&self) -> Result<Membership, String> {
        let members = self.members.iter().map(|m| Member { id: m.id, weight: m.weight }).collect();
        Membership::new(members, self.epoch)
    }

    /// A member's incarnation.
    #[must_use]
    pub fn incarnation(&self, id: NodeId) -> Option<u64> {
        self.members.iter().find(|m| m.id == id).map(|m| m.incarnation)
    }
}

/// A view a node cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// Its epoch is not larger than the node's.
    #[error("epoch {got} is not after this node's epoch {current}")]
    StaleEpoch {
        /// The view's.
        got: u64,
        /// The node's.
        current: u64,
    },
    /// Its members are not a valid membership.
    #[error("{0}")]
    Members(String),
}
