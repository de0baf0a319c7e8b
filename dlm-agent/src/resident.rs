//! Keeps the agent's memory resident, so that memory pressure on the node
//! does not stall it.
//!
//! Why: on a node short of memory the kernel reclaims file pages, and the
//! agent's own code is file pages. The next time the agent runs that code it
//! takes a major fault and waits for the read behind the reclaim that caused
//! it: milliseconds to seconds (corosync's issue #520 saw nodes rebooted for
//! it, and corosync locks its memory since). An agent stalled that long
//! holds up every waiter of every resource it masters, and it answers the
//! membership's agreement rounds late. A node that is merely short of memory
//! must stay a fast member, not become a slow one that others wait for.
//!
//! How, at start, before any client is served ([`make_resident`]):
//! 1. glibc's malloc is told not to trim its heaps, so memory freed after a
//!    burst stays mapped, locked and ready for the next one: the heaps only
//!    grow, to the agent's working size, and the bounds of `config` cap
//!    that. Large blocks (hash tables as they double) keep their own
//!    mappings and go back to the kernel when freed: kept, a table's old
//!    copies cost 349 B per held lock where 279 B are needed (`tests/dump.rs`
//!    measured both), and they are needed again only at the next doubling;
//! 2. `mlockall(MCL_CURRENT | MCL_FUTURE)`: every page mapped now is read in
//!    and locked, and every later mapping is locked as it is made (thread
//!    stacks, heap growth).
//!
//! Locking needs CAP_IPC_LOCK or an unlimited `RLIMIT_MEMLOCK`. With a finite
//! limit and no capability, `MCL_FUTURE` would turn the agent's growth past
//! the limit into a failed allocation, and the agent would abort; so the
//! agent locks only when nothing bounds it, and otherwise says what to give.
#![allow(unsafe_code)]

use prometheus::IntGauge;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

/// Whether the agent keeps its memory resident (`[memory] resident`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residency {
    /// Lock when permitted; otherwise start anyway, with a warning and
    /// `dlm_memory_resident 0`.
    #[default]
    Auto,
    /// Lock, or refuse to start.
    Required,
    /// Do not lock (a node where the agent's memory must stay reclaimable).
    Off,
}

impl Residency {
    /// The names the configuration takes.
    pub const NAMES: [&str; 3] = ["auto", "required", "off"];

    /// The mode a configuration value names.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "required" => Some(Self::Required),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

/// What [`make_resident`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResidentState {
    /// The memory is locked; `locked` bytes were at the time.
    Locked {
        /// [`locked_bytes`] right after locking.
        locked: u64,
    },
    /// Not locked, and why (with what would allow it).
    NotLocked(String),
    /// `resident = "off"`.
    Off,
}

/// `CAP_IPC_LOCK`'s bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;

/// Makes the agent's memory resident as `mode` says.
///
/// # Errors
/// With `Required`, the reason the memory could not be locked.
pub fn make_resident(mode: Residency) -> Result<ResidentState, String> {
    if mode == Residency::Off {
        return Ok(ResidentState::Off);
    }
    let not_locked =
        |why: String| if mode == Residency::Required { Err(why) } else { Ok(ResidentState::NotLocked(why)) };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(why) = unbounded_lock_refused(&status, memlock_limit()) {
        return not_locked(why);
    }
    keep_freed_memory();
    // SAFETY: mlockall takes flags only and changes no memory of ours.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        return not_locked(format!("mlockall: {}", std::io::Error::last_os_error()));
    }
    Ok(ResidentState::Locked { locked: locked_bytes().unwrap_or(0) })
}

/// Tells glibc's malloc not to trim its heaps (see the module's docs).
/// A failure leaves malloc's defaults, which are slower under pressure but
/// correct, so it is not an error.
fn keep_freed_memory() {
    // SAFETY: mallopt only sets malloc's tunables; it is called before the
    // agent serves anyone, and glibc serialises it with allocations.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// One malloc arena for every thread. glibc gives each new thread that
/// allocates an arena of its own, so a reserve made on one thread would not
/// serve another's growth; the agent's engine runs on one worker and few
/// other threads allocate, so sharing costs nothing measurable. Must run
/// before any other thread exists (`main` does, for `run`).
pub fn one_arena() {
    // SAFETY: mallopt only sets malloc's tunables; no other thread yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The largest block that comes from the heap once a reserve is made:
/// glibc's ceiling for `M_MMAP_THRESHOLD` on 64-bit. Above it a block has a
/// mapping of its own, made when it is allocated.
const HEAP_BLOCK_MAX: usize = 32 << 20;

/// The reserve is allocated in pieces of this size: below the threshold,
/// so they come from the heap and, freed, stay in it.
const RESERVE_PIECE: usize = 1 << 20;

/// Sets aside `bytes` of heap at start, for the growth of the agent's
/// tables under memory pressure: allocated, every page touched (and locked,
/// for a resident agent), then freed into the heap, which malloc does not
/// trim (see [`make_resident`]). Blocks up to 32 MiB (a lock
/// table doubling, a buffer) then come from the heap too instead of fresh
/// mappings, so the agent takes room it already has rather than pages the
/// kernel must find when the node is short of them. Returns what was set
/// aside.
pub fn reserve(bytes: u64) -> u64 {
    if bytes == 0 {
        return 0;
    }
    // SAFETY: mallopt only sets malloc's tunables; glibc serialises it with
    // allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::try_from(HEAP_BLOCK_MAX).unwrap_or(i32::MAX));
    }
    let pieces = usize::try_from(bytes.div_ceil(RESERVE_PIECE as u64)).unwrap_or(usize::MAX);
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(pieces);
    for _ in 0..pieces {
        let mut piece = vec![0u8; RESERVE_PIECE];
        for page in piece.iter_mut().step_by(4096) {
            *page = 1;
        }
        held.push(std::hint::black_box(piece));
    }
    drop(held);
    pieces as u64 * RESERVE_PIECE as u64
}

/// Why locking every future mapping could make an allocation fail, or
/// `None` when nothing bounds it: the process has CAP_IPC_LOCK (effective),
/// or `RLIMIT_MEMLOCK` is unlimited.
fn unbounded_lock_refused(status: &str, limit: Option<u64>) -> Option<String> {
    let capable = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|bits| u64::from_str_radix(bits.trim(), 16).ok())
        .is_some_and(|bits| bits & (1 << CAP_IPC_LOCK) != 0);
    match limit {
        Some(limit) if !capable => Some(format!(
            "needs CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK (it is {limit} bytes); \
             the systemd unit gives CAP_IPC_LOCK, or set `[memory] resident = \"off\"` to silence this"
        )),
        _ => None,
    }
}

