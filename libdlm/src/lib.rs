//! A libdlm-compatible C library over the dlm agent: programs written for
//! the Linux DLM's libdlm 4 (lvmlockd, dlm_tool's users, ctypes bindings)
//! link `-ldlm` or `-ldlm_lt` against Debian's `libdlm-dev` header and run
//! unchanged on dlm, its `libdlm.so.3` / `libdlm_lt.so.3` found first
//! (`LD_LIBRARY_PATH`, or installed by `cargo xtask setup`).
//!
//! This crate is the code; `dlm-libdlm-threaded` and `dlm-libdlm-lite` are
//! the two shared libraries, each one [`exports!`] call with its soname.
//! Each lockspace handle is a framed session with the local agent
//! (`DLM_SOCKET`, or the clients' default socket); lockspace creation,
//! release and purge are the agent's admin calls. Callbacks run where
//! libdlm runs them: on the thread that calls `dlm_dispatch` (the
//! descriptor of `dlm_get_fd` / `dlm_ls_get_fd` is readable while some
//! wait), or, after `dlm_pthread_init` / `dlm_ls_pthread_init`, on a thread
//! of the library's own.
//!
//! | module | job |
//! |---|---|
//! | `abi` | libdlm's types and constants, as its header has them |
//! | `translate` | flags, modes, statuses and refusals between libdlm and the wire |
//! | `session` | a blocking framed session with the agent |
//! | `lockspace` | an open lockspace: its locks, requests and callbacks |
//! | `admin` | lockspace creation, release and the orphans' list, on the agent's admin API |
//! | `api` | each exported function's behaviour, for both variants |
//!
//! The one crate of the workspace with `unsafe` code: a C library takes raw
//! pointers (status blocks, value blocks, callbacks) that the program keeps
//! valid under libdlm's contract; each use says why it holds.
#![allow(unsafe_code, reason = "a C library: the program's pointers, under libdlm's contract")]

pub mod abi;
pub mod admin;
pub mod api;
pub mod lockspace;
pub mod session;
pub mod translate;

