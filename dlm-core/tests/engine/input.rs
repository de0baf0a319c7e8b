//! Bad input and limits: typed errors, nothing changed.

use super::*;

#[test]
fn bad_requests_are_rejected_with_typed_errors_and_change_nothing() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    assert_eq!(h.try_lock(1, 1, "b", Ex, NONE), Err(RequestError::HandleInUse));
    assert_eq!(h.try_lock(1, 2, "", Ex, NONE), Err(RequestError::InvalidResourceName { len: 0 }));
    assert_eq!(h.try_lock(1, 2, &"x".repeat(65), Ex, NONE), Err(RequestError::InvalidResourceName { len: 65 }));
    assert_eq!(h.try_lock(1, 2, &"x".repeat(64), Ex, NONE).map(|e| e.len()), Ok(1));
    assert_eq!(h.try_convert(1, 7, Ex, NONE, None), Err(RequestError::UnknownHandle));
    assert_eq!(h.try_unlock(1, 7, UnlockFlags::EMPTY, None), Err(RequestError::UnknownHandle));
    assert_eq!(h.try_lock(9, 1, "a", Ex, NONE), Err(RequestError::UnknownSession));
    let bad_lockspace = ClientRequest::Lock(LockRequest {
        handle: LockHandle(5),
        lockspace: LockspaceId(99),
        name: b"a".to_vec(),
        mode: Ex,
        flags: NONE,
        timeout: None,
    });
    assert_eq!(h.request(1, bad_lockspace), Err(RequestError::UnknownLockspace));
    let too_long = h.lock_req(5, "a", Ex, NONE, Some(Duration::from_secs(8 * 24 * 3600)));
    assert_eq!(h.request(1, too_long), Err(RequestError::LimitExceeded(Limit::RequestTimeout)));
    assert_eq!(
        h.try_lock(1, 5, "a", Ex, LockFlags::CONVDEADLK),
        Err(RequestError::InvalidFlags("QUECVT, CONVDEADLK and IVVALBLK apply to conversions"))
    );
    assert_eq!(
        h.try_convert(1, 1, Ex, LockFlags::EXPEDITE, None),
        Err(RequestError::InvalidFlags("EXPEDITE and ADOPT apply to new requests"))
    );
}

#[test]
fn every_limit_is_a_typed_error() {
    let limits = Limits {
        locks_per_session_max: 3,
        waiters_per_resource_max: 1,
        resources_per_lockspace_max: 2,
        locks_per_lockspace_max: 4,
        sessions_max: 4,
        lockspaces_max: 2,
        ..Limits::default()
    };
    let mut h = harness_with(NodeConfig { limits, ..NodeConfig::default() });
    assert_eq!(h.node.open_session(SessionId(5)), Err(RequestError::LimitExceeded(Limit::Sessions)));
    assert_eq!(h.node.open_session(SessionId(1)), Err(RequestError::SessionExists));
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(1, 2, "b", Ex, NONE);
    assert_eq!(h.try_lock(1, 3, "c", Ex, NONE), Err(RequestError::LimitExceeded(Limit::ResourcesPerLockspace)));
    h.lock(2, 1, "a", Ex, NONE);
    assert_eq!(h.try_lock(3, 1, "a", Ex, NONE), Err(RequestError::LimitExceeded(Limit::WaitersPerResource)));
    assert_eq!(
        h.try_lock(3, 1, "a", Ex, LockFlags::NOQUEUE),
        Ok(vec![done(3, 1, Op::Lock, Status::WouldBlock, None)]),
        "a try never queues"
    );
    h.lock(1, 3, "a", Nl, LockFlags::EXPEDITE);
    assert_eq!(
        h.try_lock(1, 4, "a", Nl, LockFlags::EXPEDITE),
        Err(RequestError::LimitExceeded(Limit::LocksPerSession))
    );
    assert_eq!(
        h.try_lock(3, 1, "a", Nl, LockFlags::EXPEDITE),
        Err(RequestError::LimitExceeded(Limit::LocksPerLockspace))
    );
    assert!(h.node.create_lockspace(b"second", LockspaceConfig::default()).is_ok());
    assert_eq!(
        h.node.create_lockspace(b"third", LockspaceConfig::default()),
        Err(RequestError::LimitExceeded(Limit::Lockspaces))
    );
    // A conversion that would queue on a full resource is refused; one that is
    // granted at once is not.
    assert_eq!(h.try_convert(1, 3, Pr, NONE, None), Err(RequestError::LimitExceeded(Limit::WaitersPerResource)));
    assert_eq!(
        h.try_convert(1, 1, Nl, NONE, None),
        Ok(vec![granted(1, 1, Op::Convert, Nl, 4), granted(2, 1, Op::Lock, Ex, 5)])
    );
}

