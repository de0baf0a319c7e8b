//! Maps, load-time settings and helpers shared by the program families.
//!
//! Each family lives in its own module and has its own start-time map, so
//! the agent can attach any subset (`trace locks` attaches only `lock`).

mod futex;
mod holders;
mod lineage;
mod lock;
mod memory;
mod sched;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
};
use dlm_ebpf_common::{Attribution, KernelEvent, WaitStat, capacity, drops, tracked_slots};

/// Only this process is measured when non-zero (set by the loader). DLM
/// attribution ignores it: tracked pids are always accounted.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;
/// Key kernel-lock statistics by thread as well (`trace locks -t`).
#[unsafe(no_mangle)]
static LOCK_PER_TASK: u32 = 0;
/// Take stacks at sleeping switches out for folded off-CPU stacks.
#[unsafe(no_mangle)]
static OFFCPU_STACKS_ON: u32 = 0;
/// Minimum block time, in ns, for a folded off-CPU stack to be recorded.
#[unsafe(no_mangle)]
static OFFCPU_MIN_NS: u64 = 1_000_000;
/// Offset of `pid` in `struct task_struct` (from the kernel's BTF).
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u64 = 0;
/// Offset of `tgid` in `struct task_struct`.
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u64 = 0;
/// Offset of `sched_info.run_delay` in `struct task_struct`: the kernel's
/// own total of the time the task waited on a run queue.
#[unsafe(no_mangle)]
static TASK_RUN_DELAY_OFFSET: u64 = 0;
/// The `futex(2)` and `futex_waitv(2)` system call numbers of this
/// architecture, and the offset of the system call number in `struct
/// pt_regs` (`orig_ax` on x86-64). `u64::MAX`: unknown here, so futex
/// waits of DLM clients are not told apart from other sleeps.
#[unsafe(no_mangle)]
static FUTEX_SYSCALL_NR: u64 = u64::MAX;
#[unsafe(no_mangle)]
static FUTEX_WAITV_SYSCALL_NR: u64 = u64::MAX;
#[unsafe(no_mangle)]
static PT_REGS_SYSCALL_OFFSET: u64 = 0;
/// Offsets of `task_struct.comm` and `.mm`, and of the anonymous-page count
/// in `struct mm_struct` (`u64::MAX`: unknown, the OOM event then says 0).
#[unsafe(no_mangle)]
static TASK_COMM_OFFSET: u64 = u64::MAX;
#[unsafe(no_mangle)]
static TASK_MM_OFFSET: u64 = u64::MAX;
#[unsafe(no_mangle)]
static MM_ANON_PAGES_OFFSET: u64 = u64::MAX;
/// `TASK_SCHED` slots minus one (a power of two minus one, set by the
/// loader from `kernel.pid_max`): a thread's slot is its id masked by it.
#[unsafe(no_mangle)]
static TASK_SLOT_MASK: u32 = dlm_ebpf_common::sched_slots::MIN - 1;
/// A memory stall at least this long, in ns, is also sent as an event.
#[unsafe(no_mangle)]
static LONG_STALL_NS: u64 = 10_000_000;

/// `TASK_DEAD` in `task_struct.__state`: the thread's last switch.
const TASK_DEAD: u64 = 0x80;

/// Reads a load-time setting. The volatile read stops the compiler from
/// folding in the default; the verifier then sees the loader's value.
macro_rules! setting {
    ($name:ident) => {
        unsafe { core::ptr::read_volatile(&$crate::programs::$name) }
    };
}
pub(crate) use setting;

/// Kernel and user stacks, by id.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(capacity::STACKS, 0);

/// Updates lost to full maps or failed helpers, by [`drops`] index.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drops::COUNT, 0);

/// Processes (tgid) whose time is attributed to DLM locks, each mapped to the
/// process it is accounted under: the agent adds its clients (mapped to
/// themselves), `lineage` adds the processes they fork (mapped to the
/// client), so the command `dlm-agent lock -- CMD` runs is accounted too.
/// LRU, so forgotten children age out.
#[map]
static DLM_PIDS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(capacity::DLM_PIDS, 0);

/// How many clients the agent tracks (index 0): while zero, the programs
/// skip the `DLM_PIDS` lookups (an array lookup is a plain load).
#[map]
static DLM_TRACKED: Array<u32> = Array::with_max_entries(1, 0);

/// The filter in front of `DLM_PIDS` ([`tracked_slots`]): written by the
/// agent for its clients and by `lineage` for their children.
#[map]
static TRACKED_SLOTS: Array<u32> = Array::with_max_entries(tracked_slots::SLOTS, 0);

/// Where the time of each tracked process went.
#[map]
static DLM_ATTR: PerCpuHashMap<u32, Attribution> = PerCpuHashMap::with_max_entries(capacity::DLM_PIDS, 0);

/// OOM kills and long memory stalls.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Zero values to insert from: the BPF stack (512 bytes) is too small to
/// build large ones in place.
static ZERO_WAIT: WaitStat = WaitStat::ZERO;
static ZERO_ATTR: Attribution = Attribution::ZERO;

/// `bpf_get_stackid` flag: the user stack instead of the kernel's.
const USER_STACK: u64 = 1 << 8;

/// Counts one lost update.
#[inline(always)]
fn count_drop(index: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; programs do not preempt each other on a CPU.
        unsafe { *counter += 1 };
    }
}

