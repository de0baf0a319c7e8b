//! Types shared by the dlm eBPF programs (`dlm-ebpf`) and the agent that loads
//! them and reads their maps (`dlm-agent`).
//!
//! Every type is `#[repr(C)]` with explicit padding, so the layout the
//! programs write is the layout userspace reads. With the `user` feature the
//! types implement `aya::Pod`.
//!
//! Values are aggregated in-kernel in per-CPU maps: each CPU updates its own
//! copy without atomics, and userspace sums the copies (and takes the maximum
//! of `max_ns`).
#![no_std]

/// Number of log2 buckets in a [`WaitStat`] histogram. Slot `i` counts values
/// in `[2^i, 2^(i+1))` nanoseconds (slot 0 also counts 0); the last slot also
/// counts everything larger (about 2.1 s and up).
pub const HIST_SLOTS: usize = 32;

/// The log2 bucket of a value in nanoseconds, clamped to the last slot.
///
/// Written as a binary search rather than `leading_zeros`, which the BPF
/// backend expands into a long instruction sequence.
#[inline(always)]
pub fn log2_slot(mut v: u64) -> usize {
    let mut slot = 0usize;
    if v >= 1 << 32 {
        v >>= 32;
        slot += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        slot += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        slot += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        slot += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        slot += 2;
    }
    if v >= 1 << 1 {
        slot += 1;
    }
    if slot >= HIST_SLOTS { HIST_SLOTS - 1 } else { slot }
}

/// Count, total, maximum and log2 histogram of waits, in nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitStat {
    /// Number of waits.
    pub count: u64,
    /// Sum of the waits.
    pub total_ns: u64,
    /// Longest wait.
    pub max_ns: u64,
    /// Log2 histogram of the waits (see [`HIST_SLOTS`]).
    pub hist: [u64; HIST_SLOTS],
}

impl Default for WaitStat {
    fn default() -> Self {
        WaitStat::ZERO
    }
}

impl WaitStat {
    /// An empty statistic.
    pub const ZERO: WaitStat = WaitStat { count: 0, total_ns: 0, max_ns: 0, hist: [0; HIST_SLOTS] };

    /// Adds one wait of `ns` nanoseconds.
    #[inline(always)]
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.total_ns += ns;
        if ns > self.max_ns {
            self.max_ns = ns;
        }
        let slot = log2_slot(ns);
        // The explicit bound keeps the verifier sure of the index.
        if slot < HIST_SLOTS {
            self.hist[slot] += 1;
        }
    }

    /// Folds another CPU's copy into this one.
    pub fn merge(&mut self, other: &WaitStat) {
        self.count += other.count;
        self.total_ns += other.total_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
        for (mine, theirs) in self.hist.iter_mut().zip(other.hist.iter()) {
            *mine += theirs;
        }
    }
}

/// `lock:contention_begin` flags (include/trace/events/lock.h): the kind of
/// kernel lock a task waits for.
pub mod lock_flags {
    /// The waiter spins.
    pub const SPIN: u32 = 1 << 0;
    /// Read side of a reader/writer lock.
    pub const READ: u32 = 1 << 1;
    /// Write side of a reader/writer lock.
    pub const WRITE: u32 = 1 << 2;
    /// An rt-mutex.
    pub const RT: u32 = 1 << 3;
    /// A per-CPU rw-semaphore.
    pub const PERCPU: u32 = 1 << 4;
    /// A mutex.
    pub const MUTEX: u32 = 1 << 5;
}

/// Key of the kernel lock contention map: one entry per (task, lock kind,
/// caller stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockKey {
    /// Thread id of the waiter when per-task accounting is on, else 0.
    pub pid: u32,
    /// `lock:contention_begin` flags ([`lock_flags`]).
    pub flags: u32,
    /// Kernel stack id in the `STACKS` map, or negative when none was taken.
    pub stack_id: i32,
    /// Padding (always zero).
    pub pad: u32,
}

/// `futex(2)` operations counted as waits (`op & FUTEX_CMD_MASK`).
pub mod futex_ops {
    /// FUTEX_WAIT.
    pub const WAIT: u32 = 0;
    /// FUTEX_LOCK_PI.
    pub const LOCK_PI: u32 = 6;
    /// FUTEX_WAIT_BITSET.
    pub const WAIT_BITSET: u32 = 9;
    /// FUTEX_WAIT_REQUEUE_PI.
    pub const WAIT_REQUEUE_PI: u32 = 11;
    /// FUTEX_LOCK_PI2.
    pub const LOCK_PI2: u32 = 13;
    /// Not a futex(2) op: a `futex_waitv(2)` call, keyed by its waiter array.
    pub const WAITV: u32 = 100;
    /// Mask that drops FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME.
    pub const CMD_MASK: u32 = !(128 | 256);

