//! Off-CPU time from `sched_switch` alone: each thread is followed through
//! running → off a CPU (preempted, or asleep) → running, its time away split
//! into run-queue delay and blocked time, and its voluntary and involuntary
//! switches counted. Optionally (`OFFCPU_STACKS_ON`) the stacks at a
//! sleeping switch out are kept and the blocked time charged to them, for
//! folded stacks.
//!
//! This family is system-wide (`trace offcpu`, or the agent when configured
//! so); the time of DLM lock holders is the `holders` family's job.
//!
//! Cost is what matters here: this runs on every context switch. It is a BTF
//! tracepoint (no tracepoint record is built); task fields are plain loads of
//! its typed arguments; each thread's state is a slot of an array indexed by
//! thread id (an inlined load, no hash lookup); and no wake-up program is
//! attached: the split of the time away comes from the kernel's own
//! `sched_info.run_delay`, one switch late ([`TaskSched`]). A switch costs
//! one clock read and two slot updates.
//!
//! Arguments: `sched_switch(bool preempt, task_struct *prev, task_struct
//! *next, unsigned int prev_state)`. Offsets in `task_struct` come from the
//! kernel's BTF.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, tracing::StackIdContext as _},
};
use dlm_ebpf_common::{OffcpuStackKey, TaskSched, WaitStat, capacity, drops, sched_hists, sched_slots, task_states::*};

use super::{STACKS, TASK_DEAD, USER_STACK, count_drop, entry, is_measured, now_ns, setting, task_field};

/// Per-thread state and counters, by thread id masked to the array's size
/// (set by the loader from `kernel.pid_max`, [`sched_slots`]).
#[map]
static TASK_SCHED: Array<TaskSched> = Array::with_max_entries(sched_slots::MIN, 0);

/// System-wide run-queue delay and blocked-time histograms ([`sched_hists`]).
#[map]
static SCHED_HIST: PerCpuArray<WaitStat> = PerCpuArray::with_max_entries(2, 0);

/// Blocked time by (process, thread, kernel stack, user stack).
#[map]
static OFFCPU_STACKS: PerCpuHashMap<OffcpuStackKey, u64> = PerCpuHashMap::with_max_entries(capacity::OFFCPU_STACKS, 0);

static ZERO_NS: u64 = 0;

#[btf_tracepoint(function = "sched_switch")]
pub fn dlm_sched_switch(ctx: BtfTracePointContext) -> u32 {
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let (pid_at, tgid_at) = (setting!(TASK_PID_OFFSET), setting!(TASK_TGID_OFFSET));
    let now = now_ns();
    // SAFETY (task fields, here and below): BTF tracepoint arguments,
    // offsets from the kernel's BTF.
    let prev_pid: u32 = unsafe { task_field(prev, pid_at) };
    // The idle tasks (pid 0) are not followed.
    if prev_pid != 0 {
        let tgid: u32 = unsafe { task_field(prev, tgid_at) };
        if is_measured(tgid) {
            let preempt: u64 = ctx.arg(0);
            let prev_state: u64 = ctx.arg(3);
            let run_delay_at = setting!(TASK_RUN_DELAY_OFFSET);
            let run_delay: u64 = unsafe { task_field(prev, run_delay_at) };
            let out = SwitchOut {
                pid: prev_pid,
                tgid,
                run_delay,
                sleeping: preempt & 0xff == 0 && prev_state as u32 != 0,
                dead: prev_state & TASK_DEAD != 0,
            };
            switch_out(&ctx, now, &out);
        }
    }
    let next_pid: u32 = unsafe { task_field(next, pid_at) };
    if next_pid != 0 {
        let tgid: u32 = unsafe { task_field(next, tgid_at) };
        if is_measured(tgid) {
            switch_in(now, next_pid, tgid);
        }
    }
    0
}

/// The thread leaving the CPU.
struct SwitchOut {
    pid: u32,
    tgid: u32,
    /// Its `sched_info.run_delay` now.
    run_delay: u64,
    /// Asleep (not preempted).
    sleeping: bool,
    /// Its last switch.
    dead: bool,
}

