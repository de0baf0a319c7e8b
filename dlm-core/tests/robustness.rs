//! Untrusted input never panics the engine and never breaks its invariants:
//! random requests with arbitrary flag combinations, names, value blocks,
//! handles, sessions, lockspaces and timeouts, most of them invalid.

use std::time::Duration;

use dlm_core::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Request { session: u64, request: ClientRequest },
    EndSession(u64),
    OpenSession(u64),
    Advance(u64),
    Purge(u32),
    Release { lockspace: u32, force: bool },
}

fn any_mode() -> impl Strategy<Value = Mode> {
    (0usize..6).prop_map(|i| Mode::from_index(i).expect("six modes"))
}

/// Mostly a few plausible flags (so that most requests are accepted and the
/// engine's state gets interesting), sometimes any combination at all.
fn any_lock_flags() -> impl Strategy<Value = LockFlags> {
    let plausible = [
        LockFlags::NOQUEUE,
        LockFlags::VALBLK,
        LockFlags::PERSISTENT,
        LockFlags::HEADQUE,
        LockFlags::NOORDER,
        LockFlags::ALTPR,
        LockFlags::QUECVT,
        LockFlags::CONVDEADLK,
        LockFlags::ADOPT,
    ];
    prop_oneof![
        6 => proptest::collection::vec(proptest::bool::weighted(0.15), plausible.len()).prop_map(move |picks| {
            picks.iter().zip(plausible).filter(|(pick, _)| **pick).fold(LockFlags::EMPTY, |all, (_, flag)| all | flag)
        }),
        1 => (0..=LockFlags::ALL.bits()).prop_map(|bits| LockFlags::from_bits(bits).expect("within ALL")),
    ]
}

fn any_unlock_flags() -> impl Strategy<Value = UnlockFlags> {
    (0..=UnlockFlags::ALL.bits()).prop_map(|bits| UnlockFlags::from_bits(bits).expect("within ALL"))
}

fn any_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (0u8..4).prop_map(|i| vec![b'r', i]),
        1 => proptest::collection::vec(any::<u8>(), 0..80),
    ]
}

fn any_lvb() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        4 => Just(None),
        2 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(Some),
        1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Some),
    ]
}

fn any_timeout() -> impl Strategy<Value = Option<Duration>> {
    proptest::option::of(prop_oneof![(0u64..50).prop_map(Duration::from_millis), Just(Duration::MAX),])
}

/// Mostly the open sessions 1 to 3, sometimes one that is not open.
fn any_session() -> impl Strategy<Value = u64> {
    prop_oneof![12 => 1u64..4, 1 => 0u64..6]
}

fn any_request() -> impl Strategy<Value = ClientRequest> {
    let handle = 0u64..4;
    prop_oneof![
        4 => (handle.clone(), prop_oneof![6 => 0u32..2, 1 => 0u32..4], any_name(), any_mode(), any_lock_flags(), any_timeout()).prop_map(
            |(handle, lockspace, name, mode, flags, timeout)| {
                ClientRequest::Lock(LockRequest {
                    handle: LockHandle(handle),
                    lockspace: LockspaceId(lockspace),
                    name,
                    mode,
                    flags,
                    timeout,
                })
            }
        ),
        2 => (handle.clone(), any_mode(), any_lock_flags(), any_lvb(), any_timeout()).prop_map(
            |(handle, mode, flags, lvb, timeout)| {
                ClientRequest::Convert(ConvertRequest { handle: LockHandle(handle), mode, flags, lvb, timeout })
            }
        ),
        2 => (handle.clone(), any_unlock_flags(), any_lvb()).prop_map(|(handle, flags, lvb)| {
            ClientRequest::Unlock(UnlockRequest { handle: LockHandle(handle), flags, lvb })
        }),
        1 => handle.prop_map(|handle| ClientRequest::Cancel { handle: LockHandle(handle) }),
    ]
}

fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        40 => (any_session(), any_request()).prop_map(|(session, request)| Step::Request { session, request }),
        1 => any_session().prop_map(Step::EndSession),
        2 => any_session().prop_map(Step::OpenSession),
        4 => (0u64..30).prop_map(Step::Advance),
        1 => (0u32..3).prop_map(Step::Purge),
        // Rare: a released lockspace takes every later request with it.
        1 => (0u32..3, proptest::bool::weighted(0.2)).prop_map(|(lockspace, force)| Step::Release { lockspace, force }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_input_never_panics_or_breaks_invariants(steps in proptest::collection::vec(any_step(), 20..200)) {
        let limits = Limits { waiters_per_resource_max: 3, locks_per_session_max: 4, ..Limits::default() };
        let mut node = Node::new(NodeConfig { limits, ..NodeConfig::default() }).expect("config");
        node.create_lockspace(b"a", LockspaceConfig::default()).expect("lockspace");
        node.create_lockspace(b"b", LockspaceConfig { lvb_len: 8, ..LockspaceConfig::default() }).expect("lockspace");
        for s in 1..4 {
            node.open_session(SessionId(s)).expect("session");
        }
        let mut now = 0u64;
        let mut accepted = 0u32;
        for step in steps {
            match step {
                Step::Request { session, request } => {
                    if node.handle_client(Instant::from_nanos(now), SessionId(session), request).is_ok() {
                        accepted += 1;
                    }
                }
                Step::EndSession(s) => {
                    let _ = node.end_session(Instant::from_nanos(now), SessionId(s));
                }
                Step::OpenSession(s) => {
                    let _ = node.open_session(SessionId(s));
                }
                Step::Advance(ms) => {
                    now += ms * 1_000_000;
                    node.handle_timeout(Instant::from_nanos(now));
                    // Everything due has fired: the next deadline is in the future.
                    prop_assert!(node.poll_timeout().is_none_or(|at| at.as_nanos() > now));
                }
                Step::Purge(ls) => {
                    let _ = node.purge_orphans(Instant::from_nanos(now), LockspaceId(ls), None);
                }
                Step::Release { lockspace, force } => {
                    let _ = node.release_lockspace(LockspaceId(lockspace), force);
                }
            }
            while node.poll_effect().is_some() {}
            prop_assert_eq!(node.check_invariants(), Ok(()));
        }
        // Most generated requests are invalid on purpose; this says how many
        // got through, to keep the generator honest when it is changed.
        if std::env::var_os("DLM_ROBUSTNESS_STATS").is_some() {
            eprintln!("accepted {accepted}");
        }
    }
}
