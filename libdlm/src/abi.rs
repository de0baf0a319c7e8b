//! libdlm's binary interface, as its header (`libdlm.h`, Debian's
//! `libdlm-dev`) declares it: the lock status block, the modes, flags and
//! extra status codes, and the callback type. Programs compiled against that
//! header pass these to the library; the values must be the header's.

use std::ffi::{c_char, c_int, c_void};

/// A value block's length in libdlm (`DLM_LVB_LEN`).
pub const DLM_LVB_LEN: usize = 32;
/// The longest resource name (`DLM_RESNAME_MAXLEN`).
pub const DLM_RESNAME_MAXLEN: usize = 64;
/// The longest lockspace name (`DLM_LOCKSPACE_LEN`).
pub const DLM_LOCKSPACE_LEN: usize = 64;

/// `struct dlm_lksb`: where a request's outcome is written before its
/// completion callback runs.
#[repr(C)]
#[derive(Debug)]
pub struct DlmLksb {
    /// 0 granted, or an errno (`EAGAIN`, [`EUNLOCK`], [`ECANCEL`], …).
    pub sb_status: c_int,
    /// The lock's id, set when a new request is sent.
    pub sb_lkid: u32,
    /// `DLM_SBF_*` bits.
    pub sb_flags: c_char,
    /// The caller's value block (`DLM_LVB_LEN` bytes), with `LKF_VALBLK`.
    pub sb_lvbptr: *mut c_char,
}

/// A completion or blocking callback: `void (*)(void *astarg)`.
pub type Callback = Option<unsafe extern "C" fn(*mut c_void)>;

/// `sb_flags`: the lock was demoted (`ALTPR`/`ALTCW`, `CONVDEADLK`).
pub const DLM_SBF_DEMOTED: u8 = 0x01;
/// `sb_flags`: the value block is not valid.
pub const DLM_SBF_VALNOTVALID: u8 = 0x02;
/// `sb_flags`: granted in the alternative mode.
pub const DLM_SBF_ALTMODE: u8 = 0x04;

/// `dlm_new_lockspace` flag: fail with `EEXIST` if the lockspace exists.
pub const DLM_LSFL_NEWEXCL: u32 = 0x0000_0008;

/// Modes (`LKM_*MODE`).
pub const LKM_NLMODE: u32 = 0;
/// The most exclusive mode.
pub const LKM_EXMODE: u32 = 5;

/// Fail with `EAGAIN` rather than wait.
pub const LKF_NOQUEUE: u32 = 0x0000_0001;
/// Unlock call: cancel the pending request.
pub const LKF_CANCEL: u32 = 0x0000_0002;
/// Convert the lock `sb_lkid` names.
pub const LKF_CONVERT: u32 = 0x0000_0004;
/// Read (or, going down from PW/EX, write) the value block.
pub const LKF_VALBLK: u32 = 0x0000_0008;
/// Conversion: queue behind other conversions.
pub const LKF_QUECVT: u32 = 0x0000_0010;
/// Invalidate the value block instead of writing it.
pub const LKF_IVVALBLK: u32 = 0x0000_0020;
/// Conversion: demote to NL rather than fail on a conversion deadlock.
pub const LKF_CONVDEADLK: u32 = 0x0000_0040;
/// The lock outlives its lockspace handle as an orphan.
pub const LKF_PERSISTENT: u32 = 0x0000_0080;
/// New NL request: skip the queue.
pub const LKF_EXPEDITE: u32 = 0x0000_0400;
/// With `LKF_NOQUEUE`: still send blocking callbacks.
pub const LKF_NOQUEUEBAST: u32 = 0x0000_0800;
/// Queue at the head.
pub const LKF_HEADQUE: u32 = 0x0000_1000;
/// Grant when compatible, whatever the queue order.
pub const LKF_NOORDER: u32 = 0x0000_2000;
/// New request: adopt an orphan of this resource in this mode.
pub const LKF_ORPHAN: u32 = 0x0000_4000;
/// Grant PR if the mode asked for cannot be.
pub const LKF_ALTPR: u32 = 0x0000_8000;
/// Grant CW if the mode asked for cannot be.
pub const LKF_ALTCW: u32 = 0x0001_0000;
/// Unlock call: unlock even with a request pending.
pub const LKF_FORCEUNLOCK: u32 = 0x0002_0000;
/// Userspace only: the synchronous calls set it; never sent.
pub const LKF_WAIT: u32 = 0x8000_0000;

/// `sb_status` after a cancel.
pub const ECANCEL: c_int = 0x10001;
/// `sb_status` after an unlock.
pub const EUNLOCK: c_int = 0x10002;
/// `sb_status` while a request is in progress.
pub const EINPROG: c_int = 0x10003;

/// The device interface version libdlm 4 reports for itself and for the
/// kernel (`DLM_DEVICE_VERSION_*`): what programs that check it expect.
pub const DEVICE_VERSION: [u32; 3] = [6, 0, 2];

/// Sets the calling thread's `errno`.
pub fn set_errno(value: c_int) {
    // SAFETY: `__errno_location` returns the calling thread's errno, always valid.
    unsafe { *libc::__errno_location() = value };
}

/// A C pointer that crosses threads: the library hands it back to the
/// program (a callback's argument, the lock status block it gave), and
/// libdlm's contract makes the program keep it valid until the lock's
/// last callback, as with the kernel's library.
#[derive(Debug, PartialEq, Eq)]
pub struct CPtr<T>(pub *mut T);

// Derived, these would ask `T: Clone`; a pointer copies whatever it points to.
impl<T> Clone for CPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for CPtr<T> {}

// SAFETY: the pointee is the program's; the library only hands the pointer
// back or writes the status block as libdlm does, under libdlm's contract.
unsafe impl<T> Send for CPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for CPtr<T> {}

impl<T> CPtr<T> {
    /// A null pointer.
    #[must_use]
    pub fn null() -> CPtr<T> {
        CPtr(std::ptr::null_mut())
    }
}

/// A callback and its argument, sendable to the thread that runs it.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// The function, if any.
    pub function: Callback,
    /// Its argument.
    pub arg: CPtr<c_void>,
}

impl Call {
    /// Runs the callback, if there is one.
    pub fn run(self) {
        if let Some(function) = self.function {
            // SAFETY: the program gave this function and argument for this
            // lock; libdlm calls it the same way.
            unsafe { function(self.arg.0) };
        }
    }
}