    /// Whether a futex(2) command blocks the caller.
    #[inline(always)]
    pub fn is_wait(cmd: u32) -> bool {
        matches!(cmd, WAIT | LOCK_PI | WAIT_BITSET | WAIT_REQUEUE_PI | LOCK_PI2)
    }
}

/// Key of the futex wait map: one entry per (process, futex word, op).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FutexKey {
    /// Process (thread group) id of the waiter.
    pub tgid: u32,
    /// The futex command ([`futex_ops`]).
    pub op: u32,
    /// User address of the futex word (of the waiter array for `futex_waitv`).
    pub uaddr: u64,
}

/// Off-CPU statistics of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedStat {
    /// Switches out in a sleeping state (the task blocked).
    pub voluntary: u64,
    /// Switches out while still runnable (preempted).
    pub involuntary: u64,
    /// Time runnable but not running: from wake-up or preemption to the next
    /// switch in.
    pub runq: WaitStat,
    /// Time blocked: from a sleeping switch out to the wake-up.
    pub blocked: WaitStat,
}

impl Default for SchedStat {
    fn default() -> Self {
        SchedStat::ZERO
    }
}

impl SchedStat {
    /// An empty statistic.
    pub const ZERO: SchedStat =
        SchedStat { voluntary: 0, involuntary: 0, runq: WaitStat::ZERO, blocked: WaitStat::ZERO };
}

/// What the `sched` program knows of one thread: a slot of the `TASK_SCHED`
/// array, indexed by thread id ([`sched_slots`]). An array slot is a plain
/// load where a hash lookup is a helper call, and this runs on every
/// context switch of the node. The counters live here rather than in a
/// per-process map; userspace sums threads into processes.
///
/// Off-CPU time is settled one switch late: when the thread comes back on
/// a CPU its time away is kept in `away_ns`, and at its next switch out
/// (its last one included) the kernel's `sched_info.run_delay` says how
/// much of it was spent runnable, waiting for a CPU; the rest was blocked.
/// So no wake-up program is needed, which alone costs more than this one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskSched {
    /// Thread id owning the slot (0: empty). A thread whose id maps to a
    /// slot another thread holds takes it over (counted as a drop).
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// [`task_states`].
    pub state: u32,
    /// Whether the time in `away_ns` began with a sleep (1) or a
    /// preemption (0).
    pub away_blocked: u32,
    /// When the thread entered `state`.
    pub since_ns: u64,
    /// The kernel's `sched_info.run_delay` of the thread at its last
    /// switch out.
    pub run_delay_ns: u64,
    /// Its last time off a CPU, not yet split (0: none).
    pub away_ns: u64,
    /// Kernel stack at the last sleeping switch out (negative: none).
    pub kernel_stack: i32,
    /// User stack at the last sleeping switch out (negative: none).
    pub user_stack: i32,
    /// Switches out in a sleeping state.
    pub voluntary: u64,
    /// Switches out while runnable (preempted).
    pub involuntary: u64,
    /// Time runnable, waiting for a CPU.
    pub runq_ns: u64,
    /// Longest such wait.
    pub runq_max_ns: u64,
    /// Time blocked.
    pub blocked_ns: u64,
    /// Longest block.
    pub blocked_max_ns: u64,
}

/// How the `TASK_SCHED` array is sized: one slot per possible thread id
/// when `kernel.pid_max` allows, so that no two live threads share one.
pub mod sched_slots {
    /// Fewest slots.
    pub const MIN: u32 = 1024;
    /// Most slots (about 13 MiB); above this thread ids can collide.
    pub const MAX: u32 = 131_072;

    /// Slots for a kernel whose `pid_max` is `pid_max`: the next power of
    /// two, within [`MIN`, `MAX`], so the program indexes with a mask.
    pub const fn for_pid_max(pid_max: u32) -> u32 {
        let wanted = if pid_max > MAX { MAX } else { pid_max };
        let slots = wanted.next_power_of_two();
        if slots < MIN { MIN } else { slots }
    }
}

/// [`TaskSched::state`] values.
pub mod task_states {
    /// On a CPU.
    pub const RUNNING: u32 = 0;
    /// Runnable, waiting for a CPU.
    pub const RUNNABLE: u32 = 1;
    /// Sleeping.
    pub const BLOCKED: u32 = 2;
    /// Gone: its last switch out was seen (`TaskSched` slots only).
    pub const EXITED: u32 = 3;
}

