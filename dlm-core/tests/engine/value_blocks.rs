//! Value blocks: read on grant, written going down from EX, invalidated, and
//! their errors.

use super::*;

#[test]
fn value_blocks_are_read_on_grant_and_written_going_down_from_ex() {
    let mut h = harness();
    assert_eq!(
        h.lock(1, 1, "a", Ex, LockFlags::VALBLK),
        vec![with(granted(1, 1, Op::Lock, Ex, 1), |c| c.lvb = Some(lvb32(b"")))]
    );
    assert_eq!(h.try_convert(1, 1, Nl, LockFlags::VALBLK, Some(b"v1")), Ok(vec![granted(1, 1, Op::Convert, Nl, 2)]));
    assert_eq!(
        h.lock(2, 1, "a", Pr, LockFlags::VALBLK),
        vec![with(granted(2, 1, Op::Lock, Pr, 3), |c| c.lvb = Some(lvb32(b"v1")))]
    );
    // A reader does not write: the value stays.
    h.unlock(2, 1);
    h.lock(2, 2, "a", Pw, NONE);
    assert_eq!(h.try_unlock(2, 2, UnlockFlags::VALBLK, Some(b"v2")), Ok(vec![unlocked(2, 2)]));
    assert_eq!(
        h.try_convert(1, 1, Cr, LockFlags::VALBLK, None),
        Ok(vec![with(granted(1, 1, Op::Convert, Cr, 5), |c| c.lvb = Some(lvb32(b"v2")))])
    );
}

#[test]
fn ivvalblk_invalidates_and_the_next_reader_sees_valnotvalid_until_a_write() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "a", Nl, LockFlags::EXPEDITE);
    assert_eq!(h.try_unlock(1, 1, UnlockFlags::IVVALBLK, None), Ok(vec![unlocked(1, 1)]));
    assert_eq!(
        h.try_convert(2, 1, Ex, LockFlags::VALBLK, None),
        Ok(vec![with(granted(2, 1, Op::Convert, Ex, 3), |c| {
            c.lvb = Some(lvb32(b""));
            c.flags = StatusFlags::VALNOTVALID;
        })])
    );
    assert_eq!(h.try_convert(2, 1, Nl, LockFlags::VALBLK, Some(b"ok")), Ok(vec![granted(2, 1, Op::Convert, Nl, 4)]));
    assert_eq!(
        h.try_convert(2, 1, Pr, LockFlags::VALBLK, None),
        Ok(vec![with(granted(2, 1, Op::Convert, Pr, 5), |c| c.lvb = Some(lvb32(b"ok")))])
    );
    // IVVALBLK on a down-conversion.
    h.convert(2, 1, Ex, NONE);
    h.try_convert(2, 1, Nl, LockFlags::IVVALBLK, None).expect("accepted");
    let dump = h.node.dump(h.ls, Some(b"a"), 1).expect("dump");
    assert!(!dump[0].lvb_valid);
}

#[test]
fn an_ex_holder_whose_session_ends_leaves_the_value_block_invalid() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    h.lock(2, 1, "a", Nl, LockFlags::EXPEDITE);
    h.end(1);
    let effects = h.try_convert(2, 1, Pr, LockFlags::VALBLK, None).expect("accepted");
    let Effect::Complete(completion) = &effects[0] else { panic!("{effects:?}") };
    assert_eq!(completion.flags, StatusFlags::VALNOTVALID);
}

#[test]
fn value_block_errors_are_typed() {
    let mut h = harness();
    h.lock(1, 1, "a", Ex, NONE);
    assert_eq!(
        h.try_convert(1, 1, Nl, LockFlags::VALBLK, Some(&[0; 33])),
        Err(RequestError::LvbTooLong { len: 33, max: 32 })
    );
    assert_eq!(
        h.try_convert(1, 1, Nl, NONE, Some(b"x")),
        Err(RequestError::InvalidFlags("a value block needs VALBLK"))
    );
    assert_eq!(
        h.try_convert(1, 1, Nl, LockFlags::VALBLK, None),
        Err(RequestError::InvalidFlags("VALBLK converting down from PW/EX needs the value block to write"))
    );
    assert_eq!(
        h.try_unlock(1, 1, UnlockFlags::VALBLK, Some(&[0; 40])),
        Err(RequestError::LvbTooLong { len: 40, max: 32 })
    );
}
