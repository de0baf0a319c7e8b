//! What each libdlm function does, behind its exported symbol
//! ([`crate::exports`]): the same arguments, return values and `errno`s as
//! libdlm 4 on the kernel (see the README's table for the few that differ),
//! for the two variants (threaded `libdlm.so.3`, `libdlm_lt.so.3`).

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, Weak};

use crate::abi::{self, CPtr, Call, Callback, DLM_LOCKSPACE_LEN, DlmLksb, EINPROG, EUNLOCK, set_errno};
use crate::admin;
use crate::lockspace::{LockRequest, Lockspace, UnlockRequest, Waiter};

/// Which library a program linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `libdlm.so.3`: a waiting call returns 0 and leaves the outcome in the
    /// status block (`sb_status`).
    Threaded,
    /// `libdlm_lt.so.3`: a waiting call returns -1 with `errno` set to the
    /// status when it is neither 0 nor `EUNLOCK`.
    Lite,
}

/// The name libdlm gives the lockspace of its calls without one.
const DEFAULT_LOCKSPACE: &str = "default";

/// The default lockspace, once a call without a lockspace opened it.
static DEFAULT: Mutex<Option<Arc<Lockspace>>> = Mutex::new(None);

/// Open lockspaces by their descriptor, for `dlm_dispatch(fd)`.
static BY_FD: Mutex<Option<HashMap<RawFd, Weak<Lockspace>>>> = Mutex::new(None);

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// -1 with `errno` set: libdlm's failure.
fn fail(errno: c_int) -> c_int {
    set_errno(errno);
    -1
}

/// A handle's lockspace (the handle stays the program's).
fn borrow(handle: *mut c_void) -> Option<Arc<Lockspace>> {
    if handle.is_null() {
        return None;
    }
    let raw = handle.cast_const().cast::<Lockspace>();
    // SAFETY: a handle is an `Arc<Lockspace>` the library gave out
    // (`into_handle`) and the program has not closed (libdlm's contract):
    // one more reference, for the call.
    unsafe {
        Arc::increment_strong_count(raw);
        Some(Arc::from_raw(raw))
    }
}

fn into_handle(lockspace: Arc<Lockspace>) -> *mut c_void {
    locked(&BY_FD).get_or_insert_with(HashMap::new).insert(lockspace.fd(), Arc::downgrade(&lockspace));
    Arc::into_raw(lockspace).cast_mut().cast()
}

fn name_of(name: *const c_char) -> Result<String, c_int> {
    if name.is_null() {
        return Err(libc::EINVAL);
    }
    // SAFETY: a C string from the program.
    let name = unsafe { CStr::from_ptr(name) }.to_str().map_err(|_| libc::EINVAL)?;
    if name.is_empty() || name.len() > DLM_LOCKSPACE_LEN {
        return Err(libc::EINVAL);
    }
    Ok(name.to_string())
}

fn open(name: &str) -> Result<*mut c_void, c_int> {
    Lockspace::open(name).map(into_handle)
}

/// `dlm_new_lockspace` (and `dlm_create_lockspace`, with no flags): makes
/// the lockspace if it is not there (`EEXIST` with `DLM_LSFL_NEWEXCL` if it
/// is), and opens it. `mode` (the device file's) has no meaning here.
#[must_use]
pub fn new_lockspace(name: *const c_char, flags: u32) -> *mut c_void {
    let opened = name_of(name).and_then(|name| {
        match admin::create(&name) {
            Ok(()) => {}
            Err(libc::EEXIST) if flags & abi::DLM_LSFL_NEWEXCL == 0 => {}
            Err(errno) => return Err(errno),
        }
        open(&name)
    });
    opened.unwrap_or_else(|errno| {
        set_errno(errno);
        std::ptr::null_mut()
    })
}

/// `dlm_open_lockspace`: an existing lockspace (`ENOENT` if there is none).
#[must_use]
pub fn open_lockspace(name: *const c_char) -> *mut c_void {
    let opened = name_of(name).and_then(|name| if admin::exists(&name)? { open(&name) } else { Err(libc::ENOENT) });
    opened.unwrap_or_else(|errno| {
        set_errno(errno);
        std::ptr::null_mut()
    })
}

