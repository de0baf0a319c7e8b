//! What the engine asks its driver to do: complete a request, deliver a
//! blocking callback, tell a client it lost a lock.

use crate::flags::StatusFlags;
use crate::ids::{FencingToken, LockHandle, SessionId};
use crate::mode::Mode;

/// Which request a completion ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A [`crate::ClientRequest::Lock`].
    Lock,
    /// A [`crate::ClientRequest::Convert`].
    Convert,
    /// A [`crate::ClientRequest::Unlock`].
    Unlock,
}

impl Op {
    /// Every request kind.
    pub const ALL: [Op; 3] = [Op::Lock, Op::Convert, Op::Unlock];

    /// The lower-case name used in metrics and logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Op::Lock => "lock",
            Op::Convert => "convert",
            Op::Unlock => "unlock",
        }
    }
}

/// How a request ended (the DLM's `sb_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Granted (a lock or a conversion; adoption of an orphan too).
    Granted,
    /// Unlocked (the DLM's `EUNLOCK`).
    Unlocked,
    /// The request was cancelled, by `Cancel` or a forced unlock (`ECANCEL`).
    Cancelled,
    /// `NOQUEUE` and not grantable at once (`EAGAIN`).
    WouldBlock,
    /// Chosen as the victim of a deadlock, or a conversion deadlock without
    /// `CONVDEADLK` (`EDEADLK`).
    Deadlock,
    /// The request's timeout passed before it was granted (`ETIMEDOUT`).
    TimedOut,
    /// `ADOPT` found no orphan of that resource in that mode (`ENOENT`).
    NotFound,
    /// The request needs a cluster node that cannot be reached (its
    /// resource's directory or master); nothing was granted.
    Unavailable,
    /// The resource's master (another node) refused the request; nothing
    /// changed there.
    Rejected,
    /// This node is no longer a member of the cluster's quorate view (it was
    /// left out, or lost quorum): it fenced itself, and nothing was granted.
    Fenced,
}

impl Status {
    /// Every status, so that lists of them (metric labels) cannot miss one.
    pub const ALL: [Status; 10] = [
        Status::Granted,
        Status::Unlocked,
        Status::Cancelled,
        Status::WouldBlock,
        Status::Deadlock,
        Status::TimedOut,
        Status::NotFound,
        Status::Unavailable,
        Status::Rejected,
        Status::Fenced,
    ];

    /// The lower-case name used in metrics and logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Status::Granted => "granted",
            Status::Unlocked => "unlocked",
            Status::Cancelled => "cancelled",
            Status::WouldBlock => "would_block",
            Status::Deadlock => "deadlock",
            Status::TimedOut => "timed_out",
            Status::NotFound => "not_found",
            Status::Unavailable => "unavailable",
            Status::Rejected => "rejected",
            Status::Fenced => "fenced",
        }
    }
}

/// The end of one request (the DLM's completion AST).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The session that made the request.
    pub session: SessionId,
    /// The lock the request was about.
    pub handle: LockHandle,
    /// Which request ended.
    pub op: Op,
    /// How it ended.
    pub status: Status,
    /// The mode the lock holds now; `None` when the lock no longer exists
    /// (unlocked, or a new request that was not granted).
    pub mode: Option<Mode>,
    /// The fencing token of this grant (`Granted` only).
    pub token: Option<FencingToken>,
    /// The resource's value block, when the request had `VALBLK` and the grant reads it.
    pub lvb: Option<Vec<u8>>,
    /// `DEMOTED`, `ALTMODE`, `VALNOTVALID`.
    pub flags: StatusFlags,
}

/// Why a client lost a lock without asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RevokeReason {
    /// The lockspace was released with `force`.
    LockspaceReleased,
    /// The node is shutting down ([`crate::cluster::ClusterNode::shutdown`]).
    Shutdown,
    /// The node left the cluster's quorate view: the other members recover
    /// its locks, so it may not keep them ([`Status::Fenced`]).
    Fenced,
}

/// An effect for the driver to carry out, in the order polled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Deliver a completion to its session.
    Complete(Completion),
    /// Tell the holder of a lock that it blocks a request for `mode` (the
    /// DLM's blocking AST). Sent once per holder per blocking episode: again
    /// only for a stronger blocked mode, or after the lock is granted anew.
    Blocking {
        /// The holder's session.
        session: SessionId,
        /// The holder's lock.
        handle: LockHandle,
        /// The blocked mode.
        mode: Mode,
    },
    /// The lock is gone; the client must stop relying on it.
    Revoked {
        /// The former holder's session.
        session: SessionId,
        /// The lock.
        handle: LockHandle,
        /// Why.
        reason: RevokeReason,
    },
}

impl Effect {
    /// The session the effect is for.
    #[must_use]
    pub fn session(&self) -> SessionId {
        match self {
            Effect::Complete(c) => c.session,
            Effect::Blocking { session, .. } | Effect::Revoked { session, .. } => *session,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_and_op_is_listed_once_under_its_own_name() {
        let names: std::collections::BTreeSet<&str> = Status::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), Status::ALL.len());
        assert!(names.contains("fenced"), "the status the metrics' hand-written list missed");
        let ops: std::collections::BTreeSet<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        assert_eq!(ops.len(), Op::ALL.len());
    }
}
