//! Off-CPU time from `sched_switch` and `sched_wakeup(_new)`: each thread is
//! followed through running → (preempted: runnable | blocked → woken:
//! runnable) → running, which splits its off-CPU time into run-queue delay
//! and blocked time, and counts voluntary and involuntary switches.
//! Optionally (`OFFCPU_STACKS_ON`) the stacks at a sleeping switch out are
//! kept and the blocked time charged to them, for folded stacks.
//!
//! This family is system-wide (`trace offcpu`, or the agent when configured
//! so); the time of DLM lock holders is the `holders` family's job, at a
//! fraction of the cost.
//!
//! Cost is what matters here: these run on every context switch. They are
//! BTF tracepoints (no classic tracepoint record is built), the per-thread
//! counters live in the one per-thread entry (no per-process map lookup),
//! and the system-wide histograms are per-CPU array slots. A switch costs
//! two hash lookups and one kernel read.
//!
//! Arguments: `sched_switch(bool preempt, task_struct *prev, task_struct
//! *next, unsigned int prev_state)`; `sched_wakeup(_new)(task_struct *p)`.
//! The `pid`/`tgid` offsets in `task_struct` come from the kernel's BTF.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, tracing::StackIdContext as _},
};
use dlm_ebpf_common::{OffcpuStackKey, TaskSched, WaitStat, capacity, drops, sched_hists, task_states::*};

use super::{STACKS, USER_STACK, count_drop, current_ids, entry, is_measured, now_ns, setting};

/// Per-thread state and counters, LRU so that exited threads age out.
#[map]
static TASK_SCHED: LruHashMap<u32, TaskSched> = LruHashMap::with_max_entries(capacity::SCHED_STATE, 0);

/// System-wide run-queue delay and blocked-time histograms ([`sched_hists`]).
#[map]
static SCHED_HIST: PerCpuArray<WaitStat> = PerCpuArray::with_max_entries(2, 0);

/// Blocked time by (process, thread, kernel stack, user stack).
#[map]
static OFFCPU_STACKS: PerCpuHashMap<OffcpuStackKey, u64> = PerCpuHashMap::with_max_entries(capacity::OFFCPU_STACKS, 0);

static ZERO_NS: u64 = 0;

/// The (thread id, process id) of a task: one read of the two adjacent
/// fields when the offsets say they are adjacent, else two.
#[inline(always)]
fn task_ids(task: *const u8) -> Option<(u32, u32)> {
    let pid_offset = setting!(TASK_PID_OFFSET) as usize;
    let tgid_offset = setting!(TASK_TGID_OFFSET) as usize;
    // SAFETY: the helper checks the address; a wrong offset would read
    // garbage, which the agent's offset test catches.
    unsafe {
        if tgid_offset == pid_offset + 4 {
            let both: u64 = bpf_probe_read_kernel(task.wrapping_add(pid_offset) as *const u64).ok()?;
            Some((both as u32, (both >> 32) as u32))
        } else {
            let pid = bpf_probe_read_kernel(task.wrapping_add(pid_offset) as *const u32).ok()?;
            let tgid = bpf_probe_read_kernel(task.wrapping_add(tgid_offset) as *const u32).ok()?;
            Some((pid, tgid))
        }
    }
}

#[inline(always)]
fn record(hist: u32, tgid: u32, ns: u64) {
    if !is_measured(tgid) {
        return;
    }
    if let Some(stat) = SCHED_HIST.get_ptr_mut(hist) {
        // SAFETY: per-CPU slot.
        unsafe { (*stat).record(ns) };
    }
}

#[btf_tracepoint(function = "sched_switch")]
pub fn dlm_sched_switch(ctx: BtfTracePointContext) -> u32 {
    let now = now_ns();
    let preempt: u64 = ctx.arg(0);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    // `prev` is the current task; the idle task (pid 0) is not followed.
    let (prev_pid, prev_tgid) = current_ids();
    if prev_pid != 0 {
        let sleeping = preempt & 0xff == 0 && prev_state as u32 != 0;
        switch_out(&ctx, now, prev_pid, prev_tgid, sleeping);
    }
    if let Some((next_pid, next_tgid)) = task_ids(next)
        && next_pid != 0
    {
        switch_in(now, next_pid, next_tgid);
    }
    0
}