/// `dlm_close_lockspace`: ends the handle's session (its persistent locks
/// become orphans, the others are released). Always 0.
pub fn close_lockspace(handle: *mut c_void) -> c_int {
    if handle.is_null() {
        return 0;
    }
    // SAFETY: the program gives back the handle it was given, once.
    let lockspace = unsafe { Arc::from_raw(handle.cast_const().cast::<Lockspace>()) };
    if let Some(by_fd) = locked(&BY_FD).as_mut() {
        by_fd.remove(&lockspace.fd());
    }
    lockspace.close();
    0
}

/// `dlm_release_lockspace`: closes the handle, then releases the lockspace
/// (with `force`, its locks too: their holders are told). Like libdlm, 0
/// whatever the release's outcome.
pub fn release_lockspace(name: *const c_char, handle: *mut c_void, force: c_int) -> c_int {
    close_lockspace(handle);
    if let Ok(name) = name_of(name) {
        let _ = admin::release(&name, force != 0);
    }
    0
}

/// `dlm_ls_get_fd`: readable while callbacks wait for `dlm_dispatch`.
pub fn ls_get_fd(handle: *mut c_void) -> c_int {
    borrow(handle).map_or_else(|| fail(libc::ENOTCONN), |lockspace| lockspace.fd())
}

/// `dlm_dispatch`: runs the callbacks waiting on `fd`'s lockspace. 0.
pub fn dispatch(fd: c_int) -> c_int {
    let lockspace = locked(&BY_FD).as_ref().and_then(|by_fd| by_fd.get(&fd)?.upgrade());
    match lockspace {
        Some(lockspace) => {
            lockspace.dispatch();
            0
        }
        None => fail(libc::EBADF),
    }
}

/// `dlm_ls_pthread_init`: callbacks on a thread of the library's own. As
/// libdlm: -1 with `EEXIST` if there is one, else 0 or an error number.
pub fn ls_pthread_init(handle: *mut c_void) -> c_int {
    match borrow(handle).map(|lockspace| lockspace.start_ast_thread()) {
        None => fail(libc::ENOTCONN),
        Some(Ok(())) => 0,
        Some(Err(libc::EEXIST)) => fail(libc::EEXIST),
        Some(Err(errno)) => errno,
    }
}

/// The default lockspace, opened (or made) on first use.
fn default_lockspace() -> Result<Arc<Lockspace>, c_int> {
    let mut default = locked(&DEFAULT);
    if let Some(lockspace) = default.as_ref() {
        return Ok(lockspace.clone());
    }
    let handle = {
        let existing = admin::exists(DEFAULT_LOCKSPACE)?;
        if !existing {
            match admin::create(DEFAULT_LOCKSPACE) {
                Ok(()) | Err(libc::EEXIST) => {}
                Err(errno) => return Err(errno),
            }
        }
        open(DEFAULT_LOCKSPACE)?
    };
    let lockspace = borrow(handle).ok_or(libc::ENOTCONN)?;
    // The default lockspace keeps the handle's reference until cleanup.
    *default = Some(lockspace.clone());
    Ok(lockspace)
}

fn default_handle() -> Result<*mut c_void, c_int> {
    default_lockspace().map(|lockspace| Arc::as_ptr(&lockspace).cast_mut().cast())
}

/// The default lockspace's handle if it is open (`dlm_unlock` and friends
/// do not open it).
fn open_default_handle() -> *mut c_void {
    locked(&DEFAULT).as_ref().map_or(std::ptr::null_mut(), |lockspace| Arc::as_ptr(lockspace).cast_mut().cast())
}

/// `dlm_get_fd`: the default lockspace's descriptor.
pub fn get_fd() -> c_int {
    default_lockspace().map_or_else(fail, |lockspace| lockspace.fd())
}

