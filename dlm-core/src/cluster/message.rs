//! The messages cluster nodes exchange, as values. Their encoding on the wire
//! is in [`crate::cluster::wire`].
//!
//! They follow the Linux DLM's in spirit: a node asks a resource's
//! *directory* node who masters it (`Lookup`), sends its clients' requests
//! to the *master* (`Request`, `Convert`, `Unlock`, `Cancel`), and hears back
//! with completions and blocking callbacks. A master that stops using a
//! resource tells the directory (`Remove`).

use std::time::Duration;

use crate::cluster::phase::RecoveryPhase;
use crate::cluster::pressure::NodePressure;
use crate::deadlock::{Blocker, WaitRef};
use crate::effect::Completion;
use crate::flags::{LockFlags, UnlockFlags};
use crate::ids::{LockHandle, SessionId};
use crate::mode::{Mode, ModeSet};

/// A cluster member's id (0 to 65 535). A session id carries its node's id
/// in its top 16 bits, so every node can tell whose a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u16);

/// Where a session id keeps its node's id.
pub const SESSION_NODE_SHIFT: u32 = 48;

impl NodeId {
    /// The node a session belongs to.
    #[must_use]
    pub const fn of_session(session: SessionId) -> NodeId {
        NodeId((session.0 >> SESSION_NODE_SHIFT) as u16)
    }

