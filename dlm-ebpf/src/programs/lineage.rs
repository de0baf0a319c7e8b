//! Following the processes a tracked client forks, so their time counts for
//! the client's locks (`dlm-agent lock NAME -- CMD` holds the lock in the
//! CLI process while CMD does the work).
//!
//! Tracepoint layout (`/sys/kernel/tracing/events/sched/*/format`):
//! `sched_process_fork`: `pid_t child_pid` at 20; `sched_process_exit`:
//! `bool group_dead` at 32.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::tracepoint, programs::TracePointContext};
use dlm_ebpf_common::task_states::RUNNING;

use super::{DLM_PIDS, attribute, current_ids, now_ns, sched::TASK_SCHED};

const CHILD_PID_OFFSET: usize = 20;
const GROUP_DEAD_OFFSET: usize = 32;

#[tracepoint]
pub fn dlm_process_fork(ctx: TracePointContext) -> u32 {
    let (_, parent) = current_ids();
    let Some(group) = DLM_PIDS.get_ptr(parent) else {
        return 0;
    };
    // SAFETY: see `attribute`.
    let group = unsafe { *group };
    // SAFETY: offset from the tracepoint's format; the agent's tests check it.
    if let Ok(child) = unsafe { ctx.read_at::<u32>(CHILD_PID_OFFSET) } {
        // For a new thread `child` is a thread id, never looked up: harmless.
        let _ = DLM_PIDS.insert(child, group, u64::from(BPF_NOEXIST));
    }
    0
}

#[tracepoint]
pub fn dlm_process_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: see `dlm_process_fork`.
    let group_dead = unsafe { ctx.read_at::<u8>(GROUP_DEAD_OFFSET) }.unwrap_or(0);
    if group_dead == 0 {
        return 0;
    }
    let (tid, tgid) = current_ids();
    // Only children are removed here; the agent removes its clients.
    if let Some(group) = DLM_PIDS.get_ptr(tgid)
        // SAFETY: see `attribute`.
        && unsafe { *group } != tgid
    {
        // The last switch out of this thread comes after this tracepoint,
        // when the entry is gone: charge its time on CPU now.
        if let Some(task) = TASK_SCHED.get_ptr_mut(tid) {
            // SAFETY: this thread's own entry, on its own CPU.
            let task = unsafe { &mut *task };
            if task.state == RUNNING && task.since_ns != 0 {
                let now = now_ns();
                let ran = now.saturating_sub(task.since_ns);
                attribute(tgid, |a| a.oncpu_ns += ran);
                task.since_ns = 0;
            }
        }
        let _ = DLM_PIDS.remove(tgid);
    }
    0
}
