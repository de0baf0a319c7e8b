//! Decoding what the programs write: lock kinds, futex ops, log2 histograms,
//! and summing per-CPU copies.

use dlm_ebpf_common::{HIST_SLOTS, WaitStat, futex_ops, lock_flags, stall_kinds};

/// The kernel lock type named by `lock:contention_begin` flags, as `perf lock
/// contention` names them.
pub fn lock_type(flags: u32) -> &'static str {
    use lock_flags::*;
    match flags & (SPIN | READ | WRITE | RT | PERCPU | MUTEX) {
        f if f == SPIN => "spinlock",
        f if f == SPIN | READ => "rwlock:R",
        f if f == SPIN | WRITE => "rwlock:W",
        f if f == READ => "rwsem:R",
        f if f == WRITE => "rwsem:W",
        f if f == RT => "rtmutex",
        f if f == RT | READ => "rwlock-rt:R",
        f if f == RT | WRITE => "rwlock-rt:W",
        f if f == PERCPU | READ => "pcpu-sem:R",
        f if f == PERCPU | WRITE => "pcpu-sem:W",
        f if f == MUTEX => "mutex",
        f if f == MUTEX | SPIN => "mutex-spin",
        _ => "unknown",
    }
}

/// The name of a waiting futex op.
pub fn futex_op(op: u32) -> &'static str {
    match op {
        futex_ops::WAIT => "wait",
        futex_ops::WAIT_BITSET => "wait_bitset",
        futex_ops::LOCK_PI => "lock_pi",
        futex_ops::LOCK_PI2 => "lock_pi2",
        futex_ops::WAIT_REQUEUE_PI => "wait_requeue_pi",
        futex_ops::WAITV => "waitv",
        _ => "other",
    }
}

/// The name of a memory stall kind.
pub fn stall_kind(kind: u32) -> &'static str {
    match kind {
        stall_kinds::DIRECT_RECLAIM => "direct_reclaim",
        stall_kinds::MEMCG_RECLAIM => "memcg_reclaim",
        stall_kinds::COMPACTION => "compaction",
        _ => "unknown",
    }
}

/// The upper bound, in seconds, of log2 slot `slot` (values below `2^(slot+1)`
/// ns); `None` for the last slot, which is open-ended.
pub fn slot_upper_bound_seconds(slot: usize) -> Option<f64> {
    (slot + 1 < HIST_SLOTS).then(|| (1u64 << (slot + 1)) as f64 / 1e9)
}

/// A log2 histogram as cumulative Prometheus buckets: `(le in seconds,
/// cumulative count)` for every slot but the last, whose count only the
/// `+Inf` bucket (the total count) carries.
pub fn cumulative_buckets(stat: &WaitStat) -> Vec<(f64, u64)> {
    let mut cumulative = 0;
    stat.hist
        .iter()
        .enumerate()
        .filter_map(|(slot, count)| {
            cumulative += count;
            slot_upper_bound_seconds(slot).map(|le| (le, cumulative))
        })
        .collect()
}

/// An approximate quantile (0..=1) of a log2 histogram, in nanoseconds: the
/// upper bound of the slot where it falls, capped by the observed maximum.
pub fn quantile_ns(stat: &WaitStat, q: f64) -> u64 {
    if stat.count == 0 {
        return 0;
    }
    let rank = (q * stat.count as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (slot, count) in stat.hist.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return (1u64 << (slot + 1)).min(stat.max_ns);
        }
    }
    stat.max_ns
}

/// Sums per-CPU copies of a statistic.
pub fn sum_wait(copies: impl IntoIterator<Item = WaitStat>) -> WaitStat {
    copies.into_iter().fold(WaitStat::ZERO, |mut total, copy| {
        total.merge(&copy);
        total
    })
}

#[cfg(test)]
mod tests {
    use dlm_ebpf_common::log2_slot;

    use super::*;

    #[test]
    fn lock_types_follow_perf_names() {
        use lock_flags::*;
        let table = [
            (SPIN, "spinlock"),
            (SPIN | READ, "rwlock:R"),
            (SPIN | WRITE, "rwlock:W"),
            (READ, "rwsem:R"),
            (WRITE, "rwsem:W"),
            (RT, "rtmutex"),
            (PERCPU | READ, "pcpu-sem:R"),
            (PERCPU | WRITE, "pcpu-sem:W"),
            (MUTEX, "mutex"),
            (MUTEX | SPIN, "mutex-spin"),
            (0, "unknown"),
            (SPIN | 0x1000, "spinlock"),
        ];
        for (flags, name) in table {
            assert_eq!(lock_type(flags), name, "flags {flags:#x}");
        }
    }

    #[test]
    fn futex_commands_that_wait() {
        assert!(futex_ops::is_wait(0x80 & futex_ops::CMD_MASK)); // FUTEX_WAIT_PRIVATE
        assert!(futex_ops::is_wait(0x89 & futex_ops::CMD_MASK)); // FUTEX_WAIT_BITSET_PRIVATE
        assert!(futex_ops::is_wait((6 | 0x80) & futex_ops::CMD_MASK)); // FUTEX_LOCK_PI_PRIVATE
        assert!(futex_ops::is_wait((9 | 0x100) & futex_ops::CMD_MASK)); // WAIT_BITSET | CLOCK_REALTIME
        assert!(!futex_ops::is_wait(1)); // FUTEX_WAKE
        assert!(!futex_ops::is_wait(0x81 & futex_ops::CMD_MASK)); // FUTEX_WAKE_PRIVATE
        assert!(!futex_ops::is_wait(7)); // FUTEX_UNLOCK_PI
        assert_eq!(futex_op(11), "wait_requeue_pi");
    }

    #[test]
    fn log2_slots() {
        let table = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 1),
            (4, 2),
            (1023, 9),
            (1024, 10),
            (1_000_000, 19),
            ((1 << 31) - 1, 30),
            (1 << 31, 31),
            (u64::MAX, HIST_SLOTS - 1),
        ];
        for (value, slot) in table {
            assert_eq!(log2_slot(value), slot, "value {value}");
        }
    }

    #[test]
    fn buckets_are_cumulative_with_power_of_two_bounds() {
        let mut stat = WaitStat::ZERO;
        for ns in [1, 3, 3, 1000, 5_000_000_000] {
            stat.record(ns);
        }
        let buckets = cumulative_buckets(&stat);
        assert_eq!(buckets.len(), HIST_SLOTS - 1);
        assert_eq!(buckets[0], (2e-9, 1));
        assert_eq!(buckets[1], (4e-9, 3));
        assert_eq!(buckets[9], (1024e-9, 4));
        // The 5 s wait is beyond the last bounded bucket: only +Inf (count) has it.
        assert_eq!(buckets.last().map(|b| b.1), Some(4));
        assert_eq!(stat.count, 5);
        assert_eq!(stat.max_ns, 5_000_000_000);
        assert_eq!(stat.total_ns, 5_000_001_007);
    }

    #[test]
    fn quantiles_and_per_cpu_sums() {
        let mut a = WaitStat::ZERO;
        let mut b = WaitStat::ZERO;
        for _ in 0..90 {
            a.record(100);
        }
        for _ in 0..10 {
            b.record(10_000);
        }
        let total = sum_wait([a, b]);
        assert_eq!(total.count, 100);
        assert_eq!(total.max_ns, 10_000);
        assert_eq!(quantile_ns(&total, 0.5), 128);
        assert_eq!(quantile_ns(&total, 0.99), 10_000);
        assert_eq!(quantile_ns(&WaitStat::ZERO, 0.5), 0);
    }
}