/// `RLIMIT_MEMLOCK`'s soft limit, `None` when unlimited.
fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the one we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) } != 0 {
        return Some(0);
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The bytes of this process's memory that are in RAM and locked there
/// (`Locked` of `/proc/self/smaps_rollup`). Not `VmLck` of the status file:
/// that counts locked address space, malloc's reserved but unused arenas
/// included (272 MiB of it beside 75 MiB in RAM, seen on a debug build).
#[must_use]
pub fn locked_bytes() -> Option<u64> {
    field_kib(&std::fs::read_to_string("/proc/self/smaps_rollup").ok()?, "Locked:").map(|kib| kib * 1024)
}

fn field_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix(field))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// `dlm_memory_resident` (1 when the memory is locked) and
/// `dlm_memory_locked_bytes` (read at each scrape: a few page-table walks).
pub struct ResidentMetrics {
    resident: IntGauge,
    locked: IntGauge,
}

impl ResidentMetrics {
    /// The metrics of `outcome`.
    ///
    /// # Panics
    /// Never: the metrics' names are valid.
    #[must_use]
    pub fn new(outcome: &ResidentState) -> Self {
        let resident = IntGauge::new(
            "dlm_memory_resident",
            "1 when the agent's memory is locked in RAM ([memory] resident), so memory pressure cannot stall it",
        )
        .expect("valid metric");
        resident.set(i64::from(matches!(outcome, ResidentState::Locked { .. })));
        let locked = IntGauge::new("dlm_memory_locked_bytes", "Bytes of the agent's memory locked in RAM")
            .expect("valid metric");
        ResidentMetrics { resident, locked }
    }
}

impl Collector for ResidentMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.resident.desc().into_iter().chain(self.locked.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.locked.set(locked_bytes().and_then(|b| i64::try_from(b).ok()).unwrap_or(0));
        self.resident.collect().into_iter().chain(self.locked.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locking_is_refused_only_when_an_allocation_could_then_fail() {
        let with_cap = "Name:\tx\nCapEff:\t0000000000004000\n";
        let without = "Name:\tx\nCapEff:\t00000000000000c0\n";
        assert_eq!(unbounded_lock_refused(with_cap, Some(8 << 20)), None, "CAP_IPC_LOCK");
        assert_eq!(unbounded_lock_refused(without, None), None, "unlimited RLIMIT_MEMLOCK");
        let why = unbounded_lock_refused(without, Some(8 << 20)).expect("a finite limit and no capability");
        assert!(why.contains("CAP_IPC_LOCK") && why.contains("8388608 bytes"), "{why}");
        assert!(unbounded_lock_refused("garbage", Some(0)).is_some(), "no CapEff line: not capable");
    }

    #[test]
    fn modes_are_named_as_the_configuration_writes_them() {
        for name in Residency::NAMES {
            assert!(Residency::from_name(name).is_some(), "{name}");
        }
        assert_eq!(Residency::from_name("on"), None);
        assert_eq!(Residency::default(), Residency::Auto);
    }

    #[test]
    fn a_reserve_is_set_aside_in_whole_pieces_and_none_is_nothing() {
        assert_eq!(reserve(0), 0);
        assert_eq!(reserve(3 * RESERVE_PIECE as u64 - 1), 3 * RESERVE_PIECE as u64);
    }

    #[test]
    fn locked_bytes_are_read_from_the_status_file() {
        assert_eq!(field_kib("Rss:      100 kB\nLocked:     64 kB\n", "Locked:"), Some(64));
        assert_eq!(field_kib("Rss:      100 kB\n", "Locked:"), None);
        assert!(locked_bytes().is_some(), "this kernel has smaps_rollup");
    }
}
