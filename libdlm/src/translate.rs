//! libdlm's words in the agent's and back: lock and unlock flags to the
//! wire's bits, the wire's completion status and refusal codes to the
//! `errno` values a libdlm program reads in `sb_status` or `errno`.

use std::ffi::c_int;

use dlm_proto::codes::RejectCode;
use dlm_proto::proto::{self, LockFlag, UnlockFlag};

use crate::abi::{self, ECANCEL, EUNLOCK};

/// `sb_status` (or `errno`) of a lock lost without the program asking: its
/// lockspace was released with force, or the agent's session ended (the
/// agent stopped, or the node left the cluster).
pub const LOST: c_int = libc::ENOTCONN;

/// The wire's lock flags for libdlm's `flags` (of a lock or conversion).
/// `LKF_CONVERT`, `LKF_WAIT` are the library's own; `LKF_NODLCKWT`,
/// `LKF_NODLCKBLK` and `LKF_TIMEOUT` have no meaning here and are ignored,
/// as the kernel ignores the first two.
#[must_use]
pub fn lock_flags(flags: u32) -> u32 {
    const PAIRS: [(u32, LockFlag); 12] = [
        (abi::LKF_NOQUEUE, LockFlag::Noqueue),
        (abi::LKF_NOQUEUEBAST, LockFlag::Noqueuebast),
        (abi::LKF_VALBLK, LockFlag::Valblk),
        (abi::LKF_IVVALBLK, LockFlag::Ivvalblk),
        (abi::LKF_QUECVT, LockFlag::Quecvt),
        (abi::LKF_CONVDEADLK, LockFlag::Convdeadlk),
        (abi::LKF_EXPEDITE, LockFlag::Expedite),
        (abi::LKF_NOORDER, LockFlag::Noorder),
        (abi::LKF_HEADQUE, LockFlag::Headque),
        (abi::LKF_ALTPR, LockFlag::Altpr),
        (abi::LKF_ALTCW, LockFlag::Altcw),
        (abi::LKF_PERSISTENT, LockFlag::Persistent),
    ];
    let mut wire = PAIRS.iter().filter(|(lkf, _)| flags & lkf != 0).fold(0, |bits, (_, flag)| bits | *flag as u32);
    if flags & abi::LKF_ORPHAN != 0 {
        wire |= LockFlag::Adopt as u32;
    }
    wire
}

/// The wire's unlock flags for libdlm's unlock `flags`.
#[must_use]
pub fn unlock_flags(flags: u32) -> u32 {
    let mut wire = 0;
    if flags & abi::LKF_FORCEUNLOCK != 0 {
        wire |= UnlockFlag::Forceunlock as u32;
    }
    if flags & abi::LKF_IVVALBLK != 0 {
        wire |= UnlockFlag::UnlockIvvalblk as u32;
    } else if flags & abi::LKF_VALBLK != 0 {
        wire |= UnlockFlag::UnlockValblk as u32;
    }
    wire
}

/// Checks what the kernel refuses of a lock or conversion request
/// (`EINVAL`), before anything is sent.
///
/// # Errors
/// The `errno` the kernel's library returns.
pub fn check_lock(mode: u32, flags: u32) -> Result<(), c_int> {
    let convert = flags & abi::LKF_CONVERT != 0;
    let expedite = flags & abi::LKF_EXPEDITE != 0;
    let invalid = mode > abi::LKM_EXMODE
        || (expedite && (convert || flags & (abi::LKF_QUECVT | abi::LKF_NOQUEUE) != 0 || mode != abi::LKM_NLMODE))
        || (flags & abi::LKF_CONVDEADLK != 0 && flags & abi::LKF_NOQUEUE != 0)
        || (flags & abi::LKF_QUECVT != 0 && !convert);
    if invalid { Err(libc::EINVAL) } else { Ok(()) }
}

/// The wire's mode for libdlm's (checked by [`check_lock`]).
#[must_use]
pub fn mode(mode: u32) -> i32 {
    match mode {
        0 => proto::Mode::Nl as i32,
        1 => proto::Mode::Cr as i32,
        2 => proto::Mode::Cw as i32,
        3 => proto::Mode::Pr as i32,
        4 => proto::Mode::Pw as i32,
        _ => proto::Mode::Ex as i32,
    }
}

