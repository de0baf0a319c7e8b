//! Where the threads of DLM lock holders and waiters spend their time (on a
//! CPU, runnable, blocked, and of that blocked time, in futex waits), from
//! `sched_switch` alone.
//!
//! A futex wait is a sleep that starts inside `futex(2)`/`futex_waitv(2)`:
//! the system call number saved in the sleeping thread's registers says so
//! (`bpf_task_pt_regs`), read only for tracked threads. The `futex`
//! family's syscall tracepoints would tax every system call of the node.
//!
//! This runs on every context switch of the node, so an untracked switch
//! must cost next to nothing: with no tracked process it is one array load;
//! with some, each side of the switch costs a plain load of the task's tgid
//! and a load of its filter slot ([`super::may_be_tracked`]). No helper is
//! called, no hash map is looked up, and no wake-up program is attached
//! (which alone costs a few per cent on a switch-heavy machine): off-CPU
//! time is split with the kernel's own `sched_info.run_delay`, see
//! [`HolderThread`].
//!
//! Arguments: `sched_switch(bool preempt, task_struct *prev, task_struct
//! *next, unsigned int prev_state)`.

use aya_ebpf::{
    helpers::bpf_task_pt_regs,
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use dlm_ebpf_common::{HolderThread, capacity, drops, task_states::*};

use super::{TASK_DEAD, any_tracked, attribute_to, count_drop, group_of, now_ns, setting, task_field};

/// Threads of tracked processes (LRU as a backstop: entries are removed at
/// a thread's last switch).
#[map]
pub(super) static HOLDER_THREADS: LruHashMap<u32, HolderThread> =
    LruHashMap::with_max_entries(capacity::HOLDER_THREADS, 0);

#[btf_tracepoint(function = "sched_switch")]
pub fn dlm_holders_switch(ctx: BtfTracePointContext) -> u32 {
    if !any_tracked() {
        return 0;
    }
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let (pid_at, tgid_at) = (setting!(TASK_PID_OFFSET), setting!(TASK_TGID_OFFSET));
    // SAFETY: BTF tracepoint arguments, offsets from the kernel's BTF.
    let (prev_tgid, next_tgid): (u32, u32) = unsafe { (task_field(prev, tgid_at), task_field(next, tgid_at)) };
    let prev_group = group_of(prev_tgid);
    let next_group = group_of(next_tgid);
    if prev_group.is_none() && next_group.is_none() {
        return 0;
    }
    let now = now_ns();
    if let Some(group) = prev_group {
        let preempt: u64 = ctx.arg(0);
        let prev_state: u64 = ctx.arg(3);
        let run_delay_at = setting!(TASK_RUN_DELAY_OFFSET);
        // SAFETY: as above.
        let (pid, run_delay): (u32, u64) = unsafe { (task_field(prev, pid_at), task_field(prev, run_delay_at)) };
        let sleeping = preempt & 0xff == 0 && prev_state as u32 != 0;
        let in_futex = sleeping && sleeps_in_futex(prev);
        switch_out(now, pid, group, run_delay, sleeping, in_futex, prev_state & TASK_DEAD != 0);
    }
    if let Some(group) = next_group {
        // SAFETY: as above.
        let pid: u32 = unsafe { task_field(next, pid_at) };
        switch_in(now, pid, group);
    }
    0
}

/// Whether `task`, going to sleep, is inside `futex(2)` or `futex_waitv(2)`:
/// the system call number its entry saved in its registers says so. Only
/// tracked threads get here, so the helper call costs no one else.
#[inline(always)]
fn sleeps_in_futex(task: *const u8) -> bool {
    let (futex, waitv) = (setting!(FUTEX_SYSCALL_NR), setting!(FUTEX_WAITV_SYSCALL_NR));
    if futex == u64::MAX {
        return false;
    }
    let offset = setting!(PT_REGS_SYSCALL_OFFSET);
    // SAFETY: the helper takes the task pointer of a BTF tracepoint and
    // returns its saved user registers (a BTF pointer the verifier checks
    // the read against).
    let nr: u64 = unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
        if regs.is_null() {
            return false;
        }
        task_field(regs, offset)
    };
    nr == futex || nr == waitv
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn switch_out(now: u64, pid: u32, group: u32, run_delay: u64, sleeping: bool, in_futex: bool, dead: bool) {
    if dead {
        // Its time on the CPU until now still counts.
        if let Some(thread) = HOLDER_THREADS.get_ptr(pid) {
            // SAFETY: this thread's entry, read on its own CPU.
            let thread = unsafe { *thread };
            if thread.state == RUNNING && thread.since_ns != 0 {
                attribute_to(thread.group, |a| {
                    a.oncpu_ns = a.oncpu_ns.wrapping_add(now.saturating_sub(thread.since_ns))
                });
            }
        }
        let _ = HOLDER_THREADS.remove(pid);
        return;
    }
    let state = if sleeping { BLOCKED } else { RUNNABLE };
    let Some(thread) = HOLDER_THREADS.get_ptr_mut(pid) else {
        let thread = HolderThread {
            group,
            state,
            run_delay_known: 1,
            in_futex: u32::from(in_futex),
            since_ns: now,
            run_delay_ns: run_delay,
            ..HolderThread::default()
        };
        if HOLDER_THREADS.insert(pid, thread, 0).is_err() {
            count_drop(drops::HOLDER_THREADS);
        }
        return;
    };
    // SAFETY: only the CPU switching this thread in or out touches its
    // entry, and never at the same time.
    let thread = unsafe { &mut *thread };
    let ran = if thread.state == RUNNING && thread.since_ns != 0 { now.saturating_sub(thread.since_ns) } else { 0 };
    // The run-queue time since the last switch out, by the kernel's count,
    // beyond what was charged as such: it was charged as blocked (the
    // runnable wait after a wake-up), so it moves.
    let moved = if thread.run_delay_known != 0 {
        run_delay
            .saturating_sub(thread.run_delay_ns)
            .saturating_sub(thread.runq_charged_ns)
            .min(thread.blocked_charged_ns)
    } else {
        0
    };
    attribute_to(thread.group, |a| {
        a.oncpu_ns = a.oncpu_ns.wrapping_add(ran);
        a.runq_ns = a.runq_ns.wrapping_add(moved);
        a.blocked_ns = a.blocked_ns.wrapping_sub(moved);
    });
    thread.group = group;
    thread.state = state;
    thread.since_ns = now;
    thread.run_delay_ns = run_delay;
    thread.run_delay_known = 1;
    thread.in_futex = u32::from(in_futex);
    thread.runq_charged_ns = 0;
    thread.blocked_charged_ns = 0;
}

#[inline(always)]
fn switch_in(now: u64, pid: u32, group: u32) {
    let Some(thread) = HOLDER_THREADS.get_ptr_mut(pid) else {
        // First seen coming in: its time counts from now.
        let thread = HolderThread { group, state: RUNNING, since_ns: now, ..HolderThread::default() };
        if HOLDER_THREADS.insert(pid, thread, 0).is_err() {
            count_drop(drops::HOLDER_THREADS);
        }
        return;
    };
    // SAFETY: see `switch_out`.
    let thread = unsafe { &mut *thread };
    let away = now.saturating_sub(thread.since_ns);
    if thread.state == RUNNABLE {
        thread.runq_charged_ns += away;
        attribute_to(thread.group, |a| a.runq_ns = a.runq_ns.wrapping_add(away));
    } else if thread.state == BLOCKED {
        thread.blocked_charged_ns += away;
        let futex = if thread.in_futex != 0 { away } else { 0 };
        attribute_to(thread.group, |a| {
            a.blocked_ns = a.blocked_ns.wrapping_add(away);
            a.futex_ns = a.futex_ns.wrapping_add(futex);
        });
    }
    thread.group = group;
    thread.state = RUNNING;
    thread.since_ns = now;
}
