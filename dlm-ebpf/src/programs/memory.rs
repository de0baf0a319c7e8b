//! Memory-pressure stalls: direct reclaim, memcg reclaim and compaction,
//! timed per thread from begin to end and kept by (process, cgroup, kind);
//! kswapd wake-ups counted; OOM victims and long stalls sent as events.
//!
//! All are BTF tracepoints: no trace record is built, they detach without a
//! grace period each, and they need no tracefs (closed to an agent with only
//! CAP_BPF and CAP_PERFMON). The reclaim, compaction and kswapd programs need
//! none of their arguments, only the time and the current task; the OOM
//! victim's fields are read from its `task_struct` at offsets from the
//! kernel's BTF.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::BtfTracePointContext,
};
use dlm_ebpf_common::{KernelEvent, MemKey, WaitStat, capacity, drops, event_kinds, stall_kinds};

use super::{
    attribute, cgroup_id, count_drop, current_ids, is_measured, now_ns, record_wait, send_event, setting, task_field,
};

/// Memory stalls by (process, cgroup, kind).
#[map]
static MEM_STATS: PerCpuHashMap<MemKey, WaitStat> = PerCpuHashMap::with_max_entries(capacity::MEM_STATS, 0);

/// Start of each thread's stall, keyed by `tid | kind << 32`.
#[map]
static STALL_START: HashMap<u64, u64> = HashMap::with_max_entries(capacity::STARTS, 0);

/// kswapd wake-ups.
#[map]
static KSWAPD_WAKES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn begin(kind: u32) {
    let (tid, _) = current_ids();
    let key = u64::from(tid) | (u64::from(kind) << 32);
    if STALL_START.insert(key, now_ns(), 0).is_err() {
        count_drop(drops::STARTS);
    }
}

#[inline(always)]
fn end(kind: u32) {
    let now = now_ns();
    let (tid, tgid) = current_ids();
    let key = u64::from(tid) | (u64::from(kind) << 32);
    let Some(start) = STALL_START.get_ptr(key) else {
        return;
    };
    // SAFETY: the entry is this thread's own; only it removes it.
    let stalled = now.saturating_sub(unsafe { *start });
    let _ = STALL_START.remove(key);
    let cgroup = cgroup_id();
    // Stalls are rare: the name costs little here and saves it for exited processes.
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    if is_measured(tgid) {
        record_wait(&MEM_STATS, &MemKey { tgid, kind, cgroup, comm }, stalled, drops::MEM_STATS);
    }
    attribute(tgid, |a| a.reclaim_ns += stalled);
    if stalled >= setting!(LONG_STALL_NS) {
        send_event(&KernelEvent {
            kind: event_kinds::LONG_STALL,
            pid: tid,
            tgid,
            detail: kind,
            value: stalled,
            cgroup,
            time_ns: now,
            comm,
        });
    }
}

#[btf_tracepoint(function = "mm_vmscan_direct_reclaim_begin")]
pub fn dlm_direct_reclaim_begin(_ctx: BtfTracePointContext) -> u32 {
    begin(stall_kinds::DIRECT_RECLAIM);
    0
}

#[btf_tracepoint(function = "mm_vmscan_direct_reclaim_end")]
pub fn dlm_direct_reclaim_end(_ctx: BtfTracePointContext) -> u32 {
    end(stall_kinds::DIRECT_RECLAIM);
    0
}

#[btf_tracepoint(function = "mm_vmscan_memcg_reclaim_begin")]
pub fn dlm_memcg_reclaim_begin(_ctx: BtfTracePointContext) -> u32 {
    begin(stall_kinds::MEMCG_RECLAIM);
    0
}

#[btf_tracepoint(function = "mm_vmscan_memcg_reclaim_end")]
pub fn dlm_memcg_reclaim_end(_ctx: BtfTracePointContext) -> u32 {
    end(stall_kinds::MEMCG_RECLAIM);
    0
}

#[btf_tracepoint(function = "mm_compaction_begin")]
pub fn dlm_compaction_begin(_ctx: BtfTracePointContext) -> u32 {
    begin(stall_kinds::COMPACTION);
    0
}

#[btf_tracepoint(function = "mm_compaction_end")]
pub fn dlm_compaction_end(_ctx: BtfTracePointContext) -> u32 {
    end(stall_kinds::COMPACTION);
    0
}

#[btf_tracepoint(function = "mm_vmscan_wakeup_kswapd")]
pub fn dlm_kswapd_wake(_ctx: BtfTracePointContext) -> u32 {
    if let Some(count) = KSWAPD_WAKES.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *count += 1 };
    }
    0
}

/// `mark_victim(struct task_struct *task, uid_t uid)`: the task the OOM
/// killer chose, with its name and anonymous memory (pages).
#[btf_tracepoint(function = "mark_victim")]
pub fn dlm_oom_mark_victim(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    let uid: u64 = ctx.arg(1);
    let pid_at = setting!(TASK_PID_OFFSET);
    // SAFETY: a BTF tracepoint argument, the offset from the kernel's BTF.
    let pid: u32 = unsafe { task_field(task, pid_at) };
    let mut comm = [0u8; 16];
    let (comm_at, mm_at, anon_at) =
        (setting!(TASK_COMM_OFFSET), setting!(TASK_MM_OFFSET), setting!(MM_ANON_PAGES_OFFSET));
    let mut anon_pages = 0i64;
    // A rare event: the checked helper reads are worth their cost, and need
    // no type knowledge from the verifier.
    if comm_at != u64::MAX {
        // SAFETY: the helper checks the address.
        let _ = unsafe { bpf_probe_read_kernel_buf(task.wrapping_add(comm_at as usize), &mut comm) };
    }
    if mm_at != u64::MAX && anon_at != u64::MAX {
        // SAFETY: as above; a task without memory has a null `mm`.
        unsafe {
            if let Ok(mm) = bpf_probe_read_kernel(task.wrapping_add(mm_at as usize) as *const u64)
                && mm != 0
            {
                anon_pages = bpf_probe_read_kernel((mm as usize + anon_at as usize) as *const i64).unwrap_or(0);
            }
        }
    }
    send_event(&KernelEvent {
        kind: event_kinds::OOM_VICTIM,
        pid,
        tgid: 0,
        detail: uid as u32,
        value: anon_pages.max(0) as u64,
        cgroup: 0,
        time_ns: now_ns(),
        comm,
    });
    0
}
