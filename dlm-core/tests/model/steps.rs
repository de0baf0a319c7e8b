//! Steps: the random requests the tests run, as proptest strategies.

use dlm_core::{LockFlags, LockHandle, Mode, UnlockFlags};
use proptest::prelude::*;

use crate::*;

pub(crate) const SLOTS: usize = 3;
/// Handles of new locks: 0..HANDLES.
pub(crate) const HANDLES: u64 = 4;

/// The lock a convert, unlock or cancel is about: below [`HANDLES`], that
/// handle (often unknown, for the errors); above, one of the session's locks
/// (`h - HANDLES` modulo their number), so that most requests find a lock.
pub(crate) fn target() -> impl Strategy<Value = u64> {
    prop_oneof![1 => 0..HANDLES, 4 => HANDLES..HANDLES + 8]
}

pub(crate) fn resolve(h: u64, existing: &[LockHandle]) -> LockHandle {
    if h < HANDLES || existing.is_empty() {
        LockHandle(h % HANDLES)
    } else {
        existing[(h - HANDLES) as usize % existing.len()]
    }
}

/// Resources, the first ones more often (more contention); with `hot`,
/// mostly the first one.
pub(crate) fn resource(hot: bool) -> impl Strategy<Value = usize> {
    prop::sample::select(if hot { vec![0, 0, 0, 0, 0, 0, 1, 2] } else { vec![0, 0, 0, 0, 1, 1, 2, 3] })
}

#[derive(Clone, Debug)]
pub(crate) enum Step {
    Lock {
        s: usize,
        h: u64,
        r: usize,
        mode: Mode,
        flags: LockFlags,
        timeout_ms: Option<u64>,
    },
    Convert {
        s: usize,
        h: u64,
        mode: Mode,
        flags: LockFlags,
        lvb: Option<Vec<u8>>,
        timeout_ms: Option<u64>,
    },
    Unlock {
        s: usize,
        h: u64,
        flags: UnlockFlags,
        lvb: Option<Vec<u8>>,
    },
    Cancel {
        s: usize,
        h: u64,
    },
    /// A Lock with ADOPT; with `steer`, of the resource and mode of an
    /// existing orphan (the `r`-th), if there is one.
    Adopt {
        s: usize,
        h: u64,
        r: usize,
        mode: Mode,
        flags: LockFlags,
        steer: bool,
    },
    Advance {
        ms: u64,
    },
    EndSession {
        s: usize,
    },
}

pub(crate) fn mode() -> impl Strategy<Value = Mode> {
    prop::sample::select(Mode::ALL.to_vec())
}

pub(crate) fn lvb() -> impl Strategy<Value = Vec<u8>> {
    (1..=LVB_LEN, 1u8..=255).prop_map(|(n, b)| vec![b; n])
}

pub(crate) fn pick(bits: &[bool], flags: &[LockFlags]) -> LockFlags {
    let mut out = LockFlags::EMPTY;
    for (&on, &f) in bits.iter().zip(flags) {
        if on {
            out.insert(f);
        }
    }
    out
}

pub(crate) fn lock_step(hot: bool) -> impl Strategy<Value = Step> {
    const FLAGS: [LockFlags; 9] = [
        LockFlags::NOQUEUE,
        LockFlags::NOQUEUEBAST,
        LockFlags::HEADQUE,
        LockFlags::NOORDER,
        LockFlags::ALTPR,
        LockFlags::ALTCW,
        LockFlags::PERSISTENT,
        LockFlags::VALBLK,
        LockFlags::EXPEDITE,
    ];
    (
        0..SLOTS,
        0..HANDLES,
        resource(hot),
        mode(),
        prop::collection::vec(prop::bool::weighted(0.15), FLAGS.len()),
        prop::option::weighted(0.3, 1u64..=40),
    )
        .prop_map(|(s, h, r, mode, bits, timeout_ms)| {
            let mut flags = pick(&bits, &FLAGS);
            if !flags.contains(LockFlags::NOQUEUE) {
                flags.remove(LockFlags::NOQUEUEBAST);
            }
            if flags.contains(LockFlags::ALTPR) {
                flags.remove(LockFlags::ALTCW);
            }
            // EXPEDITE never queues: the engine rejects it with NOQUEUE,
            // HEADQUE or NOORDER, and with any mode but NL.
            if mode != Mode::Nl || flags.intersects(LockFlags::NOQUEUE | LockFlags::HEADQUE | LockFlags::NOORDER) {
                flags.remove(LockFlags::EXPEDITE);
            }
            let timeout_ms = timeout_ms.filter(|_| !flags.intersects(LockFlags::NOQUEUE | LockFlags::EXPEDITE));
            Step::Lock { s, h, r, mode, flags, timeout_ms }
        })
}

