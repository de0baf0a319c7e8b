//! Model-based property tests of the lock engine.
//!
//! - `engine_matches_reference_model` drives a [`Node`] (deadlock detection
//!   off) and a reference model with the same random requests (locks with
//!   NOQUEUE, NOQUEUEBAST, HEADQUE, NOORDER, ALTPR/ALTCW, PERSISTENT, VALBLK,
//!   EXPEDITE and timeouts; conversions with NOQUEUE, QUECVT, CONVDEADLK,
//!   VALBLK/IVVALBLK, HEADQUE and timeouts; unlocks with FORCEUNLOCK, VALBLK,
//!   IVVALBLK; cancels; time passing; session ends; ADOPT of orphans) and
//!   compares every result (`Ok` or the exact error), every effect in order,
//!   and the queues the engine dumps (order, modes, tokens, value block). The
//!   model is deliberately naive (a `Vec` per queue, everything recomputed)
//!   and written from the specification of the semantics, not from the
//!   engine's source. Two places compare less than the exact order, where the
//!   spec leaves it open: a session end (a multiset, and the same set of
//!   tokens), and a failed NOQUEUEBAST try (a multiset).
//!
//!   Alongside, a checker that sees only the requests and the effects (not the
//!   model, not the engine's state) checks the safety properties: no
//!   incompatible modes granted together, every accepted request completes
//!   exactly once, fencing tokens strictly increase per resource, blocking
//!   callbacks go to holders that are in the way; after every step the dump
//!   shows no queued request the grant pass should have granted; and a final
//!   liveness phase checks that nothing is left waiting once the other
//!   sessions end and the last one cancels and unlocks everything.
//! - `deadlock_detection_leaves_no_cycle` runs random locks and conversions
//!   with deadlock detection on and checks, from the engine's dump, that no
//!   wait-for cycle between sessions survives a step, with the same checker.
//!
//! Files: `spec` (mode tables from the specification), `reference` (the
//! model), `checker`, `steps` (the random requests), `harness` (engine,
//! model and checker stepped together), `deadlock` (the second test).
//!
//! `PROPTEST_CASES=n` runs more cases by hand.

mod checker;
mod deadlock;
mod harness;
mod reference;
mod spec;
mod steps;

use dlm_core::LVB_LEN_DEFAULT;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use crate::harness::*;
use crate::steps::*;

/// The default lockspace's value block length.
pub(crate) const LVB_LEN: usize = LVB_LEN_DEFAULT;
/// The resources the tests use.
pub(crate) const NAMES: [&[u8]; 4] = [b"r0", b"r1", b"r2", b"r3"];
/// Time advances in whole milliseconds; timeouts add a distinct number of
/// nanoseconds so that no two deadlines are ever equal.
pub(crate) const MS: u64 = 1_000_000;

/// `cases` unless `PROPTEST_CASES` says otherwise (for a longer run by hand).
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/model.txt"))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(8192))]

    #[test]
    fn engine_matches_reference_model(steps in steps()) {
        let mut h = Harness::new();
        for step in &steps {
            h.apply(step);
        }
        h.liveness();
    }
}
