//! The reference model: deliberately naive (a `Vec` per queue, everything
//! recomputed), written from the specification of the semantics, not from the
//! engine's source; and the views of the queues it and the engine's dump are
//! compared by.

use std::collections::BTreeMap;

use dlm_core::{
    ClientRequest, Completion, ConvertRequest, Effect, FencingToken, LockFlags, LockHandle, LockRequest, Mode, Op,
    RequestError, ResourceInfo, SessionId, Status, StatusFlags, UnlockFlags, UnlockRequest,
};

use crate::spec::*;
use crate::*;

/// A pending request of a lock.
#[derive(Clone, Debug)]
pub(crate) struct MReq {
    pub(crate) op: Op,
    pub(crate) mode: Mode,
    pub(crate) flags: LockFlags,
    pub(crate) lvb: Option<Vec<u8>>,
    pub(crate) deadline: Option<u64>,
    /// Demoted to NL by CONVDEADLK: reported in the completion.
    pub(crate) demoted: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct MLock {
    pub(crate) session: SessionId,
    pub(crate) handle: LockHandle,
    pub(crate) res: Vec<u8>,
    pub(crate) orphan: bool,
    pub(crate) persistent: bool,
    pub(crate) granted: Option<Mode>,
    pub(crate) token: Option<u64>,
    pub(crate) req: Option<MReq>,
    /// The strongest mode this holder was told about since its last grant.
    pub(crate) told: Option<Mode>,
}

#[derive(Clone, Debug)]
pub(crate) struct MRes {
    pub(crate) granted: Vec<u64>,
    pub(crate) converting: Vec<u64>,
    pub(crate) waiting: Vec<u64>,
    pub(crate) lvb: Option<Vec<u8>>,
    pub(crate) lvb_valid: bool,
    pub(crate) last_token: u64,
}

#[derive(Default)]
pub(crate) struct Model {
    pub(crate) now: u64,
    /// Lockspace-wide grant counter (the last token handed out).
    pub(crate) counter: u64,
    pub(crate) next_id: u64,
    pub(crate) locks: BTreeMap<u64, MLock>,
    pub(crate) res: BTreeMap<Vec<u8>, MRes>,
    pub(crate) sessions: BTreeMap<SessionId, BTreeMap<LockHandle, u64>>,
    pub(crate) out: Vec<Effect>,
    /// The order of this step's effects is not fully specified (see `noqueue_basts`).
    pub(crate) unordered: bool,
}

impl Model {
    pub(crate) fn l(&self, id: u64) -> &MLock {
        &self.locks[&id]
    }

    pub(crate) fn lm(&mut self, id: u64) -> &mut MLock {
        self.locks.get_mut(&id).expect("model lock")
    }

    pub(crate) fn rm(&mut self, name: &[u8]) -> &mut MRes {
        self.res.get_mut(name).expect("model resource")
    }

    pub(crate) fn lookup(&self, session: SessionId, handle: LockHandle) -> Option<u64> {
        self.sessions.get(&session)?.get(&handle).copied()
    }

