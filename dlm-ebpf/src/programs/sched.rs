//! Off-CPU time from `sched:sched_switch` and `sched:sched_wakeup(_new)`:
//! each thread is followed through running → (preempted: runnable |
//! blocked → woken: runnable) → running, which splits its off-CPU time into
//! run-queue delay and blocked time, and counts voluntary and involuntary
//! switches. Optionally (`OFFCPU_STACKS_ON`) the stacks at a sleeping switch
//! out are kept and the blocked time charged to them, for folded stacks.
//!
//! Tracepoint layout (`/sys/kernel/tracing/events/sched/*/format`):
//! `sched_switch`: `prev_pid` at 24, `long prev_state` at 32, `next_pid` at 56;
//! `sched_wakeup`/`sched_wakeup_new`: `pid` at 24.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuHashMap},
    programs::{TracePointContext, tracing::StackIdContext as _},
};
use dlm_ebpf_common::{OffcpuStackKey, SchedStat, capacity, drops};

use super::{STACKS, USER_STACK, attribute, count_drop, current_ids, entry, is_measured, now_ns, setting};

const PREV_PID_OFFSET: usize = 24;
const PREV_STATE_OFFSET: usize = 32;
const NEXT_PID_OFFSET: usize = 56;
const WAKEUP_PID_OFFSET: usize = 24;

/// Bits of `prev_state` that mean the task went to sleep (TASK_REPORT and
/// TASK_REPORT_IDLE). A preempted task reports TASK_REPORT_MAX (0x100) or 0.
const SLEEPING_STATES: i64 = 0xff;

pub(super) const RUNNING: u32 = 0;
const RUNNABLE: u32 = 1;
const BLOCKED: u32 = 2;

/// What is known of one thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct TaskSched {
    /// Process id, learnt when the thread was last switched out (0: unknown).
    tgid: u32,
    /// RUNNING, RUNNABLE or BLOCKED.
    pub(super) state: u32,
    /// When the thread entered `state`.
    pub(super) since_ns: u64,
    /// Stacks at the last sleeping switch out (negative: none).
    kernel_stack: i32,
    user_stack: i32,
}

/// Per-thread state, LRU so that exited threads age out.
#[map]
pub(super) static TASK_SCHED: LruHashMap<u32, TaskSched> = LruHashMap::with_max_entries(capacity::SCHED_STATE, 0);

/// Off-CPU statistics by process.
#[map]
static SCHED_STATS: PerCpuHashMap<u32, SchedStat> = PerCpuHashMap::with_max_entries(capacity::SCHED_STATS, 0);

/// Blocked time by (process, thread, kernel stack, user stack).
#[map]
static OFFCPU_STACKS: PerCpuHashMap<OffcpuStackKey, u64> = PerCpuHashMap::with_max_entries(capacity::OFFCPU_STACKS, 0);

static ZERO_SCHED: SchedStat = SchedStat::ZERO;
static ZERO_NS: u64 = 0;

#[inline(always)]
fn stats(tgid: u32) -> Option<*mut SchedStat> {
    if !is_measured(tgid) {
        return None;
    }
    entry(&SCHED_STATS, &tgid, &ZERO_SCHED, drops::SCHED_STATS)
}

#[tracepoint]
pub fn dlm_sched_switch(ctx: TracePointContext) -> u32 {
    let now = now_ns();
    // SAFETY: offsets from the tracepoint's format; the agent's tests check them.
    let fields = unsafe {
        (
            ctx.read_at::<u32>(PREV_PID_OFFSET),
            ctx.read_at::<i64>(PREV_STATE_OFFSET),
            ctx.read_at::<u32>(NEXT_PID_OFFSET),
        )
    };
    let (Ok(prev_pid), Ok(prev_state), Ok(next_pid)) = fields else {
        return 0;
    };
    // The idle task (pid 0) is not followed.
    if prev_pid != 0 {
        switch_out(&ctx, now, prev_pid, prev_state & SLEEPING_STATES != 0);
    }
    if next_pid != 0 {
        switch_in(now, next_pid);
    }
    0
}