#[inline(always)]
fn switch_out(ctx: &BtfTracePointContext, now: u64, pid: u32, tgid: u32, sleeping: bool) {
    let (kernel_stack, user_stack) = if sleeping && setting!(OFFCPU_STACKS_ON) != 0 && is_measured(tgid) {
        (
            ctx.get_stackid(&STACKS, 0).map_or(-1, |id| id as i32),
            ctx.get_stackid(&STACKS, USER_STACK).map_or(-1, |id| id as i32),
        )
    } else {
        (-1, -1)
    };
    let Some(task) = TASK_SCHED.get_ptr_mut(pid) else {
        let mut task = TaskSched { tgid, since_ns: now, kernel_stack, user_stack, ..TaskSched::default() };
        task.state = if sleeping { BLOCKED } else { RUNNABLE };
        if TASK_SCHED.insert(pid, task, 0).is_err() {
            count_drop(drops::SCHED_STATE);
        }
        return;
    };
    // SAFETY: per-thread entry, updated in place (a hash insert allocates and
    // swaps an element: several lookups' worth). Only the CPU running or
    // switching this thread touches it; a wake-up changes only BLOCKED ones.
    let task = unsafe { &mut *task };
    task.tgid = tgid;
    task.since_ns = now;
    task.kernel_stack = kernel_stack;
    task.user_stack = user_stack;
    if sleeping {
        task.state = BLOCKED;
        task.voluntary += 1;
    } else {
        task.state = RUNNABLE;
        task.involuntary += 1;
    }
}

#[inline(always)]
fn switch_in(now: u64, pid: u32, tgid: u32) {
    let Some(task) = TASK_SCHED.get_ptr_mut(pid) else {
        let task =
            TaskSched { tgid, state: RUNNING, since_ns: now, kernel_stack: -1, user_stack: -1, ..TaskSched::default() };
        if TASK_SCHED.insert(pid, task, 0).is_err() {
            count_drop(drops::SCHED_STATE);
        }
        return;
    };
    // SAFETY: see `switch_out`.
    let task = unsafe { &mut *task };
    if task.state == RUNNABLE {
        let delay = now.saturating_sub(task.since_ns);
        task.runq_ns += delay;
        if delay > task.runq_max_ns {
            task.runq_max_ns = delay;
        }
        record(sched_hists::RUNQ, tgid, delay);
    }
    task.tgid = tgid;
    task.state = RUNNING;
    task.since_ns = now;
}

#[inline(always)]
fn wakeup(ctx: &BtfTracePointContext) {
    let now = now_ns();
    let task: *const u8 = ctx.arg(0);
    let Some((pid, tgid)) = task_ids(task) else {
        return;
    };
    let Some(task) = TASK_SCHED.get_ptr_mut(pid) else {
        return;
    };
    // SAFETY: see `switch_out`. Only a BLOCKED thread is changed here: a
    // wake-up of a thread that has not switched out yet is ignored.
    let task = unsafe { &mut *task };
    if task.state != BLOCKED {
        return;
    }
    let blocked = now.saturating_sub(task.since_ns);
    task.blocked_ns += blocked;
    if blocked > task.blocked_max_ns {
        task.blocked_max_ns = blocked;
    }
    record(sched_hists::BLOCKED, tgid, blocked);
    if task.kernel_stack >= 0 || task.user_stack >= 0 {
        if blocked >= setting!(OFFCPU_MIN_NS) {
            let key = OffcpuStackKey { tgid, pid, kernel_stack: task.kernel_stack, user_stack: task.user_stack };
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

#[btf_tracepoint(function = "sched_wakeup")]
pub fn dlm_sched_wakeup(ctx: BtfTracePointContext) -> u32 {
    wakeup(&ctx);
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn dlm_sched_wakeup_new(ctx: BtfTracePointContext) -> u32 {
    wakeup(&ctx);
    0
}