    pub(crate) fn complete(&mut self, id: u64, op: Op, status: Status, mode: Option<Mode>, flags: StatusFlags) {
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
    pub(crate) fn grantable(&self, id: u64, mode: Mode, now: bool) -> bool {
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
    pub(crate) fn grant_mode(&self, id: u64, now: bool) -> Option<(Mode, bool)> {
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

    pub(crate) fn unqueue(&mut self, id: u64) {
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
    pub(crate) fn requeue_granted(&mut self, id: u64) {
        let name = self.l(id).res.clone();
        let r = self.rm(&name);
        r.converting.retain(|&x| x != id);
        if !r.granted.contains(&id) {
            r.granted.push(id);
        }
    }

    pub(crate) fn grant(&mut self, id: u64, mode: Mode, alt: bool) {
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
    pub(crate) fn fail(&mut self, id: u64, status: Status) {
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
    pub(crate) fn forget(&mut self, id: u64) {
        let l = self.locks.remove(&id).expect("model lock");
        if !l.orphan
            && let Some(s) = self.sessions.get_mut(&l.session)
        {
            s.remove(&l.handle);
        }
    }

    pub(crate) fn conv_deadlock(&self, id: u64) -> bool {
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
    pub(crate) fn grant_pass(&mut self, name: &[u8]) -> bool {
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
    pub(crate) fn basts(&mut self, name: &[u8]) {
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
    pub(crate) fn noqueue_basts(&mut self, name: &[u8], except: u64, mode: Mode) {
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

    pub(crate) fn cleanup(&mut self, name: &[u8]) {
        if let Some(r) = self.res.get(name)
            && r.granted.is_empty()
            && r.converting.is_empty()
            && r.waiting.is_empty()
        {
            self.res.remove(name);
        }
    }

    pub(crate) fn finish(&mut self, name: &[u8], mut granted_any: bool, queued: bool) {
        granted_any |= self.grant_pass(name);
        if granted_any || queued {
            self.basts(name);
        }
        self.cleanup(name);
    }

    // ----- requests -----

    pub(crate) fn open_session(&mut self, s: SessionId) {
        self.sessions.insert(s, BTreeMap::new());
    }

    pub(crate) fn lock_request(&mut self, s: SessionId, req: &LockRequest) -> Result<(), RequestError> {
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

    pub(crate) fn adopt(&mut self, s: SessionId, req: &LockRequest) -> Result<(), RequestError> {
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

    pub(crate) fn convert(&mut self, s: SessionId, req: &ConvertRequest) -> Result<(), RequestError> {
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

    pub(crate) fn unlock(&mut self, s: SessionId, req: &UnlockRequest) -> Result<(), RequestError> {
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

    pub(crate) fn cancel(&mut self, s: SessionId, handle: LockHandle) -> Result<(), RequestError> {
        let id = self.lookup(s, handle).ok_or(RequestError::UnknownHandle)?;
        if self.l(id).req.is_none() {
            return Err(RequestError::NotPending);
        }
        let name = self.l(id).res.clone();
        self.fail(id, Status::Cancelled);
        self.finish(&name, false, false);
        Ok(())
    }

    pub(crate) fn handle_client(&mut self, s: SessionId, req: &ClientRequest) -> Result<(), RequestError> {
        match req {
            ClientRequest::Lock(r) => self.lock_request(s, r),
            ClientRequest::Convert(r) => self.convert(s, r),
            ClientRequest::Unlock(r) => self.unlock(s, r),
            ClientRequest::Cancel { handle } => self.cancel(s, *handle),
        }
    }

    /// Time passes to `now`: due requests time out, earliest deadline first,
    /// each followed by the grant pass on its resource (like a cancel).
    pub(crate) fn expire(&mut self, now: u64) {
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

    pub(crate) fn end_session(&mut self, s: SessionId) {
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
    pub(crate) fn take_tokens(&mut self, effects: &[Effect]) {
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
    pub(crate) fn view(&self) -> Vec<RView> {
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
pub(crate) struct LView {
    pub(crate) session: SessionId,
    pub(crate) handle: LockHandle,
    pub(crate) orphan: bool,
    pub(crate) granted: Option<Mode>,
    pub(crate) requested: Option<Mode>,
    pub(crate) token: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RView {
    pub(crate) name: Vec<u8>,
    pub(crate) lvb: Option<Vec<u8>>,
    pub(crate) lvb_valid: bool,
    pub(crate) last_token: u64,
    pub(crate) granted: Vec<LView>,
    pub(crate) converting: Vec<LView>,
    pub(crate) waiting: Vec<LView>,
}

/// After every event the queues are settled: no queued request could be
/// granted by the grant pass (the head of the converting queue, the head of
/// the waiting queue when no conversion waits, and NOORDER requests, each in
/// its mode or alternate mode, conflict with a holder). Checked on the dump,
/// independently of the model.
pub(crate) fn check_settled(dump: &[ResourceInfo]) {
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

pub(crate) fn engine_view(dump: &[ResourceInfo]) -> Vec<RView> {
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