/// The entry for `key`, inserted from `zero` when missing; `None` (and a
/// drop counted) when the map is full.
#[inline(always)]
fn entry<K, V>(map: &PerCpuHashMap<K, V>, key: &K, zero: &V, drop: u32) -> Option<*mut V> {
    if let Some(value) = map.get_ptr_mut(key) {
        return Some(value);
    }
    // Another CPU may insert the same key first (EEXIST): the lookup after
    // decides.
    let _ = map.insert(key, zero, u64::from(BPF_NOEXIST));
    let value = map.get_ptr_mut(key);
    if value.is_none() {
        count_drop(drop);
    }
    value
}

/// Records one wait of `ns` in `map[key]`.
#[inline(always)]
fn record_wait<K>(map: &PerCpuHashMap<K, WaitStat>, key: &K, ns: u64, drop: u32) {
    if let Some(stat) = entry(map, key, &ZERO_WAIT, drop) {
        // SAFETY: a per-CPU value; see `count_drop`.
        unsafe { (*stat).record(ns) };
    }
}

/// Whether any process is tracked.
#[inline(always)]
fn any_tracked() -> bool {
    // SAFETY: an array slot (always present); a torn read is impossible for u32.
    DLM_TRACKED.get_ptr(0).is_some_and(|count| unsafe { *count } != 0)
}

/// Whether `tgid` may be tracked: its filter slot names it (or is shared).
/// A plain array load; `DLM_PIDS` has the last word.
#[inline(always)]
fn may_be_tracked(tgid: u32) -> bool {
    // SAFETY: an array slot (always present); a u32 read cannot tear.
    TRACKED_SLOTS
        .get_ptr(tracked_slots::slot(tgid))
        .is_some_and(|current| tracked_slots::may_hold(unsafe { *current }, tgid))
}

/// Adds `tgid` to or removes it from the filter ([`tracked_slots`]).
#[inline(always)]
fn update_slot(tgid: u32, update: fn(u32, u32) -> u32) {
    if let Some(current) = TRACKED_SLOTS.get_ptr_mut(tracked_slots::slot(tgid)) {
        // SAFETY: an array slot. A race with the agent or another CPU may
        // lose an update, which at worst leaves a process unaccounted.
        unsafe { *current = update(*current, tgid) };
    }
}

/// The client process `tgid`'s time is accounted under, if it is tracked
/// as (or forked by) a DLM lock holder or waiter.
#[inline(always)]
fn tracked_group(tgid: u32) -> Option<u32> {
    if !any_tracked() {
        return None;
    }
    group_of(tgid)
}

/// [`tracked_group`] for a caller that has seen [`any_tracked`] already.
#[inline(always)]
fn group_of(tgid: u32) -> Option<u32> {
    if !may_be_tracked(tgid) {
        return None;
    }
    // SAFETY: a u32 value of a map entry; LRU eviction may reuse the slot,
    // which at worst accounts one event to another tracked process.
    DLM_PIDS.get_ptr(tgid).map(|group| unsafe { *group })
}

/// Whether the agent tracks `tgid` as a DLM lock holder or waiter.
#[inline(always)]
fn is_tracked(tgid: u32) -> bool {
    tracked_group(tgid).is_some()
}

/// Whether statistics are kept for `tgid` under the `TARGET_TGID` filter.
#[inline(always)]
fn is_measured(tgid: u32) -> bool {
    let target = setting!(TARGET_TGID);
    target == 0 || target == tgid
}

/// Adds time to a tracked process's attribution (under the client it is
/// accounted to); a no-op for others.
#[inline(always)]
fn attribute(tgid: u32, add: impl FnOnce(&mut Attribution)) {
    if let Some(group) = tracked_group(tgid) {
        attribute_to(group, add);
    }
}

/// Adds time to the attribution of the client process `group`.
#[inline(always)]
fn attribute_to(group: u32, add: impl FnOnce(&mut Attribution)) {
    if let Some(attribution) = entry(&DLM_ATTR, &group, &ZERO_ATTR, drops::ATTRIBUTION) {
        // SAFETY: a per-CPU value; see `count_drop`.
        add(unsafe { &mut *attribution });
    }
}

/// Reads a field of a task at a load-time offset with a plain load. The
/// arguments of BTF tracepoints are typed kernel pointers that the verifier
/// lets a program read directly (checked against the BTF layout), and an
/// offset from read-only data is a known constant to it. A helper call
/// (`bpf_probe_read_kernel`) costs several times more on every switch.
///
/// # Safety
/// `task` must be a `task_struct` argument of a BTF tracepoint and
/// `offset` the offset of a `T` field in it.
#[inline(always)]
unsafe fn task_field<T: Copy>(task: *const u8, offset: u64) -> T {
    // SAFETY: the caller's contract; the verifier checks the access.
    unsafe { core::ptr::read(task.wrapping_add(offset as usize) as *const T) }
}

/// Sends a rare event, counting a drop when the ring buffer is full.
#[inline(always)]
fn send_event(event: &KernelEvent) {
    if EVENTS.output::<KernelEvent>(event, 0).is_err() {
        count_drop(drops::EVENTS);
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// The current task's cgroup v2 id.
#[inline(always)]
fn cgroup_id() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() }
}

/// Splits `bpf_get_current_pid_tgid` into (thread id, process id).
#[inline(always)]
fn current_ids() -> (u32, u32) {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    (pid_tgid as u32, (pid_tgid >> 32) as u32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; it is never run.
    loop {}
}

/// The programs use GPL-only helpers (`bpf_get_stackid` on tracepoints,
/// `bpf_probe_read_kernel_buf`), so the object declares a GPL-compatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