/// Indexes of the system-wide scheduler histograms (`SCHED_HIST`).
pub mod sched_hists {
    /// Run-queue delay.
    pub const RUNQ: u32 = 0;
    /// Blocked time.
    pub const BLOCKED: u32 = 1;
}

/// What the `holders` program knows of one thread of a tracked (DLM)
/// process (the `HOLDER_THREADS` map). Only such threads have an entry, so
/// the map stays small; a dead thread's entry is removed at its last switch.
///
/// Off-CPU time is charged when the thread comes back on a CPU: as run-queue
/// delay after a preemption, as blocked time after a sleep. The kernel's own
/// `sched_info.run_delay` then tells, at the next switch out, how much of
/// that sleep was in fact spent runnable after the wake-up, and that much
/// moves from blocked to run queue. So no wake-up program is needed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HolderThread {
    /// The tracked client process its time is attributed to.
    pub group: u32,
    /// [`task_states`].
    pub state: u32,
    /// Whether `run_delay_ns` was read at a switch out (an entry made at a
    /// switch in has none to compare with yet).
    pub run_delay_known: u32,
    /// Whether the thread went to sleep inside `futex(2)`/`futex_waitv(2)`:
    /// its blocked time then counts as a futex wait too.
    pub in_futex: u32,
    /// When the thread entered `state`.
    pub since_ns: u64,
    /// The kernel's `sched_info.run_delay` at the last switch out.
    pub run_delay_ns: u64,
    /// Run-queue time charged since the last switch out.
    pub runq_charged_ns: u64,
    /// Blocked time charged since the last switch out.
    pub blocked_charged_ns: u64,
}

/// The direct-mapped filter in front of `DLM_PIDS` (`TRACKED_SLOTS`): slot
/// `tgid % SLOTS` holds a tracked tgid, [`tracked_slots::SHARED`] when two
/// tracked processes fell on it, or 0. An array slot is a plain load, where a
/// hash lookup is a helper call: the scheduler program asks on every switch.
pub mod tracked_slots {
    /// Number of slots (a power of two).
    pub const SLOTS: u32 = 16384;
    /// A slot more than one tracked process maps to: ask `DLM_PIDS`.
    pub const SHARED: u32 = u32::MAX;

    /// The slot of `tgid`.
    pub const fn slot(tgid: u32) -> u32 {
        tgid & (SLOTS - 1)
    }

    /// The value a slot holding `current` takes when `tgid` is added.
    pub const fn claimed(current: u32, tgid: u32) -> u32 {
        if current == 0 || current == tgid { tgid } else { SHARED }
    }

    /// The value a slot holding `current` takes when `tgid` is removed (a
    /// shared slot stays shared: it only costs a hash lookup).
    pub const fn released(current: u32, tgid: u32) -> u32 {
        if current == tgid { 0 } else { current }
    }

    /// Whether a slot holding `current` may hold `tgid`.
    pub const fn may_hold(current: u32, tgid: u32) -> bool {
        current == tgid || current == SHARED
    }
}

/// Key of the folded off-CPU stack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffcpuStackKey {
    /// Process id.
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    /// Kernel stack id at the switch out (negative: none).
    pub kernel_stack: i32,
    /// User stack id at the switch out (negative: none).
    pub user_stack: i32,
}

/// Kinds of memory-pressure stall.
pub mod stall_kinds {
    /// `vmscan:mm_vmscan_direct_reclaim_begin/end`.
    pub const DIRECT_RECLAIM: u32 = 0;
    /// `vmscan:mm_vmscan_memcg_reclaim_begin/end` (a cgroup over its limit).
    pub const MEMCG_RECLAIM: u32 = 1;
    /// `compaction:mm_compaction_begin/end`.
    pub const COMPACTION: u32 = 2;
    /// Number of kinds.
    pub const COUNT: usize = 3;
}

/// Key of the memory-stall map: one entry per (process, cgroup, kind).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemKey {
    /// Process id of the stalled task.
    pub tgid: u32,
    /// Stall kind ([`stall_kinds`]).
    pub kind: u32,
    /// cgroup v2 id of the task (`bpf_get_current_cgroup_id`).
    pub cgroup: u64,
    /// The task's command name when it stalled: short-lived processes are
    /// gone from `/proc` by the time the map is read.
    pub comm: [u8; 16],
}

