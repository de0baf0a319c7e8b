//! Persistent locks and orphans, and a session's end.

use super::*;

#[test]
fn a_persistent_lock_outlives_its_session_and_can_be_adopted() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, LockFlags::PERSISTENT | LockFlags::VALBLK);
    h.try_convert(1, 1, Ex, LockFlags::VALBLK, Some(b"state")).expect("write");
    assert_eq!(h.end(1), vec![]);
    assert_eq!(h.lock(2, 1, "a", Pr, NONE), vec![], "the orphan still holds EX and is not told");
    assert_eq!(
        h.lock(3, 1, "a", Pr, LockFlags::ADOPT),
        vec![done(3, 1, Op::Lock, Status::NotFound, None)],
        "wrong mode"
    );
    assert_eq!(h.lock(3, 2, "zzz", Ex, LockFlags::ADOPT), vec![done(3, 2, Op::Lock, Status::NotFound, None)]);
    assert_eq!(
        h.lock(3, 3, "a", Ex, LockFlags::ADOPT | LockFlags::VALBLK),
        vec![with(granted(3, 3, Op::Lock, Ex, 3), |c| c.lvb = Some(lvb32(b"state"))), bast(3, 3, Pr)]
    );
    assert_eq!(h.unlock(3, 3), vec![unlocked(3, 3), granted(2, 1, Op::Lock, Pr, 4)]);
}

#[test]
fn purging_orphans_lets_waiters_in() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, LockFlags::PERSISTENT);
    h.lock(1, 2, "b", Ex, NONE);
    h.end(1);
    assert_eq!(h.node.dump(h.ls, None, 10).expect("dump").len(), 1, "the non-persistent lock went with its session");
    h.lock(2, 1, "a", Ex, NONE);
    assert_eq!(h.node.purge_orphans(h.now, h.ls, None), Ok(1));
    assert_eq!(h.effects(), vec![granted(2, 1, Op::Lock, Ex, 3)]);
    assert_eq!(
        h.try_lock(2, 2, "a", Ex, LockFlags::ADOPT | LockFlags::NOQUEUE),
        Err(RequestError::InvalidFlags("ADOPT goes only with VALBLK and PERSISTENT"))
    );
}

// ----- sessions -----

#[test]
fn ending_a_session_releases_its_locks_and_drops_its_requests() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "a", Ex, NONE);
    h.lock(2, 2, "b", Pr, NONE);
    h.lock(3, 1, "b", Ex, NONE);
    assert_eq!(h.end(2), vec![granted(3, 1, Op::Lock, Ex, 3)], "no completion for the ended session's request");
    assert_eq!(h.end(1), vec![]);
    assert_eq!(h.node.end_session(h.now, SessionId(1)), Err(RequestError::UnknownSession));
    assert_eq!(h.node.session_count(), 2);
}
