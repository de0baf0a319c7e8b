//! User-space lock waits: `futex(2)` calls with a waiting op (WAIT,
//! WAIT_BITSET, LOCK_PI, LOCK_PI2, WAIT_REQUEUE_PI) and `futex_waitv(2)`,
//! timed from `sys_enter` to `sys_exit`, by process and futex address.
//!
//! Tracepoint layout (`/sys/kernel/tracing/events/syscalls/*/format`):
//! `sys_enter_futex`: `u32 *uaddr` at 16, `int op` at 24 (8 bytes wide);
//! `sys_enter_futex_waitv`: `struct futex_waitv *waiters` at 16.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuHashMap},
    programs::TracePointContext,
};
use dlm_ebpf_common::{FutexKey, WaitStat, capacity, drops, futex_ops};

use super::{count_drop, current_ids, is_measured, now_ns, record_wait};

const UADDR_OFFSET: usize = 16;
const OP_OFFSET: usize = 24;
const WAITERS_OFFSET: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct FutexStart {
    start_ns: u64,
    uaddr: u64,
    op: u32,
    pad: u32,
}

/// Futex wait statistics by (process, op, address).
#[map]
static FUTEX_STATS: PerCpuHashMap<FutexKey, WaitStat> = PerCpuHashMap::with_max_entries(capacity::FUTEX_STATS, 0);

/// Start of each thread's current futex wait.
#[map]
static FUTEX_START: HashMap<u32, FutexStart> = HashMap::with_max_entries(capacity::STARTS, 0);

#[inline(always)]
fn start_wait(uaddr: u64, op: u32) {
    let (tid, tgid) = current_ids();
    if !is_measured(tgid) {
        return;
    }
    let start = FutexStart { start_ns: now_ns(), uaddr, op, pad: 0 };
    if FUTEX_START.insert(tid, start, 0).is_err() {
        count_drop(drops::STARTS);
    }
}

#[tracepoint]
pub fn dlm_futex_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format; the agent's tests check them.
    let (Ok(uaddr), Ok(op)) = (unsafe { ctx.read_at::<u64>(UADDR_OFFSET) }, unsafe { ctx.read_at::<u64>(OP_OFFSET) })
    else {
        return 0;
    };
    let cmd = op as u32 & futex_ops::CMD_MASK;
    if futex_ops::is_wait(cmd) {
        start_wait(uaddr, cmd);
    }
    0
}

#[tracepoint]
pub fn dlm_futex_waitv_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: see `dlm_futex_enter`.
    if let Ok(waiters) = unsafe { ctx.read_at::<u64>(WAITERS_OFFSET) } {
        start_wait(waiters, futex_ops::WAITV);
    }
    0
}

/// Shared by `sys_exit_futex` and `sys_exit_futex_waitv`.
#[tracepoint]
pub fn dlm_futex_exit(_ctx: TracePointContext) -> u32 {
    let now = now_ns();
    let (tid, tgid) = current_ids();
    let Some(start) = FUTEX_START.get_ptr(tid) else {
        return 0;
    };
    // SAFETY: the entry is this thread's own; only it removes it.
    let start = unsafe { *start };
    let _ = FUTEX_START.remove(tid);
    let waited = now.saturating_sub(start.start_ns);
    if is_measured(tgid) {
        let key = FutexKey { tgid, op: start.op, uaddr: start.uaddr };
        record_wait(&FUTEX_STATS, &key, waited, drops::FUTEX_STATS);
    }
    // DLM attribution of futex waits is the `holders` program's (one
    // source, so attaching this family does not count them twice).
    0
}