/// `dlm_pthread_init`: the default lockspace's callbacks on a thread.
pub fn pthread_init() -> c_int {
    match default_handle() {
        Ok(handle) => ls_pthread_init(handle),
        Err(errno) => fail(errno),
    }
}

/// `dlm_pthread_cleanup`: closes the default lockspace. 0.
pub fn pthread_cleanup() -> c_int {
    let lockspace = locked(&DEFAULT).take();
    if let Some(lockspace) = lockspace {
        let handle = Arc::as_ptr(&lockspace).cast_mut().cast::<c_void>();
        drop(lockspace);
        close_lockspace(handle);
    }
    0
}

/// The arguments of a lock call, as the program passed them.
pub struct LockArgs {
    /// `LKM_*MODE`.
    pub mode: u32,
    /// The status block.
    pub lksb: *mut DlmLksb,
    /// `LKF_*`.
    pub flags: u32,
    /// The resource's name and length.
    pub name: (*const c_void, c_uint),
    /// Completion callback and argument.
    pub completion: (Callback, *mut c_void),
    /// Blocking callback (its argument is the completion's, or the waiting
    /// call's `bastarg`).
    pub blocking: Callback,
    /// Unused by libdlm; must be null.
    pub range: *mut c_void,
}

impl LockArgs {
    fn request(&self, wait: bool) -> Result<LockRequest<'_>, c_int> {
        if !self.range.is_null() {
            return Err(libc::ENOSYS);
        }
        let (name, len) = self.name;
        let name: &[u8] = if name.is_null() || self.flags & abi::LKF_CONVERT != 0 {
            &[]
        } else {
            // SAFETY: the program's name, `len` bytes.
            unsafe { std::slice::from_raw_parts(name.cast::<u8>(), len as usize) }
        };
        let (function, arg) = self.completion;
        Ok(LockRequest {
            mode: self.mode,
            flags: self.flags,
            name,
            lksb: CPtr(self.lksb),
            completion: Call { function: if wait { None } else { function }, arg: CPtr(arg) },
            blocking: Call { function: self.blocking, arg: CPtr(arg) },
            wait,
        })
    }
}

/// `dlm_ls_lock` (and `dlm_ls_lockx`, `dlm_lock`): sends the request; its
/// completion callback runs later. A request with `LKF_ORPHAN` adopts an
/// orphan at once, as the kernel does: 0 with the lock id in the status
/// block and no callback, or -1 with `ENOENT` (no orphan of that name in
/// that mode).
pub fn ls_lock(handle: *mut c_void, args: &LockArgs) -> c_int {
    let Some(lockspace) = borrow(handle) else { return fail(libc::ENOTCONN) };
    let adopt = args.flags & abi::LKF_ORPHAN != 0 && args.flags & abi::LKF_CONVERT == 0;
    let sent = args.request(adopt).and_then(|request| lockspace.lock(&request));
    match sent {
        Ok(Some(waiter)) => adopted(&lockspace, args, &waiter),
        Ok(None) => 0,
        Err(errno) => fail(errno),
    }
}

/// An adoption's outcome: the adopted lock keeps the callbacks given.
fn adopted(lockspace: &Lockspace, args: &LockArgs, waiter: &Waiter) -> c_int {
    match waiter.wait() {
        0 => {
            let (function, arg) = args.completion;
            // SAFETY: the program's status block (checked not null by `lock`).
            let lkid = unsafe { (*args.lksb).sb_lkid };
            lockspace.set_callbacks(
                lkid,
                Call { function, arg: CPtr(arg) },
                Call { function: args.blocking, arg: CPtr(arg) },
            );
            // No callback ran: the status block says in progress, as the
            // kernel's library leaves it.
            // SAFETY: the program's status block (checked not null by `lock`).
            unsafe { (*args.lksb).sb_status = EINPROG };
            0
        }
        status => fail(status),
    }
}