/// `sb_status` for a completion's status: 0 when granted, else the `errno`
/// the kernel's library gives (statuses the kernel has no word for are
/// listed in the README).
#[must_use]
pub fn status(status: proto::Status) -> c_int {
    match status {
        proto::Status::Granted => 0,
        proto::Status::Unlocked => EUNLOCK,
        proto::Status::Cancelled => ECANCEL,
        proto::Status::WouldBlock => libc::EAGAIN,
        proto::Status::Deadlock => libc::EDEADLK,
        proto::Status::TimedOut => libc::ETIMEDOUT,
        proto::Status::NotFound => libc::ENOENT,
        // A node the request needs is unreachable: try again later.
        proto::Status::Unavailable => libc::EHOSTUNREACH,
        // The resource's master refused it.
        proto::Status::Rejected => libc::EPROTO,
        // This node left the cluster's quorate view: nothing is granted.
        proto::Status::Fenced => libc::ENOLCK,
    }
}

/// The `errno` for a refusal's code (a request the agent refused, or a
/// lockspace call).
#[must_use]
pub fn refusal(code: &str) -> c_int {
    match RejectCode::parse(code) {
        Some(RejectCode::UnknownLockspace | RejectCode::UnknownHandle | RejectCode::UnknownSession) => libc::ENOENT,
        Some(RejectCode::LockspaceExists) => libc::EEXIST,
        Some(RejectCode::LockspaceBusy | RejectCode::Pending) => libc::EBUSY,
        Some(RejectCode::PermissionDenied) => libc::EPERM,
        Some(RejectCode::LimitExceeded) => libc::ENOMEM,
        Some(RejectCode::ShuttingDown) => LOST,
        _ => libc::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_with_a_meaning_has_its_wire_bit_and_the_rest_are_dropped() {
        assert_eq!(lock_flags(abi::LKF_NOQUEUE | abi::LKF_VALBLK), LockFlag::Noqueue as u32 | LockFlag::Valblk as u32);
        assert_eq!(
            lock_flags(abi::LKF_ORPHAN | abi::LKF_PERSISTENT),
            LockFlag::Adopt as u32 | LockFlag::Persistent as u32
        );
        assert_eq!(lock_flags(abi::LKF_CONVERT | abi::LKF_WAIT | 0x100 | 0x200 | 0x40000), 0);
        assert_eq!(unlock_flags(abi::LKF_VALBLK | abi::LKF_IVVALBLK), UnlockFlag::UnlockIvvalblk as u32);
    }

    #[test]
    fn the_kernels_refusals_are_refused_before_sending() {
        assert_eq!(check_lock(6, 0), Err(libc::EINVAL));
        assert_eq!(check_lock(abi::LKM_NLMODE, abi::LKF_EXPEDITE | abi::LKF_VALBLK), Ok(()));
        assert_eq!(check_lock(3, abi::LKF_EXPEDITE), Err(libc::EINVAL), "EXPEDITE is for NL only");
        assert_eq!(check_lock(0, abi::LKF_EXPEDITE | abi::LKF_CONVERT), Err(libc::EINVAL));
        assert_eq!(check_lock(5, abi::LKF_CONVDEADLK | abi::LKF_NOQUEUE), Err(libc::EINVAL));
        assert_eq!(check_lock(5, abi::LKF_CONVERT | abi::LKF_NOQUEUE | abi::LKF_PERSISTENT), Ok(()));
    }

    #[test]
    fn statuses_are_libdlms_errnos() {
        assert_eq!(status(proto::Status::Granted), 0);
        assert_eq!(status(proto::Status::WouldBlock), libc::EAGAIN);
        assert_eq!(status(proto::Status::Unlocked), 0x10002);
        assert_eq!(status(proto::Status::Cancelled), 0x10001);
        assert_eq!(refusal("lockspace_exists"), libc::EEXIST);
        assert_eq!(refusal("no_such_code"), libc::EINVAL);
    }
}
