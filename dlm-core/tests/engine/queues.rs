//! Grants and queues, blocking callbacks, try-locks, QUECVT and conversion
//! deadlocks, EXPEDITE, NOORDER, HEADQUE, ALTPR/ALTCW.

use super::*;

#[test]
fn an_uncontended_lock_is_granted_with_the_first_token() {
    let mut h = harness();
    assert_eq!(h.lock(1, 1, "a", Ex, NONE), vec![granted(1, 1, Op::Lock, Ex, 1)]);
    assert_eq!(h.unlock(1, 1), vec![unlocked(1, 1)]);
}

#[test]
fn compatible_modes_share_and_an_incompatible_one_waits_and_blocks_the_holders() {
    let mut h = harness();
    assert_eq!(h.lock(1, 1, "a", Pr, NONE), vec![granted(1, 1, Op::Lock, Pr, 1)]);
    assert_eq!(h.lock(2, 1, "a", Cr, NONE), vec![granted(2, 1, Op::Lock, Cr, 2)]);
    assert_eq!(h.lock(3, 1, "a", Ex, NONE), vec![bast(1, 1, Ex), bast(2, 1, Ex)]);
    assert_eq!(h.unlock(1, 1), vec![unlocked(1, 1)]);
    assert_eq!(h.unlock(2, 1), vec![unlocked(2, 1), granted(3, 1, Op::Lock, Ex, 3)]);
}

#[test]
fn waiting_requests_are_granted_in_order_and_a_new_holder_in_the_way_is_told() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    assert_eq!(h.lock(2, 1, "a", Ex, NONE), vec![bast(1, 1, Ex)]);
    assert_eq!(h.lock(3, 1, "a", Pr, NONE), vec![]);
    assert_eq!(h.unlock(1, 1), vec![unlocked(1, 1), granted(2, 1, Op::Lock, Ex, 2), bast(2, 1, Pr)]);
    assert_eq!(h.unlock(2, 1), vec![unlocked(2, 1), granted(3, 1, Op::Lock, Pr, 3)]);
}

#[test]
fn a_compatible_request_still_queues_behind_a_waiter() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    assert_eq!(h.lock(2, 1, "a", Ex, NONE), vec![bast(1, 1, Ex)]);
    assert_eq!(h.lock(3, 1, "a", Pr, NONE), vec![], "FIFO: PR waits behind the EX request");
    let dump = h.node.dump(h.ls, Some(b"a"), 10).expect("dump");
    assert_eq!(dump[0].waiting.len(), 2);
}

#[test]
fn a_blocking_callback_is_sent_once_per_episode_and_again_for_a_stronger_mode() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    assert_eq!(h.lock(2, 1, "a", Pw, NONE), vec![bast(1, 1, Pw)]);
    assert_eq!(h.lock(3, 1, "a", Pw, NONE), vec![], "already told of PW");
    assert_eq!(h.lock(4, 1, "a", Ex, NONE), vec![bast(1, 1, Ex)], "EX is a stronger blocked mode");
}

#[test]
fn a_down_conversion_is_immediate_and_lets_waiters_in_and_resets_the_episode() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    assert_eq!(h.lock(2, 1, "a", Ex, NONE), vec![bast(1, 1, Ex)]);
    assert_eq!(h.lock(3, 1, "a", Ex, NONE), vec![]);
    assert_eq!(
        h.convert(1, 1, Nl, NONE),
        vec![granted(1, 1, Op::Convert, Nl, 2), granted(2, 1, Op::Lock, Ex, 3), bast(2, 1, Ex)]
    );
    // Session 2 already knows it blocks EX; a weaker blocked mode tells it nothing new.
    assert_eq!(h.convert(1, 1, Pr, NONE), vec![]);
}