/// Where the time of a process that holds or waits for a DLM lock went,
/// accumulated while it is in the `DLM_PIDS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Time on a CPU (summed over its threads; charged at each switch out).
    pub oncpu_ns: u64,
    /// Time runnable, waiting for a CPU.
    pub runq_ns: u64,
    /// Time blocked (sleeping), including the futex and kernel-lock waits below.
    pub blocked_ns: u64,
    /// Time in direct or memcg reclaim and compaction.
    pub reclaim_ns: u64,
    /// Time waiting for kernel locks.
    pub klock_ns: u64,
    /// Time waiting in futex(2) / futex_waitv(2): from the `futex` family's
    /// syscall tracepoints when attached, else (the default) the `holders`
    /// program's sleeps inside those calls, off the CPU until back on it.
    pub futex_ns: u64,
}

impl Attribution {
    /// Nothing yet.
    pub const ZERO: Attribution =
        Attribution { oncpu_ns: 0, runq_ns: 0, blocked_ns: 0, reclaim_ns: 0, klock_ns: 0, futex_ns: 0 };

    /// Folds another CPU's copy into this one. Wrapping: time moved from
    /// blocked to run queue is taken off on the CPU where the move is seen,
    /// which may be another than the one it was added on, so one CPU's copy
    /// can be "negative" while the sum is right.
    pub fn merge(&mut self, other: &Attribution) {
        self.oncpu_ns = self.oncpu_ns.wrapping_add(other.oncpu_ns);
        self.runq_ns = self.runq_ns.wrapping_add(other.runq_ns);
        self.blocked_ns = self.blocked_ns.wrapping_add(other.blocked_ns);
        self.reclaim_ns = self.reclaim_ns.wrapping_add(other.reclaim_ns);
        self.klock_ns = self.klock_ns.wrapping_add(other.klock_ns);
        self.futex_ns = self.futex_ns.wrapping_add(other.futex_ns);
    }

    /// The time accumulated since `earlier` (saturating, so a counter that
    /// was reset reads as zero rather than wrapping).
    pub fn since(&self, earlier: &Attribution) -> Attribution {
        Attribution {
            oncpu_ns: self.oncpu_ns.saturating_sub(earlier.oncpu_ns),
            runq_ns: self.runq_ns.saturating_sub(earlier.runq_ns),
            blocked_ns: self.blocked_ns.saturating_sub(earlier.blocked_ns),
            reclaim_ns: self.reclaim_ns.saturating_sub(earlier.reclaim_ns),
            klock_ns: self.klock_ns.saturating_sub(earlier.klock_ns),
            futex_ns: self.futex_ns.saturating_sub(earlier.futex_ns),
        }
    }
}

/// Kinds of [`KernelEvent`].
pub mod event_kinds {
    /// `oom:mark_victim`: the kernel chose a process to kill.
    pub const OOM_VICTIM: u32 = 1;
    /// A memory stall longer than the configured threshold.
    pub const LONG_STALL: u32 = 2;
}

/// A rare event sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    /// [`event_kinds`].
    pub kind: u32,
    /// OOM: the victim's pid. Stall: the stalled thread.
    pub pid: u32,
    /// Stall: the process. OOM: 0.
    pub tgid: u32,
    /// Stall: [`stall_kinds`]. OOM: the victim's uid.
    pub detail: u32,
    /// Stall: its length. OOM: the victim's anonymous RSS in pages.
    pub value: u64,
    /// cgroup v2 id of the stalled task (0 for OOM).
    pub cgroup: u64,
    /// Time of the event (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// Command name (stalls: the current task's).
    pub comm: [u8; 16],
}

/// Indexes of the `DROPS` per-CPU counter array: updates lost because a map
/// was full or a helper failed.
pub mod drops {
    /// Kernel lock contention statistics.
    pub const LOCK_STATS: u32 = 0;
    /// Stack map (collision or full).
    pub const STACKS: u32 = 1;
    /// Futex statistics.
    pub const FUTEX_STATS: u32 = 2;
    /// Scheduler slots taken over from another live thread (thread ids
    /// beyond the slots, when `pid_max` is above [`super::sched_slots::MAX`]).
    pub const SCHED_STATE: u32 = 3;
    /// Folded off-CPU stacks.
    pub const OFFCPU_STACKS: u32 = 4;
    /// Memory-stall statistics.
    pub const MEM_STATS: u32 = 5;
    /// DLM attribution.
    pub const ATTRIBUTION: u32 = 6;
    /// Ring buffer full.
    pub const EVENTS: u32 = 7;
    /// Per-task start times (lock, futex, reclaim).
    pub const STARTS: u32 = 8;
    /// Threads of tracked processes (`HOLDER_THREADS`).
    pub const HOLDER_THREADS: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;
    /// Names of the counters, by index, as metric label values.
    pub const NAMES: [&str; COUNT as usize] = [
        "lock_stats",
        "stacks",
        "futex_stats",
        "sched_state",
        "offcpu_stacks",
        "mem_stats",
        "attribution",
        "events",
        "starts",
        "holder_threads",
    ];
}

