//! Kernel lock contention: `lock:contention_begin/end`, as `perf lock
//! contention` does it. A spinning waiter cannot sleep or migrate, so its
//! start time is kept per CPU; a sleeping waiter's is kept per task.
//!
//! BTF tracepoints, so no trace record is built per event and detaching
//! does not wait for the tracing subsystem's grace period (a classic
//! tracepoint's perf event does, one after another, under a global mutex).
//! Arguments: `contention_begin(void *lock, unsigned int flags)`,
//! `contention_end(void *lock, int ret)`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, tracing::StackIdContext as _},
};
use dlm_ebpf_common::{LockKey, WaitStat, capacity, drops, lock_flags};

use super::{STACKS, attribute, count_drop, current_ids, is_measured, is_tracked, now_ns, record_wait, setting};

/// When and where a waiter started waiting.
#[repr(C)]
#[derive(Clone, Copy)]
struct LockStart {
    start_ns: u64,
    lock_addr: u64,
    flags: u32,
    stack_id: i32,
}

/// Contention statistics by (task, lock kind, caller stack).
#[map]
static LOCK_STATS: PerCpuHashMap<LockKey, WaitStat> = PerCpuHashMap::with_max_entries(capacity::LOCK_STATS, 0);

/// Start of a sleeping waiter's wait, by thread id.
#[map]
static LOCK_TASK_START: HashMap<u32, LockStart> = HashMap::with_max_entries(capacity::STARTS, 0);

/// Start of the spinning wait on each CPU.
#[map]
static LOCK_CPU_START: PerCpuArray<LockStart> = PerCpuArray::with_max_entries(1, 0);

#[btf_tracepoint(function = "contention_begin")]
pub fn dlm_lock_contention_begin(ctx: BtfTracePointContext) -> u32 {
    let (tid, tgid) = current_ids();
    if !is_measured(tgid) && !is_tracked(tgid) {
        return 0;
    }
    let lock_addr: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    let flags = flags as u32;
    let stack_id = match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(_) => {
            count_drop(drops::STACKS);
            -1
        }
    };
    let start = LockStart { start_ns: now_ns(), lock_addr, flags, stack_id };
    if flags & lock_flags::SPIN != 0 {
        if let Some(slot) = LOCK_CPU_START.get_ptr_mut(0) {
            // SAFETY: per-CPU slot. A nested begin on the same CPU (a spinning
            // wait inside another) keeps the outer one, as perf does.
            unsafe {
                if (*slot).start_ns == 0 {
                    *slot = start;
                }
            }
        }
    } else if LOCK_TASK_START.insert(tid, start, u64::from(BPF_NOEXIST)).is_err() {
        // EEXIST: a mutex that spun first and now sleeps reports a second
        // begin for the same wait; the first start is kept.
        if LOCK_TASK_START.get_ptr(tid).is_none() {
            count_drop(drops::STARTS);
        }
    }
    0
}

#[btf_tracepoint(function = "contention_end")]
pub fn dlm_lock_contention_end(ctx: BtfTracePointContext) -> u32 {
    let now = now_ns();
    let (tid, tgid) = current_ids();
    let lock_addr: u64 = ctx.arg(0);
    let start = if let Some(start) = LOCK_TASK_START.get_ptr(tid) {
        // SAFETY: the entry is this thread's own; only it removes it.
        let start = unsafe { *start };
        let _ = LOCK_TASK_START.remove(tid);
        start
    } else if let Some(slot) = LOCK_CPU_START.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe {
            let start = *slot;
            if start.start_ns == 0 || start.lock_addr != lock_addr {
                return 0;
            }
            (*slot).start_ns = 0;
            start
        }
    } else {
        return 0;
    };
    let waited = now.saturating_sub(start.start_ns);
    if is_measured(tgid) {
        let pid = if setting!(LOCK_PER_TASK) != 0 { tid } else { 0 };
        let key = LockKey { pid, flags: start.flags, stack_id: start.stack_id, pad: 0 };
        record_wait(&LOCK_STATS, &key, waited, drops::LOCK_STATS);
    }
    attribute(tgid, |a| a.klock_ns += waited);
    0
}