#[test]
fn conversions_are_granted_before_waiting_requests() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    assert_eq!(h.lock(3, 1, "a", Ex, NONE), vec![bast(1, 1, Ex), bast(2, 1, Ex)]);
    assert_eq!(h.convert(1, 1, Ex, NONE), vec![], "blocked by session 2's PR, which already knows of EX");
    assert_eq!(h.unlock(2, 1), vec![unlocked(2, 1), granted(1, 1, Op::Convert, Ex, 3), bast(1, 1, Ex)]);
    assert_eq!(h.unlock(1, 1), vec![unlocked(1, 1), granted(3, 1, Op::Lock, Ex, 4)]);
}

#[test]
fn a_compatible_up_conversion_is_granted_in_place_ahead_of_waiters() {
    let mut h = harness();
    h.lock(1, 1, "a", Nl, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    assert_eq!(h.lock(3, 1, "a", Ex, NONE), vec![bast(2, 1, Ex)]);
    assert_eq!(h.convert(1, 1, Pr, NONE), vec![granted(1, 1, Op::Convert, Pr, 3), bast(1, 1, Ex)]);
}

// ----- try-locks -----

#[test]
fn noqueue_fails_at_once_without_blocking_callbacks() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    assert_eq!(h.lock(2, 1, "a", Ex, LockFlags::NOQUEUE), vec![done(2, 1, Op::Lock, Status::WouldBlock, None)]);
    // The handle is free again.
    assert_eq!(h.lock(2, 1, "b", Ex, NONE), vec![granted(2, 1, Op::Lock, Ex, 2)]);
}

#[test]
fn noqueuebast_tells_the_holders_when_the_try_fails() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Nl, NONE);
    assert_eq!(
        h.lock(3, 1, "a", Ex, LockFlags::NOQUEUE | LockFlags::NOQUEUEBAST),
        vec![bast(1, 1, Ex), done(3, 1, Op::Lock, Status::WouldBlock, None)]
    );
    assert_eq!(
        h.try_lock(3, 2, "a", Ex, LockFlags::NOQUEUEBAST),
        Err(RequestError::InvalidFlags("NOQUEUEBAST goes with NOQUEUE"))
    );
}

#[test]
fn a_conversion_with_noqueue_keeps_its_mode_when_it_fails() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    assert_eq!(h.convert(1, 1, Ex, LockFlags::NOQUEUE), vec![done(1, 1, Op::Convert, Status::WouldBlock, Some(Pr))]);
}

// ----- QUECVT, conversion deadlocks -----

#[test]
fn quecvt_queues_a_grantable_conversion_behind_other_conversions() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    h.lock(3, 1, "a", Nl, NONE);
    assert_eq!(h.convert(1, 1, Ex, NONE), vec![bast(2, 1, Ex)]);
    assert_eq!(h.convert(3, 1, Pr, LockFlags::QUECVT), vec![], "queued behind session 1's conversion");
    // Only granted modes block: session 3 still holds NL, so session 1 gets EX.
    assert_eq!(h.unlock(2, 1), vec![unlocked(2, 1), granted(1, 1, Op::Convert, Ex, 4), bast(1, 1, Pr)]);
    assert_eq!(h.unlock(1, 1), vec![unlocked(1, 1), granted(3, 1, Op::Convert, Pr, 5)]);
}

#[test]
fn without_quecvt_the_same_conversion_is_granted_in_place() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    h.lock(3, 1, "a", Nl, NONE);
    h.convert(1, 1, Ex, NONE);
    assert_eq!(h.convert(3, 1, Pr, NONE), vec![granted(3, 1, Op::Convert, Pr, 4), bast(3, 1, Ex)]);
}

#[test]
fn quecvt_is_refused_for_a_conversion_that_can_never_wait() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    assert_eq!(
        h.try_convert(1, 1, Nl, LockFlags::QUECVT, None),
        Err(RequestError::QuecvtNotAllowed { from: Pr, to: Nl })
    );
    assert_eq!(
        h.try_lock(1, 2, "b", Pr, LockFlags::QUECVT).unwrap_err(),
        RequestError::InvalidFlags("QUECVT, CONVDEADLK and IVVALBLK apply to conversions")
    );
}