#[test]
fn lockspaces_are_validated_and_released() {
    let mut h = harness();
    let node = &mut h.node;
    assert_eq!(
        node.create_lockspace(b"", LockspaceConfig::default()),
        Err(RequestError::InvalidLockspaceName { len: 0 })
    );
    assert_eq!(
        node.create_lockspace(&[b'x'; 65], LockspaceConfig::default()),
        Err(RequestError::InvalidLockspaceName { len: 65 })
    );
    assert_eq!(node.create_lockspace(b"test", LockspaceConfig::default()), Err(RequestError::LockspaceExists));
    for len in [0, 12, 264] {
        assert_eq!(
            node.create_lockspace(b"lvb", LockspaceConfig { lvb_len: len, ..LockspaceConfig::default() }),
            Err(RequestError::InvalidLvbLen { len })
        );
    }
    let wide = node
        .create_lockspace(b"lvb", LockspaceConfig { lvb_len: 64, ..LockspaceConfig::default() })
        .expect("64-byte value blocks");
    assert_eq!(node.lockspace_id(b"lvb"), Some(wide));
    assert_eq!(node.release_lockspace(wide, false), Ok(()));
    assert_eq!(node.lockspace_id(b"lvb"), None);

    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "a", Ex, NONE);
    assert_eq!(h.node.release_lockspace(h.ls, false), Err(RequestError::LockspaceBusy { locks: 2 }));
    assert_eq!(h.node.release_lockspace(h.ls, true), Ok(()));
    assert_eq!(
        h.effects(),
        vec![
            Effect::Revoked { session: SessionId(1), handle: LockHandle(1), reason: RevokeReason::LockspaceReleased },
            done(2, 1, Op::Lock, Status::Cancelled, None),
        ]
    );
    h.node.check_invariants().expect("invariants");
    // The handles are free again, and the old lockspace id is not reused.
    assert_eq!(h.try_lock(1, 1, "a", Ex, NONE), Err(RequestError::UnknownLockspace));
}

#[test]
fn the_dump_shows_every_queue() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    h.convert(1, 1, Ex, NONE);
    h.lock(3, 1, "a", Cr, NONE);
    let dump = h.node.dump(h.ls, None, 10).expect("dump");
    assert_eq!(dump.len(), 1);
    let resource = &dump[0];
    assert_eq!(resource.name, b"a");
    assert_eq!(resource.granted.iter().map(|l| l.session.0).collect::<Vec<_>>(), vec![2]);
    assert_eq!(
        resource.converting.iter().map(|l| (l.session.0, l.granted, l.requested)).collect::<Vec<_>>(),
        vec![(1, Some(Pr), Some(Ex))]
    );
    assert_eq!(resource.waiting.iter().map(|l| (l.session.0, l.requested)).collect::<Vec<_>>(), vec![(3, Some(Cr))]);
    assert_eq!(resource.last_token, FencingToken(2));
    let info = h.node.lockspaces();
    assert_eq!((info[0].resources, info[0].locks), (1, 3));
}

#[test]
fn a_dropped_conversion_takes_its_demoted_status_with_it() {
    // Found by the reference model: the orphan's adopter asked for NL and got
    // it; DEMOTED belonged to the conversion dropped with the session.
    let mut h = harness();
    h.lock(1, 1, "r", Cw, LockFlags::PERSISTENT);
    h.lock(2, 1, "r", Cr, NONE);
    h.convert(2, 1, Pr, NONE);
    h.convert(1, 1, Ex, LockFlags::CONVDEADLK);
    assert_eq!(h.end(1), vec![]);
    assert_eq!(h.lock(3, 1, "r", Nl, LockFlags::ADOPT), vec![granted(3, 1, Op::Lock, Nl, 4)]);
}

#[test]
fn tokens_never_go_back_across_a_lockspace_released_and_created_again() {
    // Issue 17: a lockspace released with force and created again handed
    // out token 1 while a holder of token 4 still ran.
    let mut h = harness();
    for handle in 1..=4 {
        h.lock(1, handle, &format!("r{handle}"), Ex, NONE);
    }
    let before = h.node.last_token(h.ls).expect("lockspace");
    h.node.release_lockspace(h.ls, true).expect("released");
    let _ = h.effects();
    h.ls = h.node.create_lockspace(b"test", LockspaceConfig::default()).expect("created again");
    let effects = h.lock(2, 1, "r4", Ex, NONE);
    assert_eq!(effects, vec![granted(2, 1, Op::Lock, Ex, before + 1)]);
    // Another name created later starts above it too.
    let other = h.node.create_lockspace(b"other", LockspaceConfig::default()).expect("another");
    assert_eq!(h.node.last_token(other), Some(before));
}