/// Exports libdlm's functions from the shared library that calls it:
/// `exports!(threaded)` for `libdlm.so.3` (with `lock_resource`,
/// `unlock_resource` and the pthread calls), `exports!(lite)` for
/// `libdlm_lt.so.3`.
#[macro_export]
macro_rules! exports {
    (threaded) => {
        $crate::exports!(@common $crate::api::Variant::Threaded);

        /// `lock_resource`.
        ///
        /// # Safety
        /// libdlm's contract: valid pointers from the program.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn lock_resource(
            resource: *const std::ffi::c_char,
            mode: std::ffi::c_int,
            flags: std::ffi::c_int,
            lockid: *mut std::ffi::c_int,
        ) -> std::ffi::c_int {
            // SAFETY: the program's pointers, under libdlm's contract.
            unsafe { $crate::api::lock_resource(resource, mode, flags, lockid) }
        }

        /// `unlock_resource`.
        ///
        /// # Safety
        /// libdlm's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn unlock_resource(lockid: std::ffi::c_int) -> std::ffi::c_int {
            $crate::api::unlock_resource(lockid)
        }

        /// `dlm_pthread_init`.
        #[unsafe(no_mangle)]
        pub extern "C" fn dlm_pthread_init() -> std::ffi::c_int {
            $crate::api::pthread_init()
        }

        /// `dlm_ls_pthread_init`.
        ///
        /// # Safety
        /// A handle the library gave and the program has not closed.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_pthread_init(ls: *mut std::ffi::c_void) -> std::ffi::c_int {
            $crate::api::ls_pthread_init(ls)
        }

        /// `dlm_pthread_cleanup`.
        #[unsafe(no_mangle)]
        pub extern "C" fn dlm_pthread_cleanup() -> std::ffi::c_int {
            $crate::api::pthread_cleanup()
        }
    };
    (lite) => {
        $crate::exports!(@common $crate::api::Variant::Lite);
    };
    (@common $variant:expr) => {
        use std::ffi::{c_char, c_int, c_uint, c_void};

        use $crate::abi::{Callback, DlmLksb};
        use $crate::api::{self, LockArgs};

        /// `dlm_kernel_version`.
        ///
        /// # Safety
        /// Valid out-pointers (or null).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_kernel_version(major: *mut u32, minor: *mut u32, patch: *mut u32) -> c_int {
            api::versions(major, minor, patch)
        }

        /// `dlm_library_version`.
        ///
        /// # Safety
        /// Valid out-pointers (or null).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_library_version(major: *mut u32, minor: *mut u32, patch: *mut u32) {
            api::versions(major, minor, patch);
        }

        /// `dlm_create_lockspace`.
        ///
        /// # Safety
        /// A C string.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_create_lockspace(name: *const c_char, _mode: libc_mode_t) -> *mut c_void {
            api::new_lockspace(name, 0)
        }

        /// `dlm_new_lockspace`.
        ///
        /// # Safety
        /// A C string.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_new_lockspace(name: *const c_char, _mode: libc_mode_t, flags: u32) -> *mut c_void {
            api::new_lockspace(name, flags)
        }

        /// `dlm_open_lockspace`.
        ///
        /// # Safety
        /// A C string.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_open_lockspace(name: *const c_char) -> *mut c_void {
            api::open_lockspace(name)
        }

        /// `dlm_release_lockspace`.
        ///
        /// # Safety
        /// A C string, and a handle the library gave (or null).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_release_lockspace(name: *const c_char, ls: *mut c_void, force: c_int) -> c_int {
            api::release_lockspace(name, ls, force)
        }

        /// `dlm_close_lockspace`.
        ///
        /// # Safety
        /// A handle the library gave, closed once.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_close_lockspace(ls: *mut c_void) -> c_int {
            api::close_lockspace(ls)
        }

        /// `dlm_ls_get_fd`.
        ///
        /// # Safety
        /// A handle the library gave.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_get_fd(ls: *mut c_void) -> c_int {
            api::ls_get_fd(ls)
        }

        /// `dlm_get_fd`.
        #[unsafe(no_mangle)]
        pub extern "C" fn dlm_get_fd() -> c_int {
            api::get_fd()
        }

        /// `dlm_dispatch`.
        #[unsafe(no_mangle)]
        pub extern "C" fn dlm_dispatch(fd: c_int) -> c_int {
            api::dispatch(fd)
        }

        /// `dlm_ls_lock`.
        ///
        /// # Safety
        /// libdlm's contract: a handle the library gave, a status block and
        /// value block that live until the request's completion.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_lock(
            ls: *mut c_void,
            mode: u32,
            lksb: *mut DlmLksb,
            flags: u32,
            name: *const c_void,
            namelen: c_uint,
            _parent: u32,
            ast: Callback,
            astarg: *mut c_void,
            bast: Callback,
            range: *mut c_void,
        ) -> c_int {
            let args = LockArgs { mode, lksb, flags, name: (name, namelen), completion: (ast, astarg), blocking: bast, range };
            api::ls_lock(ls, &args)
        }

        /// `dlm_ls_lockx` (`xid` and `timeout` have no meaning here).
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_lockx(
            ls: *mut c_void,
            mode: u32,
            lksb: *mut DlmLksb,
            flags: u32,
            name: *const c_void,
            namelen: c_uint,
            _parent: u32,
            ast: Callback,
            astarg: *mut c_void,
            bast: Callback,
            _xid: *mut u64,
            _timeout: *mut u64,
        ) -> c_int {
            let range = std::ptr::null_mut();
            let args = LockArgs { mode, lksb, flags, name: (name, namelen), completion: (ast, astarg), blocking: bast, range };
            api::ls_lock(ls, &args)
        }

        /// `dlm_ls_lock_wait`.
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_lock_wait(
            ls: *mut c_void,
            mode: u32,
            lksb: *mut DlmLksb,
            flags: u32,
            name: *const c_void,
            namelen: c_uint,
            _parent: u32,
            bastarg: *mut c_void,
            bast: Callback,
            range: *mut c_void,
        ) -> c_int {
            let args = LockArgs { mode, lksb, flags, name: (name, namelen), completion: (None, bastarg), blocking: bast, range };
            api::ls_lock_wait($variant, ls, &args)
        }

        /// `dlm_ls_unlock`.
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_unlock(
            ls: *mut c_void,
            lkid: u32,
            flags: u32,
            lksb: *mut DlmLksb,
            astarg: *mut c_void,
        ) -> c_int {
            api::ls_unlock(ls, lkid, flags, lksb, astarg)
        }

        /// `dlm_ls_unlock_wait`.
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_unlock_wait(ls: *mut c_void, lkid: u32, flags: u32, lksb: *mut DlmLksb) -> c_int {
            api::ls_unlock_wait($variant, ls, lkid, flags, lksb)
        }

        /// `dlm_ls_deadlock_cancel`.
        ///
        /// # Safety
        /// A handle the library gave.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_deadlock_cancel(ls: *mut c_void, lkid: u32, _flags: u32) -> c_int {
            api::ls_deadlock_cancel(ls, lkid)
        }

        /// `dlm_ls_purge`.
        ///
        /// # Safety
        /// A handle the library gave.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_ls_purge(ls: *mut c_void, _nodeid: c_int, pid: c_int) -> c_int {
            api::ls_purge(ls, pid)
        }

        /// `dlm_lock`.
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_lock(
            mode: u32,
            lksb: *mut DlmLksb,
            flags: u32,
            name: *const c_void,
            namelen: c_uint,
            _parent: u32,
            ast: Callback,
            astarg: *mut c_void,
            bast: Callback,
            range: *mut c_void,
        ) -> c_int {
            api::lock(&LockArgs { mode, lksb, flags, name: (name, namelen), completion: (ast, astarg), blocking: bast, range })
        }

        /// `dlm_lock_wait`.
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_lock_wait(
            mode: u32,
            lksb: *mut DlmLksb,
            flags: u32,
            name: *const c_void,
            namelen: c_uint,
            _parent: u32,
            bastarg: *mut c_void,
            bast: Callback,
            range: *mut c_void,
        ) -> c_int {
            let args = LockArgs { mode, lksb, flags, name: (name, namelen), completion: (None, bastarg), blocking: bast, range };
            api::lock_wait($variant, &args)
        }

        /// `dlm_unlock`.
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_unlock(lkid: u32, flags: u32, lksb: *mut DlmLksb, astarg: *mut c_void) -> c_int {
            api::unlock(lkid, flags, lksb, astarg)
        }

        /// `dlm_unlock_wait`.
        ///
        /// # Safety
        /// As `dlm_ls_lock`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn dlm_unlock_wait(lkid: u32, flags: u32, lksb: *mut DlmLksb) -> c_int {
            api::unlock_wait($variant, lkid, flags, lksb)
        }

        /// `mode_t`, as the header's functions take it.
        #[allow(non_camel_case_types)]
        type libc_mode_t = u32;
    };
}
