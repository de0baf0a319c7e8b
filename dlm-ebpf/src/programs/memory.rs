//! Memory-pressure stalls: direct reclaim, memcg reclaim and compaction,
//! timed per thread from begin to end and kept by (process, cgroup, kind);
//! kswapd wake-ups counted; OOM victims and long stalls sent as events.
//!
//! The reclaim, compaction and kswapd programs are BTF tracepoints (no trace
//! record is built, and they detach without a grace period each) and need
//! none of their arguments: only the time and the current task.
//! `oom:mark_victim` is rare and wants the record's RSS figures, so it stays
//! a classic tracepoint. Its layout
//! (`/sys/kernel/tracing/events/oom/mark_victim/format`): `int pid` at 8,
//! `__data_loc char[] comm` at 12, `anon_rss` at 24, `uid_t uid` at 48.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};
use dlm_ebpf_common::{KernelEvent, MemKey, WaitStat, capacity, drops, event_kinds, stall_kinds};

use super::{attribute, cgroup_id, count_drop, current_ids, is_measured, now_ns, record_wait, send_event, setting};

const OOM_PID_OFFSET: usize = 8;
const OOM_COMM_LOC_OFFSET: usize = 12;
const OOM_ANON_RSS_OFFSET: usize = 24;
const OOM_UID_OFFSET: usize = 48;

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

#[tracepoint]
pub fn dlm_oom_mark_victim(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format; the agent's tests check them.
    let (pid, comm_loc, anon_rss, uid) = unsafe {
        (
            ctx.read_at::<i32>(OOM_PID_OFFSET).unwrap_or(0),
            ctx.read_at::<u32>(OOM_COMM_LOC_OFFSET).unwrap_or(0),
            ctx.read_at::<u64>(OOM_ANON_RSS_OFFSET).unwrap_or(0),
            ctx.read_at::<u32>(OOM_UID_OFFSET).unwrap_or(0),
        )
    };
    let mut comm = [0u8; 16];
    // A __data_loc field holds the string's offset in the record (low 16
    // bits) and its length (high 16 bits).
    let offset = (comm_loc & 0xffff) as usize;
    if offset != 0 && offset < 4096 {
        // SAFETY: reads within the tracepoint record; the helper checks.
        let _ = unsafe { bpf_probe_read_kernel_buf((ctx.as_ptr() as *const u8).add(offset), &mut comm) };
    }
    send_event(&KernelEvent {
        kind: event_kinds::OOM_VICTIM,
        pid: pid as u32,
        tgid: 0,
        detail: uid,
        value: anon_rss,
        cgroup: 0,
        time_ns: now_ns(),
        comm,
    });
    0
}
