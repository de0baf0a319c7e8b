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
//! `PROPTEST_CASES=n` runs more cases by hand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use dlm_core::{
    ClientRequest, Completion, ConvertRequest, Effect, FencingToken, Instant, LVB_LEN_DEFAULT, LockFlags, LockHandle,
    LockRequest, LockspaceConfig, LockspaceId, Mode, Node, NodeConfig, Op, RequestError, ResourceInfo, SessionId,
    Status, StatusFlags, UnlockFlags, UnlockRequest,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// The default lockspace's value block length.
const LVB_LEN: usize = LVB_LEN_DEFAULT;
/// The resources the tests use.
const NAMES: [&[u8]; 4] = [b"r0", b"r1", b"r2", b"r3"];
/// Time advances in whole milliseconds; timeouts add a distinct number of
/// nanoseconds so that no two deadlines are ever equal.
const MS: u64 = 1_000_000;

// ---------------------------------------------------------------------------
// Mode tables, written out from the specification (not taken from the engine).
// ---------------------------------------------------------------------------

fn compat(a: Mode, b: Mode) -> bool {
    use Mode::*;
    match a {
        Nl => true,
        Cr => b != Ex,
        Cw => matches!(b, Nl | Cr | Cw),
        Pr => matches!(b, Nl | Cr | Pr),
        Pw => matches!(b, Nl | Cr),
        Ex => b == Nl,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LvbAct {
    Read,
    Write,
    Nothing,
}

fn lvb_action(from: Option<Mode>, to: Mode) -> LvbAct {
    match from {
        None => LvbAct::Read,
        Some(Mode::Pw) if to == Mode::Ex => LvbAct::Read,
        Some(Mode::Pw) | Some(Mode::Ex) => LvbAct::Write,
        Some(from) if to >= from => LvbAct::Read,
        Some(_) => LvbAct::Nothing,
    }
}

fn padded(lvb: &[u8]) -> Vec<u8> {
    let mut v = lvb.to_vec();
    v.resize(LVB_LEN, 0);
    v
}

// ---------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------

/// A pending request of a lock.
#[derive(Clone, Debug)]
struct MReq {
    op: Op,
    mode: Mode,
    flags: LockFlags,
    lvb: Option<Vec<u8>>,
    deadline: Option<u64>,
    /// Demoted to NL by CONVDEADLK: reported in the completion.
    demoted: bool,
}

#[derive(Clone, Debug)]
struct MLock {
    session: SessionId,
    handle: LockHandle,
    res: Vec<u8>,
    orphan: bool,
    persistent: bool,
    granted: Option<Mode>,
    token: Option<u64>,
    req: Option<MReq>,
    /// The strongest mode this holder was told about since its last grant.
    told: Option<Mode>,
}

#[derive(Clone, Debug)]
struct MRes {
    granted: Vec<u64>,
    converting: Vec<u64>,
    waiting: Vec<u64>,
    lvb: Option<Vec<u8>>,
    lvb_valid: bool,
    last_token: u64,
}

#[derive(Default)]
struct Model {
    now: u64,
    /// Lockspace-wide grant counter (the last token handed out).
    counter: u64,
    next_id: u64,
    locks: BTreeMap<u64, MLock>,
    res: BTreeMap<Vec<u8>, MRes>,
    sessions: BTreeMap<SessionId, BTreeMap<LockHandle, u64>>,
    out: Vec<Effect>,
    /// The order of this step's effects is not fully specified (see `noqueue_basts`).
    unordered: bool,
}

impl Model {
    fn l(&self, id: u64) -> &MLock {
        &self.locks[&id]
    }

    fn lm(&mut self, id: u64) -> &mut MLock {
        self.locks.get_mut(&id).expect("model lock")
    }

    fn rm(&mut self, name: &[u8]) -> &mut MRes {
        self.res.get_mut(name).expect("model resource")
    }

    fn lookup(&self, session: SessionId, handle: LockHandle) -> Option<u64> {
        self.sessions.get(&session)?.get(&handle).copied()
    }

    fn complete(&mut self, id: u64, op: Op, status: Status, mode: Option<Mode>, flags: StatusFlags) {
        let l = self.l(id);
        self.out.push(Effect::Complete(Completion {
            session: l.session,
            handle: l.handle,
            op,
            status,
            mode,
            token: None,
            lvb: None,
            flags,
        }));
    }

    /// Whether `id`'s pending request can be granted `mode`.
    fn grantable(&self, id: u64, mode: Mode, now: bool) -> bool {
        let l = self.l(id);
        let req = l.req.as_ref().expect("pending");
        let r = &self.res[&l.res];
        let conv = req.op == Op::Convert;
        if !conv && req.flags.contains(LockFlags::EXPEDITE) {
            return true;
        }
        let others_ok = r
            .granted
            .iter()
            .chain(&r.converting)
            .filter(|&&o| o != id)
            .all(|&o| compat(self.l(o).granted.expect("holder"), mode));
        if !others_ok {
            return false;
        }
        if conv && now {
            return !req.flags.contains(LockFlags::QUECVT) || r.converting.is_empty();
        }
        if req.flags.contains(LockFlags::NOORDER) {
            return true;
        }
        if conv {
            return r.converting.first() == Some(&id);
        }
        if now {
            return r.converting.is_empty() && r.waiting.is_empty();
        }
        r.converting.is_empty() && r.waiting.first() == Some(&id)
    }

    /// The mode `id` can be granted (and whether it is the alternate one).
    fn grant_mode(&self, id: u64, now: bool) -> Option<(Mode, bool)> {
        let req = self.l(id).req.as_ref().expect("pending");
        let (m, f) = (req.mode, req.flags);
        if self.grantable(id, m, now) {
            return Some((m, false));
        }
        if f.contains(LockFlags::ALTPR) && m != Mode::Pr && self.grantable(id, Mode::Pr, now) {
            return Some((Mode::Pr, true));
        }
        if f.contains(LockFlags::ALTCW) && m != Mode::Cw && self.grantable(id, Mode::Cw, now) {
            return Some((Mode::Cw, true));
        }
        None
    }

    fn unqueue(&mut self, id: u64) {
        let name = self.l(id).res.clone();
        let r = self.rm(&name);
        r.granted.retain(|&x| x != id);
        r.converting.retain(|&x| x != id);
        r.waiting.retain(|&x| x != id);
    }

    /// Back on the granted queue, at its tail (a conversion that waited and
    /// ended without a grant). The spec does not name the order of the
    /// granted queue; the model's (a grant or a failed queued conversion goes
    /// to the tail, a conversion granted or failed at once keeps its place)
    /// matches the engine's dump, and decides the order of blocking callbacks.
    fn requeue_granted(&mut self, id: u64) {
        let name = self.l(id).res.clone();
        let r = self.rm(&name);
        r.converting.retain(|&x| x != id);
        if !r.granted.contains(&id) {
            r.granted.push(id);
        }
    }

    fn grant(&mut self, id: u64, mode: Mode, alt: bool) {
        self.counter += 1;
        let token = self.counter;
        let name = self.l(id).res.clone();
        {
            let r = self.rm(&name);
            r.converting.retain(|&x| x != id);
            r.waiting.retain(|&x| x != id);
            if !r.granted.contains(&id) {
                r.granted.push(id);
            }
            r.last_token = token;
        }
        let l = self.lm(id);
        let req = l.req.take().expect("pending");
        let from = l.granted;
        l.granted = Some(mode);
        l.token = Some(token);
        l.told = None;
        let (session, handle) = (l.session, l.handle);
        let mut flags = StatusFlags::EMPTY;
        if alt {
            flags.insert(StatusFlags::ALTMODE);
        }
        if req.demoted {
            flags.insert(StatusFlags::DEMOTED);
        }
        let mut lvb = None;
        if req.flags.contains(LockFlags::VALBLK) {
            let r = self.rm(&name);
            match lvb_action(from, mode) {
                LvbAct::Read => {
                    lvb = Some(r.lvb.clone().unwrap_or_else(|| vec![0; LVB_LEN]));
                    if !r.lvb_valid {
                        flags.insert(StatusFlags::VALNOTVALID);
                    }
                }
                LvbAct::Write => {
                    if req.flags.contains(LockFlags::IVVALBLK) {
                        r.lvb_valid = false;
                    } else if let Some(v) = &req.lvb {
                        r.lvb = Some(padded(v));
                        r.lvb_valid = true;
                    }
                }
                LvbAct::Nothing => {}
            }
        }
        self.out.push(Effect::Complete(Completion {
            session,
            handle,
            op: req.op,
            status: Status::Granted,
            mode: Some(mode),
            token: Some(FencingToken(token)),
            lvb,
            flags,
        }));
    }

    /// Ends `id`'s pending request without a grant.
    fn fail(&mut self, id: u64, status: Status) {
        let req = self.lm(id).req.take().expect("pending");
        let flags = if req.demoted { StatusFlags::DEMOTED } else { StatusFlags::EMPTY };
        match req.op {
            Op::Lock => {
                self.unqueue(id);
                self.complete(id, Op::Lock, status, None, flags);
                self.forget(id);
            }
            _ => {
                self.requeue_granted(id);
                let granted = self.l(id).granted;
                self.complete(id, Op::Convert, status, granted, flags);
            }
        }
    }

    /// Removes a lock that is on no queue any more.
    fn forget(&mut self, id: u64) {
        let l = self.locks.remove(&id).expect("model lock");
        if !l.orphan
            && let Some(s) = self.sessions.get_mut(&l.session)
        {
            s.remove(&l.handle);
        }
    }

    fn conv_deadlock(&self, id: u64) -> bool {
        let l = self.l(id);
        let lg = l.granted.expect("converting lock holds a mode");
        let lr = l.req.as_ref().expect("pending").mode;
        let r = &self.res[&l.res];
        let pos = r.converting.iter().position(|&x| x == id);
        for (i, &c) in r.converting.iter().enumerate() {
            if c == id {
                continue;
            }
            let cl = self.l(c);
            let c_req = cl.req.as_ref().expect("pending").mode;
            let c_gr = cl.granted.expect("holder");
            let ahead = pos.is_none_or(|p| i < p);
            if ahead {
                if !compat(c_req, lg) {
                    return true;
                }
            } else if !compat(c_req, lg) && !compat(lr, c_gr) {
                return true;
            }
        }
        false
    }

    /// The grant pass; returns whether anything was granted.
    fn grant_pass(&mut self, name: &[u8]) -> bool {
        if !self.res.contains_key(name) {
            return false;
        }
        let mut any = false;
        loop {
            let mut changed = false;
            for id in self.res[name].converting.clone() {
                if !self.res[name].converting.contains(&id) {
                    continue;
                }
                if let Some((m, alt)) = self.grant_mode(id, false) {
                    self.grant(id, m, alt);
                    changed = true;
                    any = true;
                } else if self.conv_deadlock(id) {
                    let l = self.l(id);
                    let convdeadlk = l.req.as_ref().expect("pending").flags.contains(LockFlags::CONVDEADLK);
                    if convdeadlk && l.granted != Some(Mode::Nl) {
                        let l = self.lm(id);
                        l.granted = Some(Mode::Nl);
                        l.req.as_mut().expect("pending").demoted = true;
                    } else {
                        self.fail(id, Status::Deadlock);
                    }
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        for id in self.res[name].waiting.clone() {
            if let Some((m, alt)) = self.grant_mode(id, false) {
                self.grant(id, m, alt);
                any = true;
            }
        }
        any
    }

    /// Blocking callbacks to the holders in the way of queued requests.
    fn basts(&mut self, name: &[u8]) {
        let Some(r) = self.res.get(name) else { return };
        let queued: Vec<(u64, Mode)> = r
            .converting
            .iter()
            .chain(&r.waiting)
            .map(|&q| (q, self.l(q).req.as_ref().expect("pending").mode))
            .collect();
        if queued.is_empty() {
            return;
        }
        let holders: Vec<u64> = r.granted.iter().chain(&r.converting).copied().collect();
        for h in holders {
            let l = self.l(h);
            if l.orphan {
                continue;
            }
            let g = l.granted.expect("holder");
            let m = queued.iter().filter(|&&(q, m)| q != h && !compat(g, m)).map(|&(_, m)| m).max();
            if let Some(m) = m
                && l.told.is_none_or(|t| t < m)
            {
                let l = self.lm(h);
                l.told = Some(m);
                let (session, handle) = (l.session, l.handle);
                self.out.push(Effect::Blocking { session, handle, mode: m });
            }
        }
    }

    /// NOQUEUEBAST: tell the holders in the way of a failed try. The spec
    /// says the failed try completes WouldBlock and "also" sends these, not in
    /// which order (the engine sends the callbacks first, the Linux DLM queues
    /// the completion first): such a step is compared as a multiset.
    fn noqueue_basts(&mut self, name: &[u8], except: u64, mode: Mode) {
        let r = &self.res[name];
        let holders: Vec<u64> = r.granted.iter().chain(&r.converting).copied().collect();
        for h in holders {
            let l = self.l(h);
            if h == except || l.orphan || compat(l.granted.expect("holder"), mode) || l.told.is_some_and(|t| t >= mode)
            {
                continue;
            }
            let l = self.lm(h);
            l.told = Some(mode);
            let (session, handle) = (l.session, l.handle);
            self.out.push(Effect::Blocking { session, handle, mode });
            self.unordered = true;
        }
    }

    fn cleanup(&mut self, name: &[u8]) {
        if let Some(r) = self.res.get(name)
            && r.granted.is_empty()
            && r.converting.is_empty()
            && r.waiting.is_empty()
        {
            self.res.remove(name);
        }
    }

    fn finish(&mut self, name: &[u8], mut granted_any: bool, queued: bool) {
        granted_any |= self.grant_pass(name);
        if granted_any || queued {
            self.basts(name);
        }
        self.cleanup(name);
    }

    // ----- requests -----

    fn open_session(&mut self, s: SessionId) {
        self.sessions.insert(s, BTreeMap::new());
    }

    fn lock_request(&mut self, s: SessionId, req: &LockRequest) -> Result<(), RequestError> {
        let session = self.sessions.get(&s).ok_or(RequestError::UnknownSession)?;
        if session.contains_key(&req.handle) {
            return Err(RequestError::HandleInUse);
        }
        let name = req.name.clone();
        if req.flags.contains(LockFlags::ADOPT) {
            return self.adopt(s, req);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.res.entry(name.clone()).or_insert_with(|| MRes {
            granted: vec![],
            converting: vec![],
            waiting: vec![],
            lvb: None,
            lvb_valid: true,
            last_token: 0,
        });
        self.locks.insert(
            id,
            MLock {
                session: s,
                handle: req.handle,
                res: name.clone(),
                orphan: false,
                persistent: req.flags.contains(LockFlags::PERSISTENT),
                granted: None,
                token: None,
                req: Some(MReq {
                    op: Op::Lock,
                    mode: req.mode,
                    flags: req.flags,
                    lvb: None,
                    deadline: req.timeout.map(|t| self.now + t.as_nanos() as u64),
                    demoted: false,
                }),
                told: None,
            },
        );
        self.sessions.get_mut(&s).expect("session").insert(req.handle, id);
        let (mut granted, mut queued) = (false, false);
        if let Some((m, alt)) = self.grant_mode(id, true) {
            self.grant(id, m, alt);
            granted = true;
        } else if req.flags.contains(LockFlags::NOQUEUE) {
            self.lm(id).req = None;
            self.complete(id, Op::Lock, Status::WouldBlock, None, StatusFlags::EMPTY);
            self.forget(id);
            if req.flags.contains(LockFlags::NOQUEUEBAST) {
                self.noqueue_basts(&name, id, req.mode);
            }
        } else {
            let r = self.rm(&name);
            if req.flags.contains(LockFlags::HEADQUE) {
                r.waiting.insert(0, id);
            } else {
                r.waiting.push(id);
            }
            queued = true;
        }
        self.finish(&name, granted, queued);
        Ok(())
    }

    fn adopt(&mut self, s: SessionId, req: &LockRequest) -> Result<(), RequestError> {
        let found = self
            .res
            .get(&req.name)
            .and_then(|r| r.granted.iter().copied().find(|&o| self.l(o).orphan && self.l(o).granted == Some(req.mode)));
        let Some(id) = found else {
            self.out.push(Effect::Complete(Completion {
                session: s,
                handle: req.handle,
                op: Op::Lock,
                status: Status::NotFound,
                mode: None,
                token: None,
                lvb: None,
                flags: StatusFlags::EMPTY,
            }));
            return Ok(());
        };
        {
            let l = self.lm(id);
            l.session = s;
            l.handle = req.handle;
            l.orphan = false;
            l.persistent = req.flags.contains(LockFlags::PERSISTENT);
            l.req = Some(MReq {
                op: Op::Lock,
                mode: req.mode,
                flags: req.flags,
                lvb: None,
                deadline: None,
                demoted: false,
            });
        }
        self.sessions.get_mut(&s).expect("session").insert(req.handle, id);
        // A grant of a new lock: new token, the value block is read.
        let l = self.lm(id);
        l.granted = None;
        self.grant(id, req.mode, false);
        self.finish(&req.name, true, false);
        Ok(())
    }

    fn convert(&mut self, s: SessionId, req: &ConvertRequest) -> Result<(), RequestError> {
        let id = self.lookup(s, req.handle).ok_or(RequestError::UnknownHandle)?;
        if self.l(id).req.is_some() {
            return Err(RequestError::Pending);
        }
        let g = self.l(id).granted.expect("idle lock is granted");
        if req.flags.contains(LockFlags::QUECVT) && !g.quecvt_allowed(req.mode) {
            return Err(RequestError::QuecvtNotAllowed { from: g, to: req.mode });
        }
        let name = self.l(id).res.clone();
        let deadline = req.timeout.map(|t| self.now + t.as_nanos() as u64);
        self.lm(id).req = Some(MReq {
            op: Op::Convert,
            mode: req.mode,
            flags: req.flags,
            lvb: req.lvb.clone(),
            deadline,
            demoted: false,
        });
        let (mut granted, mut queued) = (false, false);
        if let Some((m, alt)) = self.grant_mode(id, true) {
            self.grant(id, m, alt);
            granted = true;
        } else {
            let mut done = false;
            if self.conv_deadlock(id) {
                if req.flags.contains(LockFlags::CONVDEADLK) {
                    let l = self.lm(id);
                    l.granted = Some(Mode::Nl);
                    l.req.as_mut().expect("pending").demoted = true;
                    granted |= self.grant_pass(&name);
                    if let Some((m, alt)) = self.grant_mode(id, true) {
                        self.grant(id, m, alt);
                        granted = true;
                        done = true;
                    }
                } else {
                    self.fail(id, Status::Deadlock);
                    done = true;
                }
            }
            if !done {
                if req.flags.contains(LockFlags::NOQUEUE) {
                    self.fail(id, Status::WouldBlock);
                    if req.flags.contains(LockFlags::NOQUEUEBAST) {
                        self.noqueue_basts(&name, id, req.mode);
                    }
                } else {
                    let r = self.rm(&name);
                    r.granted.retain(|&x| x != id);
                    if req.flags.contains(LockFlags::HEADQUE) {
                        r.converting.insert(0, id);
                    } else {
                        r.converting.push(id);
                    }
                    queued = true;
                }
            }
        }
        self.finish(&name, granted, queued);
        Ok(())
    }

    fn unlock(&mut self, s: SessionId, req: &UnlockRequest) -> Result<(), RequestError> {
        let id = self.lookup(s, req.handle).ok_or(RequestError::UnknownHandle)?;
        let force = req.flags.contains(UnlockFlags::FORCE);
        if self.l(id).req.is_some() && !force {
            return Err(RequestError::Pending);
        }
        let name = self.l(id).res.clone();
        let handle = self.l(id).handle;
        if self.l(id).req.is_some() {
            self.fail(id, Status::Cancelled);
        }
        if self.locks.contains_key(&id) {
            let g = self.l(id).granted.expect("granted");
            if matches!(g, Mode::Pw | Mode::Ex) {
                let r = self.rm(&name);
                if req.flags.contains(UnlockFlags::IVVALBLK) {
                    r.lvb_valid = false;
                } else if req.flags.contains(UnlockFlags::VALBLK)
                    && let Some(v) = &req.lvb
                {
                    r.lvb = Some(padded(v));
                    r.lvb_valid = true;
                }
            }
            self.unqueue(id);
            self.forget(id);
        }
        self.out.push(Effect::Complete(Completion {
            session: s,
            handle,
            op: Op::Unlock,
            status: Status::Unlocked,
            mode: None,
            token: None,
            lvb: None,
            flags: StatusFlags::EMPTY,
        }));
        self.finish(&name, false, false);
        Ok(())
    }

    fn cancel(&mut self, s: SessionId, handle: LockHandle) -> Result<(), RequestError> {
        let id = self.lookup(s, handle).ok_or(RequestError::UnknownHandle)?;
        if self.l(id).req.is_none() {
            return Err(RequestError::NotPending);
        }
        let name = self.l(id).res.clone();
        self.fail(id, Status::Cancelled);
        self.finish(&name, false, false);
        Ok(())
    }

    fn handle_client(&mut self, s: SessionId, req: &ClientRequest) -> Result<(), RequestError> {
        match req {
            ClientRequest::Lock(r) => self.lock_request(s, r),
            ClientRequest::Convert(r) => self.convert(s, r),
            ClientRequest::Unlock(r) => self.unlock(s, r),
            ClientRequest::Cancel { handle } => self.cancel(s, *handle),
        }
    }

    /// Time passes to `now`: due requests time out, earliest deadline first,
    /// each followed by the grant pass on its resource (like a cancel).
    fn expire(&mut self, now: u64) {
        self.now = now;
        loop {
            let due = self
                .locks
                .iter()
                .filter_map(|(&id, l)| l.req.as_ref()?.deadline.map(|d| (d, id)))
                .filter(|&(d, _)| d <= now)
                .min();
            let Some((_, id)) = due else { break };
            let name = self.l(id).res.clone();
            self.fail(id, Status::TimedOut);
            self.finish(&name, false, false);
        }
    }

    fn end_session(&mut self, s: SessionId) {
        let handles = self.sessions.remove(&s).expect("open session");
        let mut touched: Vec<Vec<u8>> = Vec::new();
        for (_, id) in handles {
            let name = self.l(id).res.clone();
            if !touched.contains(&name) {
                touched.push(name.clone());
            }
            if let Some(req) = self.lm(id).req.take() {
                if req.op == Op::Lock {
                    self.unqueue(id);
                    self.locks.remove(&id);
                    continue;
                }
                // The dropped conversion's DEMOTED goes with it.
                self.requeue_granted(id);
            }
            if self.l(id).persistent {
                self.lm(id).orphan = true;
            } else {
                if matches!(self.l(id).granted, Some(Mode::Pw | Mode::Ex)) {
                    self.rm(&name).lvb_valid = false;
                }
                self.unqueue(id);
                self.locks.remove(&id);
            }
        }
        for name in touched {
            self.finish(&name, false, false);
        }
    }

    /// Takes the tokens the engine gave the grants of a step whose grants
    /// may come in any order.
    fn take_tokens(&mut self, effects: &[Effect]) {
        // Every grant of the step is newer than every earlier one.
        let mut last: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for e in effects {
            if let Effect::Complete(c) = e
                && let Some(token) = c.token
            {
                let id = self.lookup(c.session, c.handle).expect("granted lock");
                self.lm(id).token = Some(token.0);
                let name = self.l(id).res.clone();
                let t = last.entry(name).or_insert(0);
                *t = (*t).max(token.0);
            }
        }
        for (name, token) in last {
            self.rm(&name).last_token = token;
        }
    }

    /// The model's state in the shape of the engine's dump.
    fn view(&self) -> Vec<RView> {
        let lv = |&id: &u64| {
            let l = self.l(id);
            LView {
                session: l.session,
                handle: l.handle,
                orphan: l.orphan,
                granted: l.granted,
                requested: l.req.as_ref().map(|r| r.mode),
                token: l.token,
            }
        };
        self.res
            .iter()
            .map(|(name, r)| RView {
                name: name.clone(),
                lvb: r.lvb.clone(),
                lvb_valid: r.lvb_valid,
                last_token: r.last_token,
                granted: r.granted.iter().map(lv).collect(),
                converting: r.converting.iter().map(lv).collect(),
                waiting: r.waiting.iter().map(lv).collect(),
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct LView {
    session: SessionId,
    handle: LockHandle,
    orphan: bool,
    granted: Option<Mode>,
    requested: Option<Mode>,
    token: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RView {
    name: Vec<u8>,
    lvb: Option<Vec<u8>>,
    lvb_valid: bool,
    last_token: u64,
    granted: Vec<LView>,
    converting: Vec<LView>,
    waiting: Vec<LView>,
}

/// After every event the queues are settled: no queued request could be
/// granted by the grant pass (the head of the converting queue, the head of
/// the waiting queue when no conversion waits, and NOORDER requests, each in
/// its mode or alternate mode, conflict with a holder). Checked on the dump,
/// independently of the model.
fn check_settled(dump: &[ResourceInfo]) {
    for r in dump {
        let holders: Vec<&dlm_core::LockInfo> = r.granted.iter().chain(&r.converting).collect();
        let stuck = |w: &dlm_core::LockInfo| {
            let mut modes = vec![w.requested.expect("queued lock has a request")];
            if w.flags.contains(LockFlags::ALTPR) {
                modes.push(Mode::Pr);
            }
            if w.flags.contains(LockFlags::ALTCW) {
                modes.push(Mode::Cw);
            }
            let itself = |h: &dlm_core::LockInfo| h.session == w.session && h.handle == w.handle && !h.orphan;
            modes.iter().all(|&m| holders.iter().any(|h| !itself(h) && !compat(h.granted.expect("holder"), m)))
        };
        for (i, c) in r.converting.iter().enumerate() {
            if i == 0 || c.flags.contains(LockFlags::NOORDER) {
                assert!(stuck(c), "conversion left waiting on {:?}: {c:?} in {r:#?}", r.name);
            }
        }
        for (i, w) in r.waiting.iter().enumerate() {
            if (i == 0 && r.converting.is_empty()) || w.flags.contains(LockFlags::NOORDER) {
                assert!(stuck(w), "request left waiting on {:?}: {w:?} in {r:#?}", r.name);
            }
        }
    }
}

fn engine_view(dump: &[ResourceInfo]) -> Vec<RView> {
    let lv = |q: &[dlm_core::LockInfo]| {
        q.iter()
            .map(|l| LView {
                session: l.session,
                handle: l.handle,
                orphan: l.orphan,
                granted: l.granted,
                requested: l.requested,
                token: l.token.map(|t| t.0),
            })
            .collect()
    };
    dump.iter()
        .map(|r| RView {
            name: r.name.clone(),
            lvb: r.lvb.clone(),
            lvb_valid: r.lvb_valid,
            last_token: r.last_token.0,
            granted: lv(&r.granted),
            converting: lv(&r.converting),
            waiting: lv(&r.waiting),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The checker: sees only requests, their results and the effects.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct CLock {
    res: Vec<u8>,
    mode: Option<Mode>,
    persistent: bool,
    /// A CONVDEADLK conversion is pending: the engine may have demoted the
    /// lock to NL already, which the client learns only from the completion
    /// (DEMOTED).
    may_be_demoted: bool,
    /// A conflict was let pass because the lock may have been demoted: its
    /// completion must say DEMOTED.
    must_be_demoted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expect {
    op: Op,
    adopt: bool,
}

#[derive(Default)]
struct Checker {
    /// Locks clients know exist (pending or granted).
    locks: HashMap<(SessionId, LockHandle), CLock>,
    /// Orphans: resource, mode, and whether it may be NL instead (its
    /// session ended while a CONVDEADLK conversion was pending).
    orphans: Vec<(Vec<u8>, Mode, bool)>,
    /// Accepted requests still waiting for their completion.
    pending: HashMap<(SessionId, LockHandle), Vec<Expect>>,
    last_token: HashMap<Vec<u8>, u64>,
    ended: HashSet<SessionId>,
}

impl Checker {
    fn on_request(&mut self, s: SessionId, req: &ClientRequest, result: &Result<(), RequestError>) {
        if result.is_err() {
            return;
        }
        let (handle, op, adopt) = match req {
            ClientRequest::Lock(r) => {
                self.locks.insert(
                    (s, r.handle),
                    CLock {
                        res: r.name.clone(),
                        mode: None,
                        persistent: r.flags.contains(LockFlags::PERSISTENT),
                        may_be_demoted: false,
                        must_be_demoted: false,
                    },
                );
                (r.handle, Op::Lock, r.flags.contains(LockFlags::ADOPT))
            }
            ClientRequest::Convert(r) => {
                let lock = self.locks.get_mut(&(s, r.handle)).expect("converted lock known");
                lock.may_be_demoted = r.flags.contains(LockFlags::CONVDEADLK);
                (r.handle, Op::Convert, false)
            }
            ClientRequest::Unlock(r) => (r.handle, Op::Unlock, false),
            ClientRequest::Cancel { .. } => return,
        };
        let list = self.pending.entry((s, handle)).or_default();
        assert!(!list.iter().any(|e| e.op == op), "two {op:?} requests of {s} {handle} accepted at once");
        list.push(Expect { op, adopt });
    }

    fn on_effects(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Complete(c) => self.on_complete(c),
                Effect::Blocking { session, handle, mode } => {
                    assert!(!self.ended.contains(session), "blocking callback to ended {session}: {e:?}");
                    let lock = self.locks.get(&(*session, *handle)).unwrap_or_else(|| panic!("bast to no lock: {e:?}"));
                    let held = lock.mode.unwrap_or_else(|| panic!("bast to a lock not granted: {e:?}"));
                    assert!(!compat(held, *mode), "bast for {mode} to a {held} holder, which is not in its way");
                }
                Effect::Revoked { .. } => panic!("unexpected {e:?}"),
            }
        }
    }

    fn on_complete(&mut self, c: &Completion) {
        let key = (c.session, c.handle);
        assert!(!self.ended.contains(&c.session), "completion to ended session: {c:?}");
        let list = self.pending.get_mut(&key).unwrap_or_else(|| panic!("completion of nothing pending: {c:?}"));
        let i =
            list.iter().position(|e| e.op == c.op).unwrap_or_else(|| panic!("completion of nothing pending: {c:?}"));
        let expect = list.remove(i);
        if list.is_empty() {
            self.pending.remove(&key);
        }
        assert_eq!(c.token.is_some(), c.status == Status::Granted, "token iff granted: {c:?}");
        match (c.op, c.status) {
            (Op::Lock | Op::Convert, Status::Granted) => {
                let mode = c.mode.expect("granted mode");
                let lock = self.locks.get_mut(&key).expect("granted lock known");
                if lock.must_be_demoted {
                    assert!(c.flags.contains(StatusFlags::DEMOTED), "incompatible modes were held: {c:?}");
                }
                lock.may_be_demoted = false;
                lock.must_be_demoted = false;
                lock.mode = Some(mode);
                let token = c.token.expect("token").0;
                let last = self.last_token.entry(lock.res.clone()).or_insert(0);
                assert!(token > *last, "fencing token {token} after {last} on {:?}", lock.res);
                *last = token;
                if expect.adopt {
                    let res = lock.res.clone();
                    let exact = |(r, m, maybe_nl): &(Vec<u8>, Mode, bool)| *r == res && *m == mode && !maybe_nl;
                    let maybe = |(r, m, maybe_nl): &(Vec<u8>, Mode, bool)| {
                        *r == res && *maybe_nl && (*m == mode || mode == Mode::Nl)
                    };
                    let i = (self.orphans.iter().position(exact))
                        .or_else(|| self.orphans.iter().position(maybe))
                        .unwrap_or_else(|| panic!("adopted an orphan that does not exist: {c:?}"));
                    self.orphans.remove(i);
                }
            }
            (Op::Lock, status) => {
                assert!(
                    matches!(
                        status,
                        Status::Cancelled | Status::WouldBlock | Status::Deadlock | Status::TimedOut | Status::NotFound
                    ),
                    "{c:?}"
                );
                assert_eq!(c.mode, None, "{c:?}");
                let lock = self.locks.remove(&key).expect("lock known");
                assert_eq!(lock.mode, None, "a failed new request had a mode: {c:?}");
            }
            (Op::Convert, status) => {
                assert!(
                    matches!(status, Status::Cancelled | Status::WouldBlock | Status::Deadlock | Status::TimedOut),
                    "{c:?}"
                );
                let lock = self.locks.get_mut(&key).expect("lock known");
                if lock.must_be_demoted {
                    assert!(c.flags.contains(StatusFlags::DEMOTED), "incompatible modes were held: {c:?}");
                }
                lock.may_be_demoted = false;
                lock.must_be_demoted = false;
                let mode = c.mode.unwrap_or_else(|| panic!("failed conversion without a mode: {c:?}"));
                if c.flags.contains(StatusFlags::DEMOTED) {
                    assert_eq!(mode, Mode::Nl, "{c:?}");
                } else {
                    assert_eq!(Some(mode), lock.mode, "failed conversion changed the mode: {c:?}");
                }
                lock.mode = Some(mode);
            }
            (Op::Unlock, status) => {
                assert_eq!(status, Status::Unlocked, "{c:?}");
                assert_eq!(c.mode, None, "{c:?}");
                // Gone already when a forced unlock cancelled a new request.
                self.locks.remove(&key);
            }
        }
    }

    fn end_session(&mut self, s: SessionId) {
        let keys: Vec<_> = self.locks.keys().filter(|k| k.0 == s).copied().collect();
        for k in keys {
            let lock = self.locks.remove(&k).expect("lock");
            if let (Some(mode), true) = (lock.mode, lock.persistent) {
                if lock.must_be_demoted {
                    self.orphans.push((lock.res, Mode::Nl, false));
                } else {
                    self.orphans.push((lock.res, mode, lock.may_be_demoted));
                }
            }
        }
        self.pending.retain(|k, _| k.0 != s);
        self.ended.insert(s);
    }

    /// No two incompatible modes are held on a resource. A conflict with a
    /// lock that may have been demoted (see [`CLock::may_be_demoted`]) is let
    /// pass, and its completion must then report DEMOTED.
    fn check_compatible(&mut self) {
        // (resource, mode, lock: None for an orphan, whether it may be NL)
        type Held = (Vec<u8>, Mode, Option<(SessionId, LockHandle)>, bool);
        let mut held: Vec<Held> = Vec::new();
        for (&k, lock) in &self.locks {
            if let Some(m) = lock.mode {
                held.push((lock.res.clone(), m, Some(k), lock.may_be_demoted));
            }
        }
        for (res, m, maybe_nl) in &self.orphans {
            held.push((res.clone(), *m, None, *maybe_nl));
        }
        let mut excused = Vec::new();
        for (i, (ra, a, ka, maybe_a)) in held.iter().enumerate() {
            for (rb, b, kb, maybe_b) in &held[i + 1..] {
                if ra != rb || compat(*a, *b) {
                    continue;
                }
                // A conflict with an orphan that may be NL cannot be checked
                // from the effects; one with a live lock is checked at its
                // completion.
                match (maybe_a, maybe_b) {
                    (true, true) => {}
                    (true, false) => excused.extend(*ka),
                    (false, true) => excused.extend(*kb),
                    (false, false) => panic!("{a} and {b} held together on {ra:?}"),
                }
            }
        }
        for k in excused {
            self.locks.get_mut(&k).expect("lock").must_be_demoted = true;
        }
    }
}

// ---------------------------------------------------------------------------
// Steps.
// ---------------------------------------------------------------------------

const SLOTS: usize = 3;
/// Handles of new locks: 0..HANDLES.
const HANDLES: u64 = 4;

/// The lock a convert, unlock or cancel is about: below [`HANDLES`], that
/// handle (often unknown, for the errors); above, one of the session's locks
/// (`h - HANDLES` modulo their number), so that most requests find a lock.
fn target() -> impl Strategy<Value = u64> {
    prop_oneof![1 => 0..HANDLES, 4 => HANDLES..HANDLES + 8]
}

fn resolve(h: u64, existing: &[LockHandle]) -> LockHandle {
    if h < HANDLES || existing.is_empty() {
        LockHandle(h % HANDLES)
    } else {
        existing[(h - HANDLES) as usize % existing.len()]
    }
}

/// Resources, the first ones more often (more contention); with `hot`,
/// mostly the first one.
fn resource(hot: bool) -> impl Strategy<Value = usize> {
    prop::sample::select(if hot { vec![0, 0, 0, 0, 0, 0, 1, 2] } else { vec![0, 0, 0, 0, 1, 1, 2, 3] })
}

#[derive(Clone, Debug)]
enum Step {
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

fn mode() -> impl Strategy<Value = Mode> {
    prop::sample::select(Mode::ALL.to_vec())
}

fn lvb() -> impl Strategy<Value = Vec<u8>> {
    (1..=LVB_LEN, 1u8..=255).prop_map(|(n, b)| vec![b; n])
}

fn pick(bits: &[bool], flags: &[LockFlags]) -> LockFlags {
    let mut out = LockFlags::EMPTY;
    for (&on, &f) in bits.iter().zip(flags) {
        if on {
            out.insert(f);
        }
    }
    out
}

fn lock_step(hot: bool) -> impl Strategy<Value = Step> {
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

fn adopt_step() -> impl Strategy<Value = Step> {
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
fn convert_step(hot: bool) -> impl Strategy<Value = Step> {
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

fn unlock_step() -> impl Strategy<Value = Step> {
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
fn step(hot: bool) -> impl Strategy<Value = Step> {
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

fn steps() -> impl Strategy<Value = Vec<Step>> {
    any::<bool>().prop_flat_map(|hot| prop::collection::vec(step(hot), 1..80))
}

// ---------------------------------------------------------------------------
// The harness: one engine, the model and the checker, stepped together.
// ---------------------------------------------------------------------------

struct Harness {
    node: Node,
    ls: LockspaceId,
    model: Model,
    check: Checker,
    slots: Vec<SessionId>,
    next_session: u64,
    step_no: u64,
}

fn drain(node: &mut Node) -> Vec<Effect> {
    std::iter::from_fn(|| node.poll_effect()).collect()
}

impl Harness {
    fn new() -> Harness {
        let config = NodeConfig { deadlock_detection: false, ..Default::default() };
        let mut node = Node::new(config).expect("node");
        let ls = node.create_lockspace(b"model", LockspaceConfig::default()).expect("lockspace");
        let mut h = Harness {
            node,
            ls,
            model: Model::default(),
            check: Checker::default(),
            slots: vec![],
            next_session: 1,
            step_no: 0,
        };
        for _ in 0..SLOTS {
            let s = h.open_session();
            h.slots.push(s);
        }
        h
    }

    fn open_session(&mut self) -> SessionId {
        let s = SessionId(self.next_session);
        self.next_session += 1;
        self.node.open_session(s).expect("open session");
        self.model.open_session(s);
        s
    }

    fn handle(&self, s: SessionId, h: u64) -> LockHandle {
        let existing: Vec<LockHandle> = self.model.sessions[&s].keys().copied().collect();
        resolve(h, &existing)
    }

    /// The slot `s`, or for a request about one of a session's locks, the
    /// next slot whose session has a lock, if `s`'s has none.
    fn slot(&self, s: usize, h: u64) -> usize {
        if h < HANDLES {
            return s;
        }
        (0..SLOTS).map(|i| (s + i) % SLOTS).find(|&i| !self.model.sessions[&self.slots[i]].is_empty()).unwrap_or(s)
    }

    fn now(&self) -> Instant {
        Instant::from_nanos(self.model.now)
    }

    /// A request sent to both; returns the engine's result.
    fn request(&mut self, s: SessionId, req: ClientRequest) -> Result<(), RequestError> {
        let want = self.model.handle_client(s, &req);
        let got = self.node.handle_client(self.now(), s, req.clone());
        assert_eq!(got, want, "result of {req:?}");
        self.check.on_request(s, &req, &got);
        got
    }

    fn apply(&mut self, step: &Step) {
        self.step_no += 1;
        // Unique sub-millisecond part of this step's deadline.
        let timeout = |ms: &Option<u64>, n: u64| ms.map(|ms| Duration::from_nanos(ms * MS + n));
        let mut multiset = false;
        match step {
            Step::Lock { s, h, r, mode, flags, timeout_ms } => {
                let req = ClientRequest::Lock(LockRequest {
                    handle: LockHandle(*h),
                    lockspace: self.ls,
                    name: NAMES[*r].to_vec(),
                    mode: *mode,
                    flags: *flags,
                    timeout: timeout(timeout_ms, self.step_no),
                });
                let _ = self.request(self.slots[*s], req);
            }
            Step::Adopt { s, h, r, mode, flags, steer } => {
                let orphans: Vec<(Vec<u8>, Mode)> = (self.model.locks.values())
                    .filter(|l| l.orphan)
                    .map(|l| (l.res.clone(), l.granted.expect("orphans are granted")))
                    .collect();
                let (name, mode) = match orphans.len() {
                    n if *steer && n > 0 => orphans[*r % n].clone(),
                    _ => (NAMES[*r].to_vec(), *mode),
                };
                let req = ClientRequest::Lock(LockRequest {
                    handle: LockHandle(*h),
                    lockspace: self.ls,
                    name,
                    mode,
                    flags: *flags,
                    timeout: None,
                });
                let _ = self.request(self.slots[*s], req);
            }
            Step::Convert { s, h, mode, flags, lvb, timeout_ms } => {
                let session = self.slots[self.slot(*s, *h)];
                let h = &self.handle(session, *h).0;
                let mut flags = *flags;
                // Which of Pending and QuecvtNotAllowed comes first is not
                // specified: only ask QUECVT of locks with nothing pending.
                let id = self.model.lookup(session, LockHandle(*h));
                if id.is_some_and(|id| self.model.l(id).req.is_some()) {
                    flags.remove(LockFlags::QUECVT);
                }
                let req = ClientRequest::Convert(ConvertRequest {
                    handle: LockHandle(*h),
                    mode: *mode,
                    flags,
                    lvb: lvb.clone(),
                    timeout: timeout(timeout_ms, self.step_no),
                });
                let _ = self.request(session, req);
            }
            Step::Unlock { s, h, flags, lvb } => {
                let s = &self.slot(*s, *h);
                let h = &self.handle(self.slots[*s], *h).0;
                let req =
                    ClientRequest::Unlock(UnlockRequest { handle: LockHandle(*h), flags: *flags, lvb: lvb.clone() });
                let _ = self.request(self.slots[*s], req);
            }
            Step::Cancel { s, h } => {
                let s = &self.slot(*s, *h);
                let h = &self.handle(self.slots[*s], *h).0;
                let _ = self.request(self.slots[*s], ClientRequest::Cancel { handle: LockHandle(*h) });
            }
            Step::Advance { ms } => {
                let now = self.model.now + ms * MS;
                self.model.expire(now);
                self.node.handle_timeout(self.now());
            }
            Step::EndSession { s } => {
                // Resources are released in an order the spec leaves open.
                multiset = true;
                let old = self.slots[*s];
                self.node.end_session(self.now(), old).expect("end session");
                self.model.end_session(old);
                self.check.end_session(old);
                self.slots[*s] = self.open_session();
            }
        }
        let mut got = drain(&mut self.node);
        let mut want = std::mem::take(&mut self.model.out);
        multiset |= std::mem::take(&mut self.model.unordered);
        self.check.on_effects(&got);
        if let Step::EndSession { .. } = step {
            // The order in which the resources of an ended session are
            // released is left open, and so is which grant gets which token:
            // the tokens handed out must be the same set, the rest the same
            // multiset; then the model takes the engine's tokens.
            let tokens = |effects: &[Effect]| {
                let mut t: Vec<u64> = effects
                    .iter()
                    .filter_map(|e| match e {
                        Effect::Complete(c) => c.token.map(|t| t.0),
                        _ => None,
                    })
                    .collect();
                t.sort_unstable();
                t
            };
            assert_eq!(tokens(&got), tokens(&want), "tokens of step {} {step:?}", self.step_no);
            let strip = |effects: &mut Vec<Effect>| {
                for e in effects.iter_mut() {
                    if let Effect::Complete(c) = e {
                        c.token = None;
                    }
                }
            };
            self.model.take_tokens(&got);
            strip(&mut got);
            strip(&mut want);
        }
        if multiset {
            got.sort_by_key(|e| format!("{e:?}"));
            want.sort_by_key(|e| format!("{e:?}"));
        }
        assert_eq!(got, want, "effects of step {} {step:?}", self.step_no);
        self.after_step();
    }

    fn after_step(&mut self) {
        self.node.check_invariants().unwrap_or_else(|e| panic!("engine invariant: {e}"));
        self.check.check_compatible();
        let dump = self.node.dump(self.ls, None, usize::MAX).expect("dump");
        check_settled(&dump);
        assert_eq!(engine_view(&dump), self.model.view(), "queues after step {}", self.step_no);
    }

    /// Ends every session but one, which cancels whatever it has pending and
    /// unlocks everything; then time passes every deadline. Every accepted
    /// request must have completed.
    fn liveness(&mut self) {
        for s in 1..SLOTS {
            self.apply(&Step::EndSession { s });
        }
        let me = self.slots[0];
        while let Some(handle) = self.check.pending.keys().find(|k| k.0 == me).map(|k| k.1) {
            let before = self.check.pending.len();
            self.apply(&Step::Cancel { s: 0, h: handle.0 });
            assert!(self.check.pending.len() < before, "cancel of {handle} completed nothing");
        }
        let mine: Vec<LockHandle> = self.check.locks.keys().filter(|k| k.0 == me).map(|k| k.1).collect();
        for handle in mine {
            self.apply(&Step::Unlock { s: 0, h: handle.0, flags: UnlockFlags::EMPTY, lvb: None });
        }
        self.apply(&Step::Advance { ms: 1000 });
        assert!(self.check.pending.is_empty(), "requests never completed: {:?}", self.check.pending);
        assert!(self.check.locks.is_empty(), "locks left: {:?}", self.check.locks);
        assert_eq!(self.node.poll_timeout(), None, "a deadline is left");
        let dump = self.node.dump(self.ls, None, usize::MAX).expect("dump");
        for r in &dump {
            assert!(r.converting.is_empty() && r.waiting.is_empty(), "requests left: {r:?}");
            assert!(r.granted.iter().all(|l| l.orphan), "non-orphans left: {r:?}");
        }
    }
}

/// `cases` unless `PROPTEST_CASES` says otherwise (for a longer run by hand).
fn config(cases: u32) -> ProptestConfig {
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

// ---------------------------------------------------------------------------
// Deadlock detection: no wait-for cycle survives a step.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum DStep {
    Lock { s: usize, h: u64, r: usize, mode: Mode, flags: LockFlags },
    Convert { s: usize, h: u64, mode: Mode, flags: LockFlags },
    Unlock { s: usize, h: u64 },
    Cancel { s: usize, h: u64 },
}

fn dstep(sessions: usize, resources: usize) -> impl Strategy<Value = DStep> {
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

fn dscenario() -> impl Strategy<Value = (usize, Vec<DStep>)> {
    (3usize..=4, 2usize..=3).prop_flat_map(|(sessions, resources)| {
        (Just(sessions), prop::collection::vec(dstep(sessions, resources), 1..60))
    })
}

/// The wait-for graph between sessions, computed from the dump: a waiter
/// waits for every other session holding a mode incompatible with the one it
/// asks for, and for every other session queued ahead of it asking for an
/// incompatible mode. Orphans and a session's own locks are left out.
fn wait_for(dump: &[ResourceInfo]) -> BTreeMap<SessionId, Vec<SessionId>> {
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

fn find_cycle(edges: &BTreeMap<SessionId, Vec<SessionId>>) -> Option<Vec<SessionId>> {
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
