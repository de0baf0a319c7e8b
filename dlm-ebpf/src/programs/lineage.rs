//! Following the processes a tracked client forks, so their time counts for
//! the client's locks (`dlm-agent lock NAME -- CMD` holds the lock in the
//! CLI process while CMD does the work).
//!
//! BTF tracepoints: `sched_process_fork(task_struct *parent, task_struct
//! *child)` and `sched_process_exit(task_struct *p, bool group_dead)`.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::btf_tracepoint, programs::BtfTracePointContext};
use dlm_ebpf_common::{task_states::RUNNING, tracked_slots};

use super::{DLM_PIDS, attribute_to, holders::HOLDER_THREADS, now_ns, setting, task_field, tracked_group, update_slot};

#[btf_tracepoint(function = "sched_process_fork")]
pub fn dlm_process_fork(ctx: BtfTracePointContext) -> u32 {
    let parent: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(1);
    let (pid_at, tgid_at) = (setting!(TASK_PID_OFFSET), setting!(TASK_TGID_OFFSET));
    // SAFETY: BTF tracepoint arguments, offsets from the kernel's BTF.
    let (parent_tgid, child_pid, child_tgid): (u32, u32, u32) =
        unsafe { (task_field(parent, tgid_at), task_field(child, pid_at), task_field(child, tgid_at)) };
    // A new thread belongs to a process already followed (or not).
    if child_pid != child_tgid {
        return 0;
    }
    let Some(group) = tracked_group(parent_tgid) else {
        return 0;
    };
    if DLM_PIDS.insert(child_tgid, group, u64::from(BPF_NOEXIST)).is_ok() {
        update_slot(child_tgid, tracked_slots::claimed);
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn dlm_process_exit(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff == 0 {
        return 0;
    }
    let (pid_at, tgid_at) = (setting!(TASK_PID_OFFSET), setting!(TASK_TGID_OFFSET));
    // SAFETY: see `dlm_process_fork`.
    let (pid, tgid): (u32, u32) = unsafe { (task_field(task, pid_at), task_field(task, tgid_at)) };
    // Only children are removed here; the agent removes its clients.
    let Some(group) = tracked_group(tgid) else {
        return 0;
    };
    if group == tgid {
        return 0;
    }
    // The last switch out of this thread comes after this tracepoint, when
    // the process is no longer tracked: charge its time on CPU now.
    if let Some(thread) = HOLDER_THREADS.get_ptr(pid) {
        // SAFETY: this thread's own entry, on its own CPU.
        let thread = unsafe { *thread };
        if thread.state == RUNNING && thread.since_ns != 0 {
            let ran = now_ns().saturating_sub(thread.since_ns);
            attribute_to(group, |a| a.oncpu_ns = a.oncpu_ns.wrapping_add(ran));
        }
    }
    let _ = HOLDER_THREADS.remove(pid);
    let _ = DLM_PIDS.remove(tgid);
    update_slot(tgid, tracked_slots::released);
    0
}