pub(crate) fn adopt_step() -> impl Strategy<Value = Step> {
    (0..SLOTS, 0..HANDLES, resource(false), mode(), any::<bool>(), any::<bool>(), prop::bool::weighted(0.7)).prop_map(
        |(s, h, r, mode, valblk, persistent, steer)| {
            let mut flags = LockFlags::ADOPT;
            if valblk {
                flags.insert(LockFlags::VALBLK);
            }
            if persistent {
                flags.insert(LockFlags::PERSISTENT);
            }
            Step::Adopt { s, h, r, mode, flags, steer }
        },
    )
}

/// With `hot`, the conversion flags (HEADQUE, CONVDEADLK...) come more often.
pub(crate) fn convert_step(hot: bool) -> impl Strategy<Value = Step> {
    const FLAGS: [LockFlags; 7] = [
        LockFlags::NOQUEUE,
        LockFlags::NOQUEUEBAST,
        LockFlags::QUECVT,
        LockFlags::CONVDEADLK,
        LockFlags::VALBLK,
        LockFlags::IVVALBLK,
        LockFlags::HEADQUE,
    ];
    (
        0..SLOTS,
        target(),
        mode(),
        prop::collection::vec(prop::bool::weighted(if hot { 0.3 } else { 0.2 }), FLAGS.len()),
        lvb(),
        prop::option::weighted(0.3, 1u64..=40),
    )
        .prop_map(|(s, h, mode, bits, lvb, timeout_ms)| {
            let mut flags = pick(&bits, &FLAGS);
            if !flags.contains(LockFlags::NOQUEUE) {
                flags.remove(LockFlags::NOQUEUEBAST);
            }
            if !flags.contains(LockFlags::VALBLK) {
                flags.remove(LockFlags::IVVALBLK);
            }
            // The engine rejects CONVDEADLK with NOQUEUE.
            if flags.contains(LockFlags::NOQUEUE) {
                flags.remove(LockFlags::CONVDEADLK);
            }
            let lvb = flags.contains(LockFlags::VALBLK).then_some(lvb);
            let timeout_ms = timeout_ms.filter(|_| !flags.contains(LockFlags::NOQUEUE));
            Step::Convert { s, h, mode, flags, lvb, timeout_ms }
        })
}

pub(crate) fn unlock_step() -> impl Strategy<Value = Step> {
    (0..SLOTS, target(), prop::bool::weighted(0.3), 0..4u8, lvb()).prop_map(|(s, h, force, lvb_choice, lvb)| {
        let mut flags = if force { UnlockFlags::FORCE } else { UnlockFlags::EMPTY };
        let lvb = match lvb_choice {
            0 => {
                flags.insert(UnlockFlags::VALBLK);
                Some(lvb)
            }
            1 => {
                flags.insert(UnlockFlags::IVVALBLK);
                None
            }
            _ => None,
        };
        Step::Unlock { s, h, flags, lvb }
    })
}

/// One step. A `hot` case runs mostly conversions on one resource, where
/// the converting queue grows and conversion deadlocks happen.
pub(crate) fn step(hot: bool) -> impl Strategy<Value = Step> {
    let (lock, convert) = if hot { (25, 50) } else { (30, 30) };
    prop_oneof![
        lock => lock_step(hot),
        4 => adopt_step(),
        convert => convert_step(hot),
        12 => unlock_step(),
        8 => (0..SLOTS, target()).prop_map(|(s, h)| Step::Cancel { s, h }),
        8 => (0u64..=30).prop_map(|ms| Step::Advance { ms }),
        3 => (0..SLOTS).prop_map(|s| Step::EndSession { s }),
    ]
}

pub(crate) fn steps() -> impl Strategy<Value = Vec<Step>> {
    any::<bool>().prop_flat_map(|hot| prop::collection::vec(step(hot), 1..80))
}