/// The slot of thread `pid`, taken over (and reset) if another thread held
/// it; `None` only if the array is smaller than the mask says.
#[inline(always)]
fn slot(pid: u32, tgid: u32) -> Option<&'static mut TaskSched> {
    let index = pid & setting!(TASK_SLOT_MASK);
    // SAFETY: a slot is only touched by the CPU switching its thread in or
    // out, never both at once; two threads sharing a slot (only when
    // `pid_max` exceeds the slots) can race, which at worst garbles that
    // slot's counters.
    let task = unsafe { &mut *TASK_SCHED.get_ptr_mut(index)? };
    if task.pid != pid {
        if task.pid != 0 && task.state != EXITED {
            count_drop(drops::SCHED_STATE);
        }
        *task = TaskSched { pid, tgid, kernel_stack: -1, user_stack: -1, ..TaskSched::default() };
    }
    Some(task)
}

#[inline(always)]
fn switch_out(ctx: &BtfTracePointContext, now: u64, out: &SwitchOut) {
    let Some(task) = slot(out.pid, out.tgid) else {
        return;
    };
    if task.away_ns != 0 {
        settle(task, out.run_delay);
    }
    task.tgid = out.tgid;
    task.since_ns = now;
    task.run_delay_ns = out.run_delay;
    if out.dead {
        task.state = EXITED;
        return;
    }
    if out.sleeping {
        task.state = BLOCKED;
        task.voluntary += 1;
        if setting!(OFFCPU_STACKS_ON) != 0 {
            task.kernel_stack = ctx.get_stackid(&STACKS, 0).map_or(-1, |id| id as i32);
            task.user_stack = ctx.get_stackid(&STACKS, USER_STACK).map_or(-1, |id| id as i32);
        }
    } else {
        task.state = RUNNABLE;
        task.involuntary += 1;
    }
}

#[inline(always)]
fn switch_in(now: u64, pid: u32, tgid: u32) {
    let Some(task) = slot(pid, tgid) else {
        return;
    };
    if task.state == RUNNABLE || task.state == BLOCKED {
        task.away_ns = now.saturating_sub(task.since_ns);
        task.away_blocked = u32::from(task.state == BLOCKED);
    }
    task.state = RUNNING;
    task.since_ns = now;
}

/// Splits the thread's last time away: after a preemption it was all run
/// queue; after a sleep, the kernel's `run_delay` grew by the run-queue
/// wait that followed the wake-up, and the rest was blocked.
#[inline(always)]
fn settle(task: &mut TaskSched, run_delay: u64) {
    let away = task.away_ns;
    task.away_ns = 0;
    let (runq, blocked) = if task.away_blocked != 0 {
        let runq = run_delay.saturating_sub(task.run_delay_ns).min(away);
        (runq, away - runq)
    } else {
        (away, 0)
    };
    task.runq_ns += runq;
    if runq > task.runq_max_ns {
        task.runq_max_ns = runq;
    }
    record(sched_hists::RUNQ, runq);
    if task.away_blocked == 0 {
        return;
    }
    task.blocked_ns += blocked;
    if blocked > task.blocked_max_ns {
        task.blocked_max_ns = blocked;
    }
    record(sched_hists::BLOCKED, blocked);
    if (task.kernel_stack >= 0 || task.user_stack >= 0) && blocked >= setting!(OFFCPU_MIN_NS) {
        let key = OffcpuStackKey {
            tgid: task.tgid,
            pid: task.pid,
            kernel_stack: task.kernel_stack,
            user_stack: task.user_stack,
        };
        if let Some(total) = entry(&OFFCPU_STACKS, &key, &ZERO_NS, drops::OFFCPU_STACKS) {
            // SAFETY: per-CPU value.
            unsafe { *total += blocked };
        }
    }
    task.kernel_stack = -1;
    task.user_stack = -1;
}

#[inline(always)]
fn record(hist: u32, ns: u64) {
    if let Some(stat) = SCHED_HIST.get_ptr_mut(hist) {
        // SAFETY: per-CPU slot.
        unsafe { (*stat).record(ns) };
    }
}
