//! Between the wire (`proto`) and the lock engine (`dlm_core`): requests
//! in, effects out, and the [`Rejection`] of a request refused on the way.
//! The flag bits on the wire are the engine's bits (a test checks that
//! every proto enum value matches).

use std::time::Duration;

use dlm_core::{
    ClientRequest, Completion, ConvertRequest, Effect, LockFlags, LockHandle, LockRequest, Mode, Op, RequestError,
    Status, StatusFlags, UnlockFlags, UnlockRequest,
};

use crate::codes::RejectCode;
use crate::proto;

/// A request the agent refuses before it reaches the engine, or one the
/// engine refused: becomes a [`proto::Rejected`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The handle the request named (0 when it named none).
    pub handle: u64,
    /// Why.
    pub code: RejectCode,
    /// What was wrong.
    pub message: String,
}

/// The gRPC status a refusal of a whole call (not of one request) takes;
/// `code` as it came over the wire (an unknown one is an invalid argument).
#[must_use]
pub fn rejection_status(code: &str, message: &str) -> tonic::Status {
    let message = format!("{code}: {message}");
    match RejectCode::parse(code) {
        Some(RejectCode::UnknownLockspace) => tonic::Status::not_found(message),
        Some(RejectCode::LimitExceeded) => tonic::Status::resource_exhausted(message),
        Some(RejectCode::LockspaceBusy) => tonic::Status::failed_precondition(message),
        Some(RejectCode::LockspaceExists) => tonic::Status::already_exists(message),
        Some(RejectCode::ShuttingDown) => tonic::Status::unavailable(message),
        Some(RejectCode::PermissionDenied) => tonic::Status::permission_denied(message),
        _ => tonic::Status::invalid_argument(message),
    }
}

impl Rejection {
    /// The rejection of request `handle` (0: of the session) for `code`.
    #[must_use]
    pub fn new(handle: u64, code: RejectCode, message: impl Into<String>) -> Rejection {
        Rejection { handle, code, message: message.into() }
    }

    /// The engine's error, with its stable code.
    #[must_use]
    pub fn from_engine(handle: u64, error: &RequestError) -> Rejection {
        Rejection::new(handle, RejectCode::of(error), error.to_string())
    }

    /// The `Rejected` message that tells the client.
    #[must_use]
    pub fn into_message(self) -> proto::ServerMessage {
        proto::ServerMessage {
            body: Some(proto::server_message::Body::Rejected(proto::Rejected {
                handle: self.handle,
                code: self.code.as_str().to_string(),
                message: self.message,
            })),
        }
    }
}

/// The handle a client message names (0 when it names none).
#[must_use]
pub fn handle_of(message: &proto::ClientMessage) -> u64 {
    use proto::client_message::Body;
    match &message.body {
        None => 0,
        Some(Body::Lock(lock)) => lock.handle,
        Some(Body::Convert(convert)) => convert.handle,
        Some(Body::Unlock(unlock)) => unlock.handle,
        Some(Body::Cancel(cancel)) => cancel.handle,
    }
}

/// The answer to a request (naming `handle`) that comes while the agent
/// stops: refused as `shutting_down`, nothing done.
#[must_use]
pub fn shutting_down(handle: u64) -> proto::ServerMessage {
    Rejection::new(handle, RejectCode::ShuttingDown, "the agent is shutting down").into_message()
}

/// A client message ready for the engine.
#[derive(Debug)]
pub struct Decoded {
    /// The handle it is about.
    pub handle: u64,
    /// For a new lock: the lockspace name, to be resolved by the driver.
    pub lockspace: Option<String>,
    /// The request (a new lock's `lockspace` field is filled in later).
    pub request: ClientRequest,
    /// The W3C `traceparent` the client passed, if any.
    pub traceparent: Option<String>,
}

/// A mode from the wire, or the rejection of request `handle` that carried it.
///
/// # Errors
/// The value names no mode.
pub fn mode_from_wire(handle: u64, value: i32) -> Result<Mode, Rejection> {
    usize::try_from(value).ok().and_then(Mode::from_index).ok_or_else(|| {
        Rejection::new(
            handle,
            RejectCode::InvalidMode,
            format!("mode {value} is not one of NL CR CW PR PW EX (0 to 5)"),
        )
    })
}

