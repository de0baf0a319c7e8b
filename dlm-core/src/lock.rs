//! One lock: its owner, its modes, where it sits in its resource's queues.

use crate::flags::{LockFlags, StatusFlags};
use crate::ids::{LockHandle, SessionId};
use crate::mode::Mode;
use crate::slab::NIL;
use crate::time::Instant;

/// Which of its resource's three queues a lock is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockState {
    /// A new request being decided: on no queue yet.
    New,
    /// Granted in `granted` mode, nothing pending.
    Granted,
    /// Granted in `granted` mode, waiting to convert to `requested`.
    Converting,
    /// A new request for `requested`, not granted yet.
    Waiting,
}

pub(crate) struct Lock {
    /// The owning session; kept after the lock is orphaned so a dump can say whose it was.
    pub(crate) session: SessionId,
    pub(crate) handle: LockHandle,
    pub(crate) resource: u32,
    /// Queue links (slab indices, `NIL` at the ends).
    pub(crate) prev: u32,
    pub(crate) next: u32,
    pub(crate) state: LockState,
    /// The granted mode; `None` until the first grant.
    pub(crate) granted: Option<Mode>,
    /// The mode of the pending request; meaningless in state `Granted`.
    pub(crate) requested: Mode,
    /// The flags of the current (or last) request.
    pub(crate) flags: LockFlags,
    /// Status flags gathered for the pending request's completion (`DEMOTED`).
    pub(crate) status: StatusFlags,
    /// The highest blocked mode this holder has been told about since its
    /// last grant: one blocking callback per holder per blocking episode.
    pub(crate) bast_level: Option<Mode>,
    /// A `PERSISTENT` lock whose session ended: owned by nobody until adopted.
    pub(crate) orphan: bool,
    /// The fencing token of the latest grant (0 before the first).
    pub(crate) token: u64,
    /// When the pending request started waiting, as a node-wide sequence number:
    /// orders waits for the deadlock victim rule.
    pub(crate) wait_seq: u64,
    /// When the pending request times out.
    pub(crate) deadline: Option<Instant>,
}

impl Lock {
    pub(crate) fn new(session: SessionId, handle: LockHandle, resource: u32, mode: Mode, flags: LockFlags) -> Lock {
        Lock {
            session,
            handle,
            resource,
            prev: NIL,
            next: NIL,
            state: LockState::New,
            granted: None,
            requested: mode,
            flags,
            status: StatusFlags::EMPTY,
            bast_level: None,
            orphan: false,
            token: 0,
            wait_seq: 0,
            deadline: None,
        }
    }

    pub(crate) fn is_pending(&self) -> bool {
        matches!(self.state, LockState::Converting | LockState::Waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Locks are the engine's most numerous object (see the memory benchmark).
    #[test]
    fn a_lock_stays_small() {
        assert!(std::mem::size_of::<Lock>() <= 80, "Lock is {} bytes", std::mem::size_of::<Lock>());
    }
}