/// `dlm_ls_lock_wait` (and `dlm_lock_wait`): the request, waited for.
pub fn ls_lock_wait(variant: Variant, handle: *mut c_void, args: &LockArgs) -> c_int {
    let Some(lockspace) = borrow(handle) else { return fail(libc::ENOTCONN) };
    match args.request(true).and_then(|request| lockspace.lock(&request)) {
        Ok(Some(waiter)) => waited(variant, waiter.wait()),
        Ok(None) => 0,
        Err(errno) => fail(errno),
    }
}

/// A waiting call's return for the outcome `status`.
fn waited(variant: Variant, status: c_int) -> c_int {
    match variant {
        Variant::Threaded => 0,
        Variant::Lite => {
            set_errno(status);
            if status == 0 || status == EUNLOCK { 0 } else { -1 }
        }
    }
}

/// `dlm_ls_unlock` (and `dlm_unlock`): sends the unlock or cancel.
pub fn ls_unlock(handle: *mut c_void, lkid: u32, flags: u32, lksb: *mut DlmLksb, astarg: *mut c_void) -> c_int {
    let Some(lockspace) = borrow(handle) else { return fail(libc::ENOTCONN) };
    let request = UnlockRequest { lkid, flags, lksb: CPtr(lksb), astarg: CPtr(astarg), wait: false };
    match lockspace.unlock(&request) {
        Ok(_) => 0,
        Err(errno) => fail(errno),
    }
}

/// `dlm_ls_unlock_wait` (and `dlm_unlock_wait`): the unlock, waited for.
pub fn ls_unlock_wait(variant: Variant, handle: *mut c_void, lkid: u32, flags: u32, lksb: *mut DlmLksb) -> c_int {
    let Some(lockspace) = borrow(handle) else { return fail(libc::ENOTCONN) };
    let request = UnlockRequest { lkid, flags, lksb: CPtr(lksb), astarg: CPtr::null(), wait: true };
    match lockspace.unlock(&request) {
        Ok(Some(waiter)) => waited(variant, waiter.wait()),
        Ok(None) => 0,
        Err(errno) => fail(errno),
    }
}

/// `dlm_ls_deadlock_cancel`: the waiting request completes with `EDEADLK`.
pub fn ls_deadlock_cancel(handle: *mut c_void, lkid: u32) -> c_int {
    let Some(lockspace) = borrow(handle) else { return fail(libc::ENOTCONN) };
    lockspace.deadlock_cancel(lkid).map_or_else(fail, |()| 0)
}

/// `dlm_ls_purge`: releases the lockspace's orphans left by process `pid`
/// (every orphan for 0) on this node, each adopted then force-unlocked
/// (its value block invalidated, as the kernel does). `nodeid` other than
/// this node's has no meaning here: orphans are per node.
pub fn ls_purge(handle: *mut c_void, pid: c_int) -> c_int {
    let Some(lockspace) = borrow(handle) else { return fail(libc::ENOTCONN) };
    let orphans = match admin::orphans(&lockspace.name, pid) {
        Ok(orphans) => orphans,
        Err(errno) => return fail(errno),
    };
    for (name, mode) in orphans {
        let mut lksb = DlmLksb { sb_status: 0, sb_lkid: 0, sb_flags: 0, sb_lvbptr: std::ptr::null_mut() };
        let request = LockRequest {
            mode: u32::try_from(mode).unwrap_or(0),
            flags: abi::LKF_ORPHAN,
            name: &name,
            lksb: CPtr(&raw mut lksb),
            completion: Call { function: None, arg: CPtr::null() },
            blocking: Call { function: None, arg: CPtr::null() },
            wait: true,
        };
        // Another process may adopt it first: then it is not ours to purge.
        let Ok(Some(waiter)) = lockspace.lock(&request) else { continue };
        if waiter.wait() != 0 {
            continue;
        }
        let flags = abi::LKF_FORCEUNLOCK | abi::LKF_IVVALBLK;
        let unlock =
            UnlockRequest { lkid: lksb.sb_lkid, flags, lksb: CPtr(&raw mut lksb), astarg: CPtr::null(), wait: true };
        if let Ok(Some(waiter)) = lockspace.unlock(&unlock) {
            waiter.wait();
        }
    }
    0
}

