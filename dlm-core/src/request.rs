//! What a client asks of the engine, and the typed errors for requests that
//! cannot be accepted. An accepted request always ends in exactly one
//! [`crate::Completion`]; a rejected one changes nothing.

use std::time::Duration;

use crate::flags::{LockFlags, UnlockFlags};
use crate::ids::{LockHandle, LockspaceId};
use crate::limits::Limit;
use crate::mode::Mode;

/// A request from a client session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientRequest {
    /// Create a lock on a resource (or adopt an orphan, with `ADOPT`).
    Lock(LockRequest),
    /// Change the mode of a granted lock.
    Convert(ConvertRequest),
    /// Release a lock.
    Unlock(UnlockRequest),
    /// Cancel the pending request (lock or convert) of a lock: it completes
    /// with [`crate::Status::Cancelled`]. Cancelling a lock with nothing
    /// pending is the error [`RequestError::NotPending`].
    Cancel {
        /// The lock whose pending request to cancel.
        handle: LockHandle,
    },
}

/// A new lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockRequest {
    /// The client's name for the new lock; must not be in use in the session.
    pub handle: LockHandle,
    /// The lockspace of the resource.
    pub lockspace: LockspaceId,
    /// The resource name: 1 to 64 bytes, any bytes.
    pub name: Vec<u8>,
    /// The mode asked for.
    pub mode: Mode,
    /// Request flags.
    pub flags: LockFlags,
    /// Give up (status `TimedOut`) if not granted within this time.
    pub timeout: Option<Duration>,
}

/// A conversion of a granted lock to another mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertRequest {
    /// The lock to convert.
    pub handle: LockHandle,
    /// The mode asked for.
    pub mode: Mode,
    /// Request flags.
    pub flags: LockFlags,
    /// The value block to write when converting down from PW or EX with `VALBLK`.
    pub lvb: Option<Vec<u8>>,
    /// Give up (status `TimedOut`, the lock keeps its mode) if not granted within this time.
    pub timeout: Option<Duration>,
}

/// The release of a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnlockRequest {
    /// The lock to release.
    pub handle: LockHandle,
    /// Unlock flags.
    pub flags: UnlockFlags,
    /// The value block to write (holders of PW or EX, with `VALBLK`).
    pub lvb: Option<Vec<u8>>,
}

/// Why a request or an administrative call was rejected. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The session is not open.
    #[error("unknown session")]
    UnknownSession,
    /// A session with this id is already open.
    #[error("session already open")]
    SessionExists,
    /// No lockspace has this id or name.
    #[error("unknown lockspace")]
    UnknownLockspace,
    /// A lockspace with this name already exists.
    #[error("lockspace already exists")]
    LockspaceExists,
    /// The lockspace still has locks; release it with `force` to drop them.
    #[error("lockspace has {locks} locks")]
    LockspaceBusy {
        /// Locks in the lockspace, orphans included.
        locks: u32,
    },
    /// A lockspace name must be 1 to 64 bytes.
    #[error("lockspace name must be 1 to 64 bytes, got {len}")]
    InvalidLockspaceName {
        /// The length given.
        len: usize,
    },
    /// A value block length must be a multiple of 8 from 8 to 256.
    #[error("value block length must be a multiple of 8 from 8 to 256, got {len}")]
    InvalidLvbLen {
        /// The length given.
        len: usize,
    },
    /// A resource name must be 1 to 64 bytes.
    #[error("resource name must be 1 to 64 bytes, got {len}")]
    InvalidResourceName {
        /// The length given.
        len: usize,
    },
    /// The value block given is longer than the lockspace's.
    #[error("value block of {len} bytes exceeds the lockspace's {max}")]
    LvbTooLong {
        /// The length given.
        len: usize,
        /// The lockspace's value block length.
        max: usize,
    },
    /// The flags do not make sense together or for this request.
    #[error("invalid flags: {0}")]
    InvalidFlags(&'static str),
    /// `QUECVT` is not allowed for this conversion (it could never wait).
    #[error("QUECVT is not allowed converting {from} to {to}")]
    QuecvtNotAllowed {
        /// The granted mode.
        from: Mode,
        /// The mode asked for.
        to: Mode,
    },
    /// The session already has a lock with this handle.
    #[error("lock handle already in use")]
    HandleInUse,
    /// The session has no lock with this handle.
    #[error("no such lock")]
    UnknownHandle,
    /// The lock has a request in progress (the DLM's `EBUSY`): wait for its
    /// completion, cancel it, or unlock with `FORCEUNLOCK`.
    #[error("a request on this lock is in progress")]
    Pending,
    /// There is nothing to cancel: the lock has no request in progress.
    #[error("nothing to cancel")]
    NotPending,
    /// A named bound was reached.
    #[error("limit {} reached", .0.name())]
    LimitExceeded(Limit),
}