    /// The `serial`-th session id of this node (`serial` below 2^48).
    #[must_use]
    pub const fn session(self, serial: u64) -> SessionId {
        SessionId(((self.0 as u64) << SESSION_NODE_SHIFT) | (serial & ((1 << SESSION_NODE_SHIFT) - 1)))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// A wait-for edge as a master reports it: `from` waits, through `wait`
/// (a pending request on the reporting node), for `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteEdge {
    /// The waiting session.
    pub from: SessionId,
    /// The session waited for.
    pub to: SessionId,
    /// The waiting request, as the reporting master knows it.
    pub wait: WaitRef,
    /// The lock of `to` in the way, as the reporting master knows it.
    pub blocker: Blocker,
}

/// One message between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMessage {
    /// To a directory node: who masters this resource? `stale` names a
    /// mastership (node and term) whose node answered "not master":
    /// if the directory still records exactly that one, the node's `Remove`
    /// is on its way, and the directory holds the question until it arrives.
    Lookup {
        /// Lockspace name.
        lockspace: Vec<u8>,
        /// Resource name.
        name: Vec<u8>,
        /// A mastership found stale.
        stale: Option<(NodeId, u64)>,
    },
    /// The directory's answer. `master` is the asking node itself when the
    /// resource had no master (the first locker masters it); `None` when
    /// the directory does not know the lockspace.
    LookupReply {
        /// Lockspace name.
        lockspace: Vec<u8>,
        /// Resource name.
        name: Vec<u8>,
        /// The master.
        master: Option<NodeId>,
        /// The directory's number for this mastership (a new one each time
        /// it records a master), so that a stale one is told from a new one.
        term: u64,
        /// Fencing tokens handed out for this lockspace so far, as far as the
        /// directory knows: a new master starts above it.
        token_floor: u64,
    },
    /// To the directory: the sender no longer masters this resource.
    Remove {
        /// Lockspace name.
        lockspace: Vec<u8>,
        /// Resource name.
        name: Vec<u8>,
        /// The mastership's term.
        term: u64,
        /// The sender's last fencing token in the lockspace.
        token_floor: u64,
    },
    /// To a master: a new lock for a client of the sender.
    Request {
        /// Lockspace name.
        lockspace: Vec<u8>,
        /// The client's session (of the sending node).
        session: SessionId,
        /// The client's handle.
        handle: LockHandle,
        /// Resource name.
        name: Vec<u8>,
        /// Mode asked for.
        mode: Mode,
        /// Request flags.
        flags: LockFlags,
        /// Timeout of the request, counted at the master.
        timeout: Option<Duration>,
    },
    /// To a master: convert a lock.
    Convert {
        /// The client's session.
        session: SessionId,
        /// The client's handle.
        handle: LockHandle,
        /// Mode asked for.
        mode: Mode,
        /// Request flags.
        flags: LockFlags,
        /// Value block to write.
        lvb: Option<Vec<u8>>,
        /// Timeout of the conversion.
        timeout: Option<Duration>,
    },
    /// To a master: release a lock.
    Unlock {
        /// The client's session.
        session: SessionId,
        /// The client's handle.
        handle: LockHandle,
        /// Unlock flags.
        flags: UnlockFlags,
        /// Value block to write.
        lvb: Option<Vec<u8>>,
    },
    /// To a master: cancel a lock's pending request.
    Cancel {
        /// The client's session.
        session: SessionId,
        /// The client's handle.
        handle: LockHandle,
    },
    /// From a node that was sent a `Request` but does not master the resource.
    NotMaster {
        /// The client's session.
        session: SessionId,
        /// The client's handle.
        handle: LockHandle,
    },
    /// From a master: a request of a client of the receiver ended.
    Complete(Completion),
    /// From a master: a client of the receiver blocks a request for `mode`.
    Blocking {
        /// The holder's session.
        session: SessionId,
        /// The holder's handle.
        handle: LockHandle,
        /// The blocked mode.
        mode: Mode,
    },
    /// A client session of the sender ended: drop its locks (orphan the persistent ones).
    EndSession {
        /// The session.
        session: SessionId,
    },
    /// To the deadlock coordinator: every wait-for edge on the sender now.
    WaitEdges {
        /// The edges (at most [`WAIT_EDGES_MAX`]).
        edges: Vec<RemoteEdge>,
    },
    /// From the deadlock coordinator to a master of a cycle it found in the
    /// reports: are these edges (of the receiver's report) still there?
    /// For each wait and session waited for, one of the blockers listed must
    /// still be in the way, the very same (see [`Blocker`]).
    ConfirmEdges {
        /// The coordinator's number for the cycle.
        probe: u64,
        /// The edges (at most [`WAIT_EDGES_MAX`]).
        edges: Vec<RemoteEdge>,
    },
    /// A master's answer to [`PeerMessage::ConfirmEdges`].
    EdgesConfirmed {
        /// The coordinator's number for the cycle.
        probe: u64,
        /// Whether every edge asked about is still there.
        confirmed: bool,
    },
    /// From the deadlock coordinator: fail this wait (of the receiver) as a deadlock victim.
    AbortWait {
        /// The wait, as the receiver reported it.
        wait: WaitRef,
    },
    /// Nothing to say: sent on a quiet link so that its acknowledgement
    /// shows the peer is still there.
    Heartbeat,
    /// The sender's node pressure figures ([`crate::cluster::NodePressure`]):
    /// kept by the receiver, which decides nothing on them.
    Pressure(NodePressure),
    /// Recovery: the sender has passed this step of the epoch's recovery
    /// (everything it sent for the step is ahead of this on the link).
    Barrier {
        /// The step.
        phase: RecoveryPhase,
    },
    /// Recovery, to a resource's directory node: the sender masters it.
    Mastered {
        /// Lockspace name.
        lockspace: Vec<u8>,
        /// Resource name.
        name: Vec<u8>,
        /// The mastership's term, as the directory that recorded it gave it.
        term: u64,
    },
    /// Recovery, to a resource's master: a lock of a client of the sender,
    /// to be added back to the queues (in place of the one there, if any).
    RecoverLock(RecoveredLock),
    /// Recovery, to a member that masters resources the sender's clients
    /// hold locks of (every member, so that one can drop what the sender no
    /// longer has): how many locks the receiver should hold for the sender's
    /// clients, and a digest of them, as the sender's copies say once the
    /// `RecoverLock`s ahead of this are in. If the receiver's own count and
    /// digest are the same, its locks stay as they are and none travels.
    RecoverDigest {
        /// The locks.
        locks: u64,
        /// The digest (see `recovery::survivors`).
        digest: u128,
    },
    /// Recovery, after a digest that did not match: every lock of the
    /// sender's clients that the receiver masters is ahead of this.
    RecoverListed,
    /// Recovery, a master's answer to a digest or a listing (any refusal
    /// is ahead of it).
    RecoverChecked {
        /// The digest matched (a listing is always taken as it is).
        matched: bool,
    },
    /// Recovery, a node's answer to a lock sent straight to it
    /// ([`RecoveredLock::direct`]) for a resource it does not master: the
    /// sender must ask the directory.
    RecoverRefused {
        /// Lockspace name.
        lockspace: Vec<u8>,
        /// Resource name.
        name: Vec<u8>,
    },
}