/// A mode's wire value.
#[must_use]
pub fn mode_to_wire(mode: Mode) -> i32 {
    mode.index() as i32
}

fn lock_flags(handle: u64, bits: u32) -> Result<LockFlags, Rejection> {
    LockFlags::from_bits(bits)
        .ok_or_else(|| Rejection::new(handle, RejectCode::InvalidFlags, format!("unknown flag bits {bits:#x}")))
}

fn timeout(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn traceparent(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// Decodes a client message, refusing what the engine's types cannot hold.
///
/// # Errors
/// An empty message, an unknown mode, unknown flag bits.
pub fn decode(message: proto::ClientMessage) -> Result<Decoded, Rejection> {
    use proto::client_message::Body;
    match message.body {
        None => Err(Rejection::new(0, RejectCode::EmptyMessage, "the message carries no request")),
        Some(Body::Lock(lock)) => {
            let handle = lock.handle;
            if handle == 0 {
                return Err(Rejection::new(
                    0,
                    RejectCode::InvalidHandle,
                    "handle 0 is reserved (a Rejected with handle 0 means the session was refused): use 1 or more",
                ));
            }
            Ok(Decoded {
                handle,
                lockspace: Some(lock.lockspace),
                request: ClientRequest::Lock(LockRequest {
                    handle: LockHandle(handle),
                    lockspace: dlm_core::LockspaceId(u32::MAX),
                    name: lock.name,
                    mode: mode_from_wire(handle, lock.mode)?,
                    flags: lock_flags(handle, lock.flags)?,
                    timeout: timeout(lock.timeout_ms),
                }),
                traceparent: traceparent(lock.traceparent),
            })
        }
        Some(Body::Convert(convert)) => {
            let handle = convert.handle;
            Ok(Decoded {
                handle,
                lockspace: None,
                request: ClientRequest::Convert(ConvertRequest {
                    handle: LockHandle(handle),
                    mode: mode_from_wire(handle, convert.mode)?,
                    flags: lock_flags(handle, convert.flags)?,
                    lvb: convert.lvb,
                    timeout: timeout(convert.timeout_ms),
                }),
                traceparent: traceparent(convert.traceparent),
            })
        }
        Some(Body::Unlock(unlock)) => {
            let handle = unlock.handle;
            let flags = UnlockFlags::from_bits(unlock.flags).ok_or_else(|| {
                Rejection::new(
                    handle,
                    RejectCode::InvalidFlags,
                    format!("unknown unlock flag bits {:#x}", unlock.flags),
                )
            })?;
            Ok(Decoded {
                handle,
                lockspace: None,
                request: ClientRequest::Unlock(UnlockRequest { handle: LockHandle(handle), flags, lvb: unlock.lvb }),
                traceparent: None,
            })
        }
        Some(Body::Cancel(cancel)) => Ok(Decoded {
            handle: cancel.handle,
            lockspace: None,
            request: ClientRequest::Cancel { handle: LockHandle(cancel.handle) },
            traceparent: None,
        }),
    }
}

fn op_to_wire(op: Op) -> proto::Op {
    match op {
        Op::Lock => proto::Op::Lock,
        Op::Convert => proto::Op::Convert,
        Op::Unlock => proto::Op::Unlock,
    }
}

/// The wire status of an engine status.
#[must_use]
pub fn status_to_wire(status: Status) -> proto::Status {
    match status {
        Status::Granted => proto::Status::Granted,
        Status::Unlocked => proto::Status::Unlocked,
        Status::Cancelled => proto::Status::Cancelled,
        Status::WouldBlock => proto::Status::WouldBlock,
        Status::Deadlock => proto::Status::Deadlock,
        Status::TimedOut => proto::Status::TimedOut,
        Status::NotFound => proto::Status::NotFound,
        Status::Unavailable => proto::Status::Unavailable,
        Status::Rejected => proto::Status::Rejected,
        Status::Fenced => proto::Status::Fenced,
    }
}

/// The wire form of a completion.
#[must_use]
pub fn completion_to_wire(completion: Completion) -> proto::ServerMessage {
    proto::ServerMessage {
        body: Some(proto::server_message::Body::Completion(proto::Completion {
            handle: completion.handle.0,
            op: op_to_wire(completion.op) as i32,
            status: status_to_wire(completion.status) as i32,
            mode: completion.mode.map(mode_to_wire),
            fencing_token: completion.token.map_or(0, |t| t.0),
            lvb: completion.lvb,
            status_flags: completion.flags.bits(),
        })),
    }
}

/// The wire form of an effect (the session it goes to is the caller's business).
#[must_use]
pub fn effect_to_wire(effect: Effect) -> proto::ServerMessage {
    use proto::server_message::Body;
    match effect {
        Effect::Complete(completion) => completion_to_wire(completion),
        Effect::Blocking { handle, mode, .. } => proto::ServerMessage {
            body: Some(Body::Blocking(proto::Blocking { handle: handle.0, mode: mode_to_wire(mode) })),
        },
        Effect::Revoked { handle, reason, .. } => proto::ServerMessage {
            body: Some(Body::Revoked(proto::Revoked { handle: handle.0, reason: revoke_reason(reason).into() })),
        },
    }
}

/// Why a lock was revoked, as the client reads it.
fn revoke_reason(reason: dlm_core::RevokeReason) -> &'static str {
    match reason {
        dlm_core::RevokeReason::LockspaceReleased => "LockspaceReleased",
        dlm_core::RevokeReason::Shutdown => "agent shutting down",
        dlm_core::RevokeReason::Fenced => "node fenced: no longer in the cluster's quorate view",
    }
}

/// Status flag bits on the wire.
#[must_use]
pub fn status_flags(bits: u32) -> StatusFlags {
    StatusFlags::from_bits(bits & StatusFlags::ALL.bits()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_flag_bits_are_the_engines() {
        use proto::{LockFlag as W, StatusFlag as S, UnlockFlag as U};
        let lock = [
            (W::Noqueue, LockFlags::NOQUEUE),
            (W::Noqueuebast, LockFlags::NOQUEUEBAST),
            (W::Valblk, LockFlags::VALBLK),
            (W::Ivvalblk, LockFlags::IVVALBLK),
            (W::Quecvt, LockFlags::QUECVT),
            (W::Convdeadlk, LockFlags::CONVDEADLK),
            (W::Expedite, LockFlags::EXPEDITE),
            (W::Noorder, LockFlags::NOORDER),
            (W::Headque, LockFlags::HEADQUE),
            (W::Altpr, LockFlags::ALTPR),
            (W::Altcw, LockFlags::ALTCW),
            (W::Persistent, LockFlags::PERSISTENT),
            (W::Adopt, LockFlags::ADOPT),
        ];
        for (wire, flag) in lock {
            assert_eq!(wire as u32, flag.bits(), "{wire:?}");
        }
        assert_eq!(lock.len(), LockFlags::NAMES.len());
        for (wire, flag) in [
            (U::Forceunlock, UnlockFlags::FORCE),
            (U::UnlockValblk, UnlockFlags::VALBLK),
            (U::UnlockIvvalblk, UnlockFlags::IVVALBLK),
        ] {
            assert_eq!(wire as u32, flag.bits(), "{wire:?}");
        }
        for (wire, flag) in [
            (S::Demoted, StatusFlags::DEMOTED),
            (S::Altmode, StatusFlags::ALTMODE),
            (S::Valnotvalid, StatusFlags::VALNOTVALID),
        ] {
            assert_eq!(wire as u32, flag.bits(), "{wire:?}");
        }
        for mode in Mode::ALL {
            assert_eq!(mode_from_wire(0, mode_to_wire(mode)), Ok(mode));
        }
    }

    #[test]
    fn malformed_messages_are_rejected_with_a_code() {
        assert_eq!(decode(proto::ClientMessage { body: None }).unwrap_err().code.as_str(), "empty_message");
        let lock = |mode, flags| proto::ClientMessage {
            body: Some(proto::client_message::Body::Lock(proto::Lock { handle: 3, mode, flags, ..Default::default() })),
        };
        assert_eq!(decode(lock(6, 0)).unwrap_err().code.as_str(), "invalid_mode");
        assert_eq!(decode(lock(-1, 0)).unwrap_err().code.as_str(), "invalid_mode");
        assert_eq!(decode(lock(0, 1 << 20)).unwrap_err().code.as_str(), "invalid_flags");
        assert!(decode(lock(5, 1)).is_ok());
    }
}