#[test]
fn a_conversion_deadlock_fails_the_second_conversion() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    assert_eq!(h.convert(1, 1, Ex, NONE), vec![bast(2, 1, Ex)]);
    assert_eq!(h.convert(2, 1, Ex, NONE), vec![done(2, 1, Op::Convert, Status::Deadlock, Some(Pr))]);
}

#[test]
fn convdeadlk_demotes_to_nl_instead_and_reports_it_on_the_grant() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Pr, NONE);
    h.convert(1, 1, Ex, NONE);
    assert_eq!(
        h.convert(2, 1, Ex, LockFlags::CONVDEADLK),
        vec![granted(1, 1, Op::Convert, Ex, 3), bast(1, 1, Ex)],
        "session 2 gave up its PR, so session 1 got EX; session 2 waits from NL"
    );
    let info = h.node.lock_info(SessionId(2), LockHandle(1)).expect("lock");
    assert_eq!((info.granted, info.requested), (Some(Nl), Some(Ex)));
    assert_eq!(
        h.unlock(1, 1),
        vec![unlocked(1, 1), with(granted(2, 1, Op::Convert, Ex, 4), |c| c.flags = StatusFlags::DEMOTED)]
    );
    assert_eq!(
        h.try_convert(2, 1, Nl, LockFlags::CONVDEADLK | LockFlags::NOQUEUE, None).unwrap_err(),
        RequestError::InvalidFlags("CONVDEADLK and NOQUEUE exclude each other")
    );
}

// ----- EXPEDITE, NOORDER, HEADQUE, ALTPR/ALTCW -----

#[test]
fn expedite_grants_a_new_nl_request_past_the_queue() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "a", Ex, NONE);
    assert_eq!(h.lock(3, 1, "a", Nl, NONE), vec![], "a plain NL request waits its turn");
    assert_eq!(h.lock(4, 1, "a", Nl, LockFlags::EXPEDITE), vec![granted(4, 1, Op::Lock, Nl, 2)]);
    assert_eq!(
        h.try_lock(4, 2, "a", Pr, LockFlags::EXPEDITE),
        Err(RequestError::InvalidFlags("EXPEDITE is for NL requests"))
    );
}

#[test]
fn noorder_grants_a_compatible_request_regardless_of_the_queue() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    h.lock(2, 1, "a", Ex, NONE);
    assert_eq!(h.lock(3, 1, "a", Pr, LockFlags::NOORDER), vec![granted(3, 1, Op::Lock, Pr, 2), bast(3, 1, Ex)]);
}

#[test]
fn headque_puts_a_request_at_the_head_of_the_queue() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "a", Ex, NONE);
    assert_eq!(h.lock(3, 1, "a", Pr, LockFlags::HEADQUE), vec![]);
    assert_eq!(h.unlock(1, 1), vec![unlocked(1, 1), granted(3, 1, Op::Lock, Pr, 2), bast(3, 1, Ex)]);
}

#[test]
fn altpr_and_altcw_grant_the_alternate_mode_and_say_so() {
    let mut h = harness();
    h.lock(1, 1, "a", Pr, NONE);
    assert_eq!(
        h.lock(2, 1, "a", Ex, LockFlags::ALTPR),
        vec![with(granted(2, 1, Op::Lock, Pr, 2), |c| c.flags = StatusFlags::ALTMODE)]
    );
    h.lock(1, 2, "b", Cw, NONE);
    assert_eq!(
        h.lock(2, 2, "b", Pw, LockFlags::ALTCW),
        vec![with(granted(2, 2, Op::Lock, Cw, 4), |c| c.flags = StatusFlags::ALTMODE)]
    );
    assert_eq!(
        h.try_lock(2, 3, "c", Ex, LockFlags::ALTPR | LockFlags::ALTCW),
        Err(RequestError::InvalidFlags("ALTPR and ALTCW exclude each other"))
    );
}