/// A lock a node sends its resource's master during recovery (its copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredLock {
    /// Lockspace name.
    pub lockspace: Vec<u8>,
    /// Resource name.
    pub name: Vec<u8>,
    /// The client's session (of the sending node).
    pub session: SessionId,
    /// The client's handle.
    pub handle: LockHandle,
    /// The granted mode.
    pub mode: Mode,
    /// The fencing token of its grant.
    pub token: u64,
    /// The lock's flags (`PERSISTENT` matters).
    pub flags: LockFlags,
    /// The value block the holder read at its grant, if it asked for it.
    pub lvb: Option<Vec<u8>>,
    /// The lock was being unlocked when the view came: it is not added back
    /// (the unlock counts as done), and only says whether the value block
    /// may have been written (`lvb_unsure`).
    pub unlocking: bool,
    /// A request of the lock in flight when the view came may have written
    /// the value block: the master cannot tell whether it did, and marks it
    /// not valid.
    pub lvb_unsure: bool,
    /// Other modes a conversion in flight may have left the lock in that
    /// `mode` does not stand for (a conversion between CW and PR): once
    /// every lock is back, the master takes one of them if `mode` conflicts
    /// with a lock granted beside it.
    pub or_modes: ModeSet,
    /// Sent straight to the master the sender knew, not to one the
    /// directory named in this recovery: the receiver takes it only if it
    /// masters the resource already, and else refuses it
    /// ([`PeerMessage::RecoverRefused`]).
    pub direct: bool,
}

/// Wait-for edges one report carries at most.
pub const WAIT_EDGES_MAX: usize = 16_384;

/// A message with its place in the sender's stream to the receiver: the
/// link layer numbers messages per peer so that a receiver drops duplicates,
/// puts reordered ones back in order, and a sender can resend what was not
/// acknowledged after a reconnection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The membership epoch the sender is in.
    pub epoch: u64,
    /// The message's number on this link (from 1); 0 for a bare acknowledgement.
    pub seq: u64,
    /// Every message of the receiver's stream up to this number has arrived.
    pub ack: u64,
    /// The message (none in a bare acknowledgement).
    pub message: Option<PeerMessage>,
}

/// Peer input that breaks the protocol: the driver drops the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The sender is not a member (or is this node).
    #[error("{0} is not a peer of this node")]
    NotAPeer(NodeId),
    /// The sender is in another membership epoch.
    #[error("epoch {got}, this node is in epoch {expected}")]
    WrongEpoch {
        /// The sender's.
        got: u64,
        /// Ours.
        expected: u64,
    },
    /// A message about a session of a node other than its sender.
    #[error("{from} spoke for a session of {owner}")]
    ForeignSession {
        /// The sender.
        from: NodeId,
        /// The session's node.
        owner: NodeId,
    },
}

/// Checks that a message about a client session comes from that session's node.
pub(super) fn check_sessions(from: NodeId, message: &PeerMessage) -> Result<(), PeerError> {
    let session = match message {
        PeerMessage::Request { session, .. }
        | PeerMessage::Convert { session, .. }
        | PeerMessage::Unlock { session, .. }
        | PeerMessage::Cancel { session, .. }
        | PeerMessage::EndSession { session } => *session,
        PeerMessage::RecoverLock(lock) => lock.session,
        _ => return Ok(()),
    };
    let owner = NodeId::of_session(session);
    if owner == from { Ok(()) } else { Err(PeerError::ForeignSession { from, owner }) }
}