/// Map capacities, shared so userspace can report how full each map is.
pub mod capacity {
    /// Kernel lock contention entries.
    pub const LOCK_STATS: u32 = 8192;
    /// Distinct stacks kept.
    pub const STACKS: u32 = 8192;
    /// Futex wait entries.
    pub const FUTEX_STATS: u32 = 8192;
    /// Folded off-CPU stack entries.
    pub const OFFCPU_STACKS: u32 = 8192;
    /// Memory-stall entries.
    pub const MEM_STATS: u32 = 4096;
    /// Processes whose time is attributed to DLM locks.
    pub const DLM_PIDS: u32 = 4096;
    /// Threads of tracked processes followed by the `holders` program.
    pub const HOLDER_THREADS: u32 = 16384;
    /// In-flight waits (lock, futex, reclaim) per kind.
    pub const STARTS: u32 = 16384;
    /// Ring buffer bytes.
    pub const EVENTS_BYTES: u32 = 64 * 1024;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is repr(C), made only of integers and integer
    // arrays, with explicit padding fields, so any bit pattern is valid.
    #![allow(unsafe_code)]
    unsafe impl aya::Pod for super::WaitStat {}
    unsafe impl aya::Pod for super::LockKey {}
    unsafe impl aya::Pod for super::FutexKey {}
    unsafe impl aya::Pod for super::SchedStat {}
    unsafe impl aya::Pod for super::TaskSched {}
    unsafe impl aya::Pod for super::HolderThread {}
    unsafe impl aya::Pod for super::OffcpuStackKey {}
    unsafe impl aya::Pod for super::MemKey {}
    unsafe impl aya::Pod for super::Attribution {}
    unsafe impl aya::Pod for super::KernelEvent {}
}

#[cfg(test)]
mod tests {
    use super::{Attribution, sched_slots, tracked_slots::*};

    #[test]
    fn scheduler_slots_cover_pid_max_within_bounds() {
        for (pid_max, slots) in [
            (0, 1024),
            (300, 1024),
            (32_768, 32_768),
            (32_769, 65_536),
            (99_999, 131_072),
            (131_072, 131_072),
            (4_194_304, 131_072),
        ] {
            assert_eq!(sched_slots::for_pid_max(pid_max), slots, "pid_max {pid_max}");
        }
    }

    #[test]
    fn tracked_slots_claim_share_and_release() {
        let (a, b) = (7, 7 + SLOTS);
        assert_eq!(slot(a), slot(b), "two tgids on one slot");
        // Empty, then claimed by `a`: only `a` may be there.
        let held = claimed(0, a);
        assert!(may_hold(held, a) && !may_hold(held, b) && !may_hold(0, a));
        assert_eq!(claimed(held, a), held, "claiming twice changes nothing");
        // `b` on the same slot makes it shared: both are asked of DLM_PIDS.
        let shared = claimed(held, b);
        assert_eq!(shared, SHARED);
        assert!(may_hold(shared, a) && may_hold(shared, b) && may_hold(shared, 99));
        // Releasing: only the owner empties its slot; shared stays shared.
        assert_eq!(released(held, a), 0);
        assert_eq!(released(held, b), held);
        assert_eq!(released(shared, a), SHARED);
    }

    #[test]
    fn attribution_copies_sum_with_wrapping() {
        // Time moved from blocked to run queue on another CPU than the one
        // it was added on: that copy is "negative", the sum is right.
        let added = Attribution { blocked_ns: 100, ..Attribution::ZERO };
        let moved = Attribution { blocked_ns: 0u64.wrapping_sub(30), runq_ns: 30, ..Attribution::ZERO };
        let mut total = Attribution::ZERO;
        total.merge(&added);
        total.merge(&moved);
        assert_eq!((total.blocked_ns, total.runq_ns), (70, 30));
        assert_eq!(total.since(&added).blocked_ns, 0, "a phase never reads negative");
    }
}
