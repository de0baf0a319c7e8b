//! One event in, the exact effects out: every flag and status of the engine.
//!
//! Sessions are numbered 1.., each test's lock handles are small numbers, and
//! fencing tokens are the lockspace-wide grant count, so every expected
//! effect is written out in full.

use std::time::Duration;

use dlm_core::*;

struct Harness {
    node: Node,
    ls: LockspaceId,
    now: Instant,
}

fn harness_with(config: NodeConfig) -> Harness {
    let mut node = Node::new(config).expect("valid config");
    let ls = node.create_lockspace(b"test", LockspaceConfig::default()).expect("lockspace");
    for s in 1..=4 {
        node.open_session(SessionId(s)).expect("session");
    }
    Harness { node, ls, now: Instant::ZERO }
}

fn harness() -> Harness {
    harness_with(NodeConfig::default())
}

impl Harness {
    fn effects(&mut self) -> Vec<Effect> {
        std::iter::from_fn(|| self.node.poll_effect()).collect()
    }

    fn request(&mut self, s: u64, request: ClientRequest) -> Result<Vec<Effect>, RequestError> {
        let result = self.node.handle_client(self.now, SessionId(s), request);
        self.node.check_invariants().expect("invariants");
        let effects = self.effects();
        if result.is_err() {
            assert_eq!(effects, vec![], "a rejected request has no effect");
        }
        result.map(|()| effects)
    }

    fn lock_req(&self, h: u64, name: &str, mode: Mode, flags: LockFlags, timeout: Option<Duration>) -> ClientRequest {
        ClientRequest::Lock(LockRequest {
            handle: LockHandle(h),
            lockspace: self.ls,
            name: name.as_bytes().to_vec(),
            mode,
            flags,
            timeout,
        })
    }

    fn try_lock(
        &mut self,
        s: u64,
        h: u64,
        name: &str,
        mode: Mode,
        flags: LockFlags,
    ) -> Result<Vec<Effect>, RequestError> {
        let request = self.lock_req(h, name, mode, flags, None);
        self.request(s, request)
    }

    fn lock(&mut self, s: u64, h: u64, name: &str, mode: Mode, flags: LockFlags) -> Vec<Effect> {
        self.try_lock(s, h, name, mode, flags).expect("lock accepted")
    }

    fn try_convert(
        &mut self,
        s: u64,
        h: u64,
        mode: Mode,
        flags: LockFlags,
        lvb: Option<&[u8]>,
    ) -> Result<Vec<Effect>, RequestError> {
        let request = ClientRequest::Convert(ConvertRequest {
            handle: LockHandle(h),
            mode,
            flags,
            lvb: lvb.map(<[u8]>::to_vec),
            timeout: None,
        });
        self.request(s, request)
    }

    fn convert(&mut self, s: u64, h: u64, mode: Mode, flags: LockFlags) -> Vec<Effect> {
        self.try_convert(s, h, mode, flags, None).expect("convert accepted")
    }

    fn try_unlock(
        &mut self,
        s: u64,
        h: u64,
        flags: UnlockFlags,
        lvb: Option<&[u8]>,
    ) -> Result<Vec<Effect>, RequestError> {
        let request =
            ClientRequest::Unlock(UnlockRequest { handle: LockHandle(h), flags, lvb: lvb.map(<[u8]>::to_vec) });
        self.request(s, request)
    }

    fn unlock(&mut self, s: u64, h: u64) -> Vec<Effect> {
        self.try_unlock(s, h, UnlockFlags::EMPTY, None).expect("unlock accepted")
    }

    fn cancel(&mut self, s: u64, h: u64) -> Result<Vec<Effect>, RequestError> {
        self.request(s, ClientRequest::Cancel { handle: LockHandle(h) })
    }

    fn end(&mut self, s: u64) -> Vec<Effect> {
        self.node.end_session(self.now, SessionId(s)).expect("session open");
        self.node.check_invariants().expect("invariants");
        self.effects()
    }

    fn advance(&mut self, to: Duration) -> Vec<Effect> {
        self.now = Instant::ZERO.saturating_add(to);
        self.node.handle_timeout(self.now);
        self.node.check_invariants().expect("invariants");
        self.effects()
    }
}

fn done(s: u64, h: u64, op: Op, status: Status, mode: Option<Mode>) -> Effect {
    Effect::Complete(Completion {
        session: SessionId(s),
        handle: LockHandle(h),
        op,
        status,
        mode,
        token: None,
        lvb: None,
        flags: StatusFlags::EMPTY,
    })
}

fn granted(s: u64, h: u64, op: Op, mode: Mode, token: u64) -> Effect {
    with(done(s, h, op, Status::Granted, Some(mode)), |c| c.token = Some(FencingToken(token)))
}

fn unlocked(s: u64, h: u64) -> Effect {
    done(s, h, Op::Unlock, Status::Unlocked, None)
}

fn bast(s: u64, h: u64, mode: Mode) -> Effect {
    Effect::Blocking { session: SessionId(s), handle: LockHandle(h), mode }
}

fn with(effect: Effect, change: impl FnOnce(&mut Completion)) -> Effect {
    let Effect::Complete(mut completion) = effect else { panic!("not a completion") };
    change(&mut completion);
    Effect::Complete(completion)
}

fn lvb32(prefix: &[u8]) -> Vec<u8> {
    let mut lvb = vec![0; LVB_LEN_DEFAULT];
    lvb[..prefix.len()].copy_from_slice(prefix);
    lvb
}

const NONE: LockFlags = LockFlags::EMPTY;
use Mode::*;

// ----- grants, queues, blocking callbacks -----

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

// ----- value blocks -----

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

// ----- persistent locks and orphans -----

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

// ----- cancel, force-unlock, timeouts -----

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

// ----- fencing tokens -----

#[test]
fn fencing_tokens_increase_across_grants_conversions_and_resource_lifetimes() {
    let mut h = harness();
    let mut tokens = Vec::new();
    for round in 0..3 {
        for effect in h.lock(1, 1, "a", Pr, NONE).into_iter().chain(h.convert(1, 1, Ex, NONE)) {
            let Effect::Complete(Completion { token: Some(token), .. }) = effect else { panic!("{effect:?}") };
            tokens.push(token.0);
        }
        h.unlock(1, 1);
        assert!(h.node.dump(h.ls, None, 10).expect("dump").is_empty(), "round {round}: resource freed");
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

// ----- bad input and limits -----

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
