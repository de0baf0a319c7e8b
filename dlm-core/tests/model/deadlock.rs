//! Deadlock detection: no wait-for cycle survives a step.

use std::collections::{BTreeMap, HashSet};

use dlm_core::{
    ClientRequest, ConvertRequest, Instant, LockFlags, LockHandle, LockRequest, LockspaceConfig, Mode, Node,
    NodeConfig, ResourceInfo, SessionId, UnlockFlags, UnlockRequest,
};
use proptest::prelude::*;

use crate::*;
use crate::{checker::*, harness::*, reference::*, spec::*, steps::*};

#[derive(Clone, Debug)]
pub(crate) enum DStep {
    Lock { s: usize, h: u64, r: usize, mode: Mode, flags: LockFlags },
    Convert { s: usize, h: u64, mode: Mode, flags: LockFlags },
    Unlock { s: usize, h: u64 },
    Cancel { s: usize, h: u64 },
}

pub(crate) fn dstep(sessions: usize, resources: usize) -> impl Strategy<Value = DStep> {
    let lock_flags = prop::sample::select(vec![
        LockFlags::EMPTY,
        LockFlags::EMPTY,
        LockFlags::EMPTY,
        LockFlags::EMPTY,
        LockFlags::NOQUEUE,
        LockFlags::HEADQUE,
    ]);
    let convert_flags = prop::sample::select(vec![
        LockFlags::EMPTY,
        LockFlags::EMPTY,
        LockFlags::EMPTY,
        LockFlags::CONVDEADLK,
        LockFlags::HEADQUE,
        LockFlags::NOQUEUE,
    ]);
    prop_oneof![
        45 => (0..sessions, 0..HANDLES, 0..resources, mode(), lock_flags)
            .prop_map(|(s, h, r, mode, flags)| DStep::Lock { s, h, r, mode, flags }),
        40 => (0..sessions, target(), mode(), convert_flags)
            .prop_map(|(s, h, mode, flags)| DStep::Convert { s, h, mode, flags }),
        10 => (0..sessions, target()).prop_map(|(s, h)| DStep::Unlock { s, h }),
        5 => (0..sessions, target()).prop_map(|(s, h)| DStep::Cancel { s, h }),
    ]
}

pub(crate) fn dscenario() -> impl Strategy<Value = (usize, Vec<DStep>)> {
    (3usize..=4, 2usize..=3).prop_flat_map(|(sessions, resources)| {
        (Just(sessions), prop::collection::vec(dstep(sessions, resources), 1..60))
    })
}

/// The wait-for graph between sessions, computed from the dump: a waiter
/// waits for every other session holding a mode incompatible with the one it
/// asks for, and for every other session queued ahead of it asking for an
/// incompatible mode. Orphans and a session's own locks are left out.
pub(crate) fn wait_for(dump: &[ResourceInfo]) -> BTreeMap<SessionId, Vec<SessionId>> {
    let mut edges: BTreeMap<SessionId, Vec<SessionId>> = BTreeMap::new();
    for r in dump {
        let holders: Vec<_> = r.granted.iter().chain(&r.converting).collect();
        let queued: Vec<_> = r.converting.iter().chain(&r.waiting).collect();
        for (i, w) in queued.iter().enumerate() {
            let want = w.requested.expect("queued lock has a request");
            let mut to = |l: &dlm_core::LockInfo| {
                if !l.orphan && l.session != w.session {
                    edges.entry(w.session).or_default().push(l.session);
                }
            };
            for h in &holders {
                // (`to` leaves out the waiter itself: same session.)
                if !compat(h.granted.expect("holder"), want) {
                    to(h);
                }
            }
            for a in &queued[..i] {
                if !compat(a.requested.expect("request"), want) {
                    to(a);
                }
            }
        }
    }
    edges
}

pub(crate) fn find_cycle(edges: &BTreeMap<SessionId, Vec<SessionId>>) -> Option<Vec<SessionId>> {
    fn visit(
        s: SessionId,
        edges: &BTreeMap<SessionId, Vec<SessionId>>,
        path: &mut Vec<SessionId>,
        done: &mut HashSet<SessionId>,
    ) -> Option<Vec<SessionId>> {
        if let Some(i) = path.iter().position(|&p| p == s) {
            return Some(path[i..].to_vec());
        }
        if done.contains(&s) {
            return None;
        }
        path.push(s);
        for &t in edges.get(&s).into_iter().flatten() {
            if let Some(cycle) = visit(t, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(s);
        None
    }
    let mut done = HashSet::new();
    edges.keys().find_map(|&s| visit(s, edges, &mut vec![], &mut done))
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn deadlock_detection_leaves_no_cycle((sessions, steps) in dscenario()) {
        let mut node = Node::new(NodeConfig { deadlock_detection: true, ..Default::default() }).expect("node");
        let ls = node.create_lockspace(b"deadlock", LockspaceConfig::default()).expect("lockspace");
        let ids: Vec<SessionId> = (1..=sessions as u64).map(SessionId).collect();
        for &s in &ids {
            node.open_session(s).expect("open session");
        }
        let mut check = Checker::default();
        for (n, step) in steps.iter().enumerate() {
            let handle = |s: usize, h: u64| {
                let mut existing: Vec<LockHandle> =
                    check.locks.keys().filter(|k| k.0 == ids[s]).map(|k| k.1).collect();
                existing.sort_unstable();
                resolve(h, &existing)
            };
            let (s, req) = match *step {
                DStep::Lock { s, h, r, mode, flags } => (s, ClientRequest::Lock(LockRequest {
                    handle: LockHandle(h),
                    lockspace: ls,
                    name: NAMES[r].to_vec(),
                    mode,
                    flags,
                    timeout: None,
                })),
                DStep::Convert { s, h, mode, flags } => (s, ClientRequest::Convert(ConvertRequest {
                    handle: handle(s, h),
                    mode,
                    flags,
                    lvb: None,
                    timeout: None,
                })),
                DStep::Unlock { s, h } => (s, ClientRequest::Unlock(UnlockRequest {
                    handle: handle(s, h),
                    flags: UnlockFlags::EMPTY,
                    lvb: None,
                })),
                DStep::Cancel { s, h } => (s, ClientRequest::Cancel { handle: handle(s, h) }),
            };
            let result = node.handle_client(Instant::ZERO, ids[s], req.clone());
            check.on_request(ids[s], &req, &result);
            let effects = drain(&mut node);
            // Every Deadlock completion ends a request that was pending (the
            // checker rejects completions of nothing pending).
            check.on_effects(&effects);
            node.check_invariants().unwrap_or_else(|e| panic!("engine invariant after step {n}: {e}"));
            check.check_compatible();
            let dump = node.dump(ls, None, usize::MAX).expect("dump");
            check_settled(&dump);
            if let Some(cycle) = find_cycle(&wait_for(&dump)) {
                panic!("wait-for cycle {cycle:?} left after step {n} {step:?}: {dump:#?}");
            }
        }
    }
}
