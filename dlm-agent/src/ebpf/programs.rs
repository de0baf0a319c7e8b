//! Which program attaches to which tracepoint, by family.

/// A group of programs attached together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Kernel lock contention (`lock:contention_begin/end`).
    Locks,
    /// Futex waits (`syscalls:sys_enter/exit_futex`, `futex_waitv`).
    Futex,
    /// Off-CPU time and run-queue delay of every task on the node
    /// (`sched:sched_switch`): what `trace offcpu` shows. It does a little
    /// work on every context switch of the node, so the agent leaves it out
    /// unless configured.
    Sched,
    /// Where the time of DLM lock holders and waiters goes (on CPU, run
    /// queue, blocked), and the processes they fork: `sched_switch` and
    /// `sched_process_fork/exit`, doing nothing for other tasks.
    Holders,
    /// Reclaim, compaction, kswapd and OOM (`vmscan`, `compaction`, `oom`).
    Memory,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 5] = [Family::Locks, Family::Futex, Family::Sched, Family::Holders, Family::Memory];

    /// What the agent attaches unless configured otherwise: the families
    /// whose cost on a busy node is small. `futex` (its syscall tracepoints
    /// slow every system call of the node) and `sched` (work on every
    /// context switch) are for `trace` or an explicit `[ebpf] families`.
    pub const AGENT_DEFAULT: [Family; 3] = [Family::Locks, Family::Holders, Family::Memory];

    /// The family's name, as used in metric labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::Locks => "locks",
            Family::Futex => "futex",
            Family::Sched => "sched",
            Family::Holders => "holders",
            Family::Memory => "memory",
        }
    }
}

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
