//! Which program attaches to which tracepoint, by family.

pub use crate::codes::Family;

/// One attachment: a program of the object on a tracepoint.
#[derive(Clone, Copy, Debug)]
pub struct Attachment {
    /// The program's name in the object (its function name).
    pub program: &'static str,
    /// Tracepoint category (`/sys/kernel/tracing/events/<category>`), or
    /// [`BTF`] for a BTF tracepoint (attached by name, no tracefs).
    pub category: &'static str,
    /// Tracepoint name.
    pub tracepoint: &'static str,
    /// The family it belongs to.
    pub family: Family,
}

/// The category of BTF tracepoints.
pub const BTF: &str = "btf";

const fn at(program: &'static str, category: &'static str, tracepoint: &'static str, family: Family) -> Attachment {
    Attachment { program, category, tracepoint, family }
}

/// Every attachment. A program may appear more than once on classic
/// tracepoints (one program serves both futex exits); a BTF tracepoint
/// program is bound to its tracepoint when loaded.
pub const ATTACHMENTS: &[Attachment] = &[
    at("dlm_lock_contention_begin", BTF, "contention_begin", Family::Locks),
    at("dlm_lock_contention_end", BTF, "contention_end", Family::Locks),
    at("dlm_futex_enter", "syscalls", "sys_enter_futex", Family::Futex),
    at("dlm_futex_exit", "syscalls", "sys_exit_futex", Family::Futex),
    at("dlm_futex_waitv_enter", "syscalls", "sys_enter_futex_waitv", Family::Futex),
    at("dlm_futex_exit", "syscalls", "sys_exit_futex_waitv", Family::Futex),
    at("dlm_sched_switch", BTF, "sched_switch", Family::Sched),
    at("dlm_holders_switch", BTF, "sched_switch", Family::Holders),
    at("dlm_process_fork", BTF, "sched_process_fork", Family::Holders),
    at("dlm_process_exit", BTF, "sched_process_exit", Family::Holders),
    at("dlm_direct_reclaim_begin", BTF, "mm_vmscan_direct_reclaim_begin", Family::Memory),
    at("dlm_direct_reclaim_end", BTF, "mm_vmscan_direct_reclaim_end", Family::Memory),
    at("dlm_memcg_reclaim_begin", BTF, "mm_vmscan_memcg_reclaim_begin", Family::Memory),
    at("dlm_memcg_reclaim_end", BTF, "mm_vmscan_memcg_reclaim_end", Family::Memory),
    at("dlm_compaction_begin", BTF, "mm_compaction_begin", Family::Memory),
    at("dlm_compaction_end", BTF, "mm_compaction_end", Family::Memory),
    at("dlm_kswapd_wake", BTF, "mm_vmscan_wakeup_kswapd", Family::Memory),
    at("dlm_oom_mark_victim", BTF, "mark_victim", Family::Memory),
];

/// The tracepoint fields the programs read by offset, as (category,
/// tracepoint, field, offset, size). A test compares them with the running
/// kernel's format files, so a layout change fails loudly instead of
/// producing garbage.
pub const FIELD_OFFSETS: &[(&str, &str, &str, usize, usize)] = &[
    ("syscalls", "sys_enter_futex", "uaddr", 16, 8),
    ("syscalls", "sys_enter_futex", "op", 24, 8),
    ("syscalls", "sys_enter_futex_waitv", "waiters", 16, 8),
];
