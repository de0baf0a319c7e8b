//! What one event produced, gathered while lockspaces work, drained by the node.

use std::collections::VecDeque;

use crate::effect::Effect;
use crate::ids::{LockHandle, LockspaceId, SessionId};

#[derive(Default)]
pub(crate) struct Outbox {
    /// Effects for the driver, in order.
    pub(crate) effects: VecDeque<Effect>,
    /// Locks that no longer exist: their handles are free in their sessions.
    pub(crate) freed: Vec<(SessionId, LockHandle)>,
    /// Resources the event touched, for the invariant checks that end it.
    pub(crate) touched: Vec<(LockspaceId, u32)>,
    /// Sessions that gained wait-for edges: a new cycle would pass through one.
    pub(crate) deadlock_roots: Vec<SessionId>,
    /// The last wait sequence number handed out (node-wide, so waits in
    /// different lockspaces can be ordered by age).
    pub(crate) wait_seq: u64,
    /// Grants made so far, to tell whether an operation granted anything.
    pub(crate) grants: u64,
    /// Locks that exist, in every lockspace (for [`crate::Limits::locks_max`]).
    pub(crate) locks: u64,
    /// Record the names of resources freed (a cluster node releases its
    /// mastership of them after a delay).
    pub(crate) track_released: bool,
    /// Resources freed since the driver last drained them (when tracked).
    pub(crate) released: Vec<(LockspaceId, Box<[u8]>)>,
}