/// `dlm_lock` and friends: the same on the default lockspace.
pub fn lock(args: &LockArgs) -> c_int {
    default_handle().map_or_else(fail, |handle| ls_lock(handle, args))
}

/// `dlm_lock_wait`.
pub fn lock_wait(variant: Variant, args: &LockArgs) -> c_int {
    default_handle().map_or_else(fail, |handle| ls_lock_wait(variant, handle, args))
}

/// `dlm_unlock`: on the default lockspace, which must be open (`ENOTCONN`).
pub fn unlock(lkid: u32, flags: u32, lksb: *mut DlmLksb, astarg: *mut c_void) -> c_int {
    ls_unlock(open_default_handle(), lkid, flags, lksb, astarg)
}

/// `dlm_unlock_wait`.
pub fn unlock_wait(variant: Variant, lkid: u32, flags: u32, lksb: *mut DlmLksb) -> c_int {
    ls_unlock_wait(variant, open_default_handle(), lkid, flags, lksb)
}

/// `lock_resource`: the simple synchronous call on the default lockspace
/// (threaded library only): 0, or -1 with `errno` the status; `*lockid`
/// the lock's id.
///
/// # Safety
/// `resource` is a C string and `lockid` points to an int (or is null), as
/// libdlm's callers pass them.
pub unsafe fn lock_resource(resource: *const c_char, mode: c_int, flags: c_int, lockid: *mut c_int) -> c_int {
    if lockid.is_null() || resource.is_null() {
        return fail(libc::EINVAL);
    }
    let Ok(handle) = default_handle() else { return -1 };
    let mut lksb = DlmLksb { sb_status: 0, sb_lkid: 0, sb_flags: 0, sb_lvbptr: std::ptr::null_mut() };
    let flags = flags as u32;
    if flags & abi::LKF_CONVERT != 0 {
        // SAFETY: the program's lock id, not null (checked).
        lksb.sb_lkid = unsafe { *lockid } as u32;
    }
    // SAFETY: a C string from the program.
    let len = unsafe { CStr::from_ptr(resource) }.to_bytes().len();
    let args = LockArgs {
        mode: mode as u32,
        lksb: &raw mut lksb,
        flags,
        name: (resource.cast(), len as c_uint),
        completion: (None, std::ptr::null_mut()),
        blocking: None,
        range: std::ptr::null_mut(),
    };
    let sent = ls_lock_wait(Variant::Threaded, handle, &args);
    if sent != 0 {
        return sent;
    }
    // SAFETY: as above.
    unsafe { *lockid = lksb.sb_lkid as c_int };
    set_errno(lksb.sb_status);
    if lksb.sb_status == 0 { 0 } else { -1 }
}

/// `unlock_resource`: 0 once unlocked, else -1 (with libdlm's negative
/// `ENOTCONN` when no default lockspace is open).
pub fn unlock_resource(lockid: c_int) -> c_int {
    let handle = open_default_handle();
    if handle.is_null() {
        return fail(-libc::ENOTCONN);
    }
    let mut lksb = DlmLksb { sb_status: 0, sb_lkid: 0, sb_flags: 0, sb_lvbptr: std::ptr::null_mut() };
    let sent = ls_unlock_wait(Variant::Threaded, handle, lockid as u32, 0, &raw mut lksb);
    if sent != 0 {
        return sent;
    }
    set_errno(lksb.sb_status);
    if lksb.sb_status == EUNLOCK { 0 } else { -1 }
}

/// `dlm_kernel_version` and `dlm_library_version`: the device interface
/// version libdlm 4 speaks (6.0.2). 0.
pub fn versions(major: *mut u32, minor: *mut u32, patch: *mut u32) -> c_int {
    for (out, value) in [major, minor, patch].into_iter().zip(abi::DEVICE_VERSION) {
        if !out.is_null() {
            // SAFETY: the program's out-parameter.
            unsafe { *out = value };
        }
    }
    0
}
