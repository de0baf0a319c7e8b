//! Identifiers that cross the engine's boundary.

use std::fmt;

/// A client session. Chosen by the driver (the agent), unique among the
/// sessions it has open; every lock belongs to exactly one session or is an orphan.
///
/// In a cluster the driver makes them unique across nodes (the node id in the
/// high bits), so that a wait-for graph can join edges from several masters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// The client's name for one of its locks, unique within its session and
/// chosen by the client, so that it can cancel a request before it hears back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockHandle(pub u64);

/// A lockspace, as returned by [`crate::Node::create_lockspace`]. Ids are never
/// reused, so a request naming a released lockspace fails instead of landing in
/// a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockspaceId(pub u32);

/// The fencing token of a grant: strictly increasing across the grants of one
/// resource, so that storage behind the lock can reject a stale holder
/// (Chubby's sequencers). How that holds across restarts, releases and
/// views: [`crate::tokens`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session {}", self.0)
    }
}

impl fmt::Display for LockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lock {}", self.0)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