/// `prev` is still the current task during `sched_switch`, so its process
/// id and stacks are the current ones.
#[inline(always)]
fn switch_out(ctx: &TracePointContext, now: u64, pid: u32, sleeping: bool) {
    let (_, tgid) = current_ids();
    let mut task = TaskSched { tgid, state: RUNNING, since_ns: 0, kernel_stack: -1, user_stack: -1 };
    // SAFETY: per-thread entry; only the CPU running or switching this thread
    // touches it (wake-ups of a running thread do not change it, see below).
    if let Some(old) = TASK_SCHED.get_ptr(pid) {
        let old = unsafe { *old };
        if old.state == RUNNING && old.since_ns != 0 {
            let ran = now.saturating_sub(old.since_ns);
            attribute(tgid, |a| a.oncpu_ns += ran);
        }
    }
    task.since_ns = now;
    if sleeping {
        task.state = BLOCKED;
        if setting!(OFFCPU_STACKS_ON) != 0 && is_measured(tgid) {
            task.kernel_stack = ctx.get_stackid(&STACKS, 0).map_or(-1, |id| id as i32);
            task.user_stack = ctx.get_stackid(&STACKS, USER_STACK).map_or(-1, |id| id as i32);
        }
    } else {
        task.state = RUNNABLE;
    }
    if TASK_SCHED.insert(pid, task, 0).is_err() {
        count_drop(drops::SCHED_STATE);
    }
    if let Some(stat) = stats(tgid) {
        // SAFETY: per-CPU value.
        unsafe {
            if sleeping {
                (*stat).voluntary += 1;
            } else {
                (*stat).involuntary += 1;
            }
        }
    }
}

#[inline(always)]
fn switch_in(now: u64, pid: u32) {
    let Some(task) = TASK_SCHED.get_ptr_mut(pid) else {
        // First sight of this thread: its process is learnt at its switch out.
        let task = TaskSched { tgid: 0, state: RUNNING, since_ns: now, kernel_stack: -1, user_stack: -1 };
        if TASK_SCHED.insert(pid, task, 0).is_err() {
            count_drop(drops::SCHED_STATE);
        }
        return;
    };
    // SAFETY: see `switch_out`.
    let task = unsafe { &mut *task };
    if task.state == RUNNABLE && task.tgid != 0 {
        let delay = now.saturating_sub(task.since_ns);
        if let Some(stat) = stats(task.tgid) {
            // SAFETY: per-CPU value.
            unsafe { (*stat).runq.record(delay) };
        }
        attribute(task.tgid, |a| a.runq_ns += delay);
    }
    task.state = RUNNING;
    task.since_ns = now;
}

#[inline(always)]
fn wakeup(ctx: &TracePointContext) {
    let now = now_ns();
    // SAFETY: see `dlm_sched_switch`.
    let Ok(pid) = (unsafe { ctx.read_at::<u32>(WAKEUP_PID_OFFSET) }) else {
        return;
    };
    let Some(task) = TASK_SCHED.get_ptr_mut(pid) else {
        return;
    };
    // SAFETY: see `switch_out`. Only a BLOCKED thread is changed here: a
    // wake-up of a thread that has not switched out yet is ignored.
    let task = unsafe { &mut *task };
    if task.state != BLOCKED || task.tgid == 0 {
        return;
    }
    let blocked = now.saturating_sub(task.since_ns);
    if let Some(stat) = stats(task.tgid) {
        // SAFETY: per-CPU value.
        unsafe { (*stat).blocked.record(blocked) };
    }
    attribute(task.tgid, |a| a.blocked_ns += blocked);
    if task.kernel_stack >= 0 || task.user_stack >= 0 {
        if blocked >= setting!(OFFCPU_MIN_NS) {
            let key =
                OffcpuStackKey { tgid: task.tgid, pid, kernel_stack: task.kernel_stack, user_stack: task.user_stack };
            if let Some(total) = entry(&OFFCPU_STACKS, &key, &ZERO_NS, drops::OFFCPU_STACKS) {
                // SAFETY: per-CPU value.
                unsafe { *total += blocked };
            }
        }
        task.kernel_stack = -1;
        task.user_stack = -1;
    }
    task.state = RUNNABLE;
    task.since_ns = now;
}

#[tracepoint]
pub fn dlm_sched_wakeup(ctx: TracePointContext) -> u32 {
    wakeup(&ctx);
    0
}
