//! How waits end: cancels, force-unlocks, timeouts, and deadlocks between
//! sessions.

use super::*;

#[test]
fn cancel_ends_a_waiting_request_and_lets_the_next_in() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Ex, NONE);
    h.lock(3, 1, "a", Pr, NONE);
    assert_eq!(h.cancel(2, 1), Ok(vec![done(2, 1, Op::Lock, Status::Cancelled, None), granted(3, 1, Op::Lock, Pr, 2)]));
    assert_eq!(h.cancel(3, 1), Err(RequestError::NotPending));
    assert_eq!(h.cancel(3, 9), Err(RequestError::UnknownHandle));
}

#[test]
fn cancel_of_a_conversion_keeps_the_granted_mode() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    h.convert(1, 1, Ex, NONE);
    assert_eq!(h.cancel(1, 1), Ok(vec![done(1, 1, Op::Convert, Status::Cancelled, Some(Pr))]));
    assert_eq!(h.node.lock_info(SessionId(1), LockHandle(1)).expect("lock").granted, Some(Pr));
}

#[test]
fn unlock_of_a_pending_lock_needs_force() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "a", Ex, NONE);
    assert_eq!(h.try_unlock(2, 1, UnlockFlags::EMPTY, None), Err(RequestError::Pending));
    assert_eq!(h.try_convert(2, 1, Pr, NONE, None), Err(RequestError::Pending));
    assert_eq!(
        h.try_unlock(2, 1, UnlockFlags::FORCE, None),
        Ok(vec![done(2, 1, Op::Lock, Status::Cancelled, None), unlocked(2, 1)])
    );
    h.lock(2, 2, "a", Nl, LockFlags::EXPEDITE);
    h.convert(2, 2, Ex, NONE);
    assert_eq!(
        h.try_unlock(2, 2, UnlockFlags::FORCE, None),
        Ok(vec![done(2, 2, Op::Convert, Status::Cancelled, Some(Nl)), unlocked(2, 2)])
    );
}

#[test]
fn a_request_times_out_when_its_deadline_passes() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    let request = h.lock_req(1, "a", Ex, NONE, Some(Duration::from_secs(5)));
    h.request(2, request).expect("accepted");
    assert_eq!(h.node.poll_timeout(), Some(Instant::from_nanos(5_000_000_000)));
    assert_eq!(h.advance(Duration::from_secs(4)), vec![]);
    assert_eq!(h.advance(Duration::from_secs(5)), vec![done(2, 1, Op::Lock, Status::TimedOut, None)]);
    assert_eq!(h.node.poll_timeout(), None);
}

#[test]
fn a_conversion_times_out_keeping_its_mode() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    let request = ClientRequest::Convert(ConvertRequest {
        handle: LockHandle(1),
        mode: Ex,
        flags: NONE,
        lvb: None,
        timeout: Some(Duration::from_millis(10)),
    });
    h.request(1, request).expect("accepted");
    assert_eq!(h.advance(Duration::from_millis(10)), vec![done(1, 1, Op::Convert, Status::TimedOut, Some(Pr))]);
}

#[test]
fn a_granted_request_no_longer_times_out() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    let request = h.lock_req(1, "a", Ex, NONE, Some(Duration::from_secs(1)));
    h.request(2, request).expect("accepted");
    h.unlock(1, 1);
    assert_eq!(h.node.poll_timeout(), None);
    assert_eq!(h.advance(Duration::from_secs(2)), vec![]);
}

// ----- deadlocks between sessions -----

#[test]
fn a_wait_for_cycle_fails_the_youngest_request() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "b", Ex, NONE);
    assert_eq!(h.lock(1, 2, "b", Ex, NONE), vec![bast(2, 1, Ex)]);
    assert_eq!(h.lock(2, 2, "a", Ex, NONE), vec![bast(1, 1, Ex), done(2, 2, Op::Lock, Status::Deadlock, None)]);
    // Session 1 still waits for b, and gets it when session 2 lets go.
    assert_eq!(h.unlock(2, 1), vec![unlocked(2, 1), granted(1, 2, Op::Lock, Ex, 3)]);
}

#[test]
fn a_three_session_cycle_through_a_conversion_is_found() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "b", Ex, NONE);
    h.lock(3, 1, "c", Ex, NONE);
    h.lock(1, 2, "b", Pr, NONE); // 1 waits for 2
    h.lock(2, 2, "c", Pr, NONE); // 2 waits for 3
    h.lock(3, 2, "a", Nl, NONE);
    let effects = h.convert(3, 2, Ex, NONE); // 3 waits for 1: a cycle
    assert_eq!(effects.last(), Some(&done(3, 2, Op::Convert, Status::Deadlock, Some(Nl))), "{effects:?}");
}

#[test]
fn a_grant_that_closes_a_cycle_is_detected() {
    let mut h = harness();
    // Session 2 waits on b held by session 1; session 1 then waits for a,
    // which is granted to session 2 by a hand-off from session 3.
    h.lock(3, 1, "a", Ex, NONE);
    h.lock(1, 1, "b", Ex, NONE);
    h.lock(2, 1, "a", Ex, NONE); // 2 waits for 3 on a
    h.lock(1, 2, "a", Ex, NONE); // 1 waits behind 2 on a
    let effects = h.lock(2, 2, "b", Ex, NONE); // 2 waits for 1 on b: 1→2→1
    assert_eq!(effects.last(), Some(&done(2, 2, Op::Lock, Status::Deadlock, None)), "{effects:?}");
}

#[test]
fn deadlock_detection_can_be_turned_off() {
    let mut h = harness_with(NodeConfig { deadlock_detection: false, ..NodeConfig::default() });
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "b", Ex, NONE);
    h.lock(1, 2, "b", Ex, NONE);
    assert_eq!(h.lock(2, 2, "a", Ex, NONE), vec![bast(1, 1, Ex)]);
}

#[test]
fn a_search_out_of_budget_leaves_the_cycle_to_a_full_scan() {
    let limits = Limits { deadlock_search_sessions_max: 1, ..Limits::default() };
    let mut h = harness_with(NodeConfig { limits, ..NodeConfig::default() });
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "b", Ex, NONE);
    h.lock(3, 1, "c", Ex, NONE);
    h.lock(1, 2, "b", Ex, NONE);
    h.lock(2, 2, "c", Ex, NONE);
    assert_eq!(h.lock(3, 2, "a", Ex, NONE), vec![bast(1, 1, Ex)], "the cycle is three long: over budget");
    assert_eq!(h.node.poll_timeout(), Some(Instant::from_nanos(1_000_000_000)));
    assert_eq!(h.advance(Duration::from_secs(1)), vec![done(3, 2, Op::Lock, Status::Deadlock, None)]);
}
