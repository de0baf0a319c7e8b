//! USDT probe points (SystemTap SDT notes) for bpftrace, perf and gdb, as
//! the kernel DLM has tracepoints: `dlm:lock__request`, `dlm:lock__grant`,
//! `dlm:lock__blocking`, `dlm:lock__release`. Unattached, each is one `nop`.
//!
//! Every probe has six arguments (bpftrace reads at most six on x86-64):
//!
//! | arg | `lock__request` | `lock__grant` | `lock__blocking` | `lock__release` |
//! |---|---|---|---|---|
//! | arg0 | lockspace | lockspace | lockspace | lockspace |
//! | arg1 | resource | resource | resource | resource |
//! | arg2 | mode | mode | blocked mode | mode |
//! | arg3 | session | wait (ns) | session | hold (ns) |
//! | arg4 | handle | fencing token | handle | fencing token |
//! | arg5 | client pid | client pid | client pid | client pid |
//!
//! Names are NUL-terminated C strings (`str(arg0)`; a resource name that
//! contains a NUL byte shows up to it). Modes are numbers: 0 NL, 1 CR, 2 CW,
//! 3 PR, 4 PW, 5 EX. The client pid is 0 for TCP clients.

// The probe macro emits the SDT note with inline assembly, which Rust counts
// as unsafe code; it only records where the `nop` is and how to read the
// arguments from registers.
#![allow(unsafe_code)]

use std::ffi::CStr;

use dlm_core::Mode;

/// What a probe names: a lockspace and a resource, as C strings.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    /// Lockspace name.
    pub lockspace: &'a CStr,
    /// Resource name.
    pub resource: &'a ResourceName,
}

fn mode_number(mode: Mode) -> u64 {
    // The discriminants are the numbers the table above documents.
    mode as u64
}

/// A resource name kept NUL-terminated, so probes can name the resource at
/// grant and release. Every lock's record holds one, so a short name (up to
/// [`INLINE_LEN`] bytes, most of them) is kept inline, and only a longer one
/// (names are at most 64 bytes) costs an allocation.
#[derive(Clone)]
pub enum ResourceName {
    /// The name and its NUL, padded with more NULs.
    Inline([u8; INLINE_LEN + 1]),
    /// The name and its NUL.
    Boxed(Box<[u8]>),
}

/// The longest name kept inline: the record's name takes 24 bytes either way.
pub const INLINE_LEN: usize = 22;

const _: () = assert!(std::mem::size_of::<ResourceName>() == 24);

impl ResourceName {
    /// Keeps the first 64 bytes of `name`.
    pub fn new(name: &[u8]) -> ResourceName {
        let name = &name[..name.len().min(64)];
        if name.len() <= INLINE_LEN {
            let mut bytes = [0; INLINE_LEN + 1];
            bytes[..name.len()].copy_from_slice(name);
            return ResourceName::Inline(bytes);
        }
        let mut bytes = Vec::with_capacity(name.len() + 1);
        bytes.extend_from_slice(name);
        bytes.push(0);
        ResourceName::Boxed(bytes.into_boxed_slice())
    }

    fn as_ptr(&self) -> *const u8 {
        match self {
            ResourceName::Inline(bytes) => bytes.as_ptr(),
            ResourceName::Boxed(bytes) => bytes.as_ptr(),
        }
    }
}

/// A lock request was accepted.
#[inline(always)]
pub fn request(target: Target<'_>, mode: Mode, session: u64, handle: u64, pid: u64) {
    let (ls, name) = (target.lockspace.as_ptr(), target.resource.as_ptr());
    probe::probe!(dlm, lock__request, ls, name, mode_number(mode), session, handle, pid);
}

/// A lock (or conversion) was granted.
#[inline(always)]
pub fn grant(target: Target<'_>, mode: Mode, wait_ns: u64, token: u64, pid: u64) {
    let (ls, name) = (target.lockspace.as_ptr(), target.resource.as_ptr());
    probe::probe!(dlm, lock__grant, ls, name, mode_number(mode), wait_ns, token, pid);
}

/// A blocking callback was sent to a holder.
#[inline(always)]
pub fn blocking(target: Target<'_>, blocked_mode: Mode, session: u64, handle: u64, pid: u64) {
    let (ls, name) = (target.lockspace.as_ptr(), target.resource.as_ptr());
    probe::probe!(dlm, lock__blocking, ls, name, mode_number(blocked_mode), session, handle, pid);
}

/// A granted lock was released.
#[inline(always)]
pub fn release(target: Target<'_>, mode: Mode, hold_ns: u64, token: u64, pid: u64) {
    let (ls, name) = (target.lockspace.as_ptr(), target.resource.as_ptr());
    probe::probe!(dlm, lock__release, ls, name, mode_number(mode), hold_ns, token, pid);
}
