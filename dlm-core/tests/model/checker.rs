//! The checker: sees only requests, their results and the effects (not the
//! model, not the engine's state) and checks the safety properties.

use std::collections::{HashMap, HashSet};

use dlm_core::{
    ClientRequest, Completion, Effect, LockFlags, LockHandle, Mode, Op, RequestError, SessionId, Status, StatusFlags,
};

use crate::spec::*;

#[derive(Clone, Debug)]
pub(crate) struct CLock {
    pub(crate) res: Vec<u8>,
    pub(crate) mode: Option<Mode>,
    pub(crate) persistent: bool,
    /// A CONVDEADLK conversion is pending: the engine may have demoted the
    /// lock to NL already, which the client learns only from the completion
    /// (DEMOTED).
    pub(crate) may_be_demoted: bool,
    /// A conflict was let pass because the lock may have been demoted: its
    /// completion must say DEMOTED.
    pub(crate) must_be_demoted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expect {
    pub(crate) op: Op,
    pub(crate) adopt: bool,
}

#[derive(Default)]
pub(crate) struct Checker {
    /// Locks clients know exist (pending or granted).
    pub(crate) locks: HashMap<(SessionId, LockHandle), CLock>,
    /// Orphans: resource, mode, and whether it may be NL instead (its
    /// session ended while a CONVDEADLK conversion was pending).
    pub(crate) orphans: Vec<(Vec<u8>, Mode, bool)>,
    /// Accepted requests still waiting for their completion.
    pub(crate) pending: HashMap<(SessionId, LockHandle), Vec<Expect>>,
    pub(crate) last_token: HashMap<Vec<u8>, u64>,
    pub(crate) ended: HashSet<SessionId>,
}

impl Checker {
    pub(crate) fn on_request(&mut self, s: SessionId, req: &ClientRequest, result: &Result<(), RequestError>) {
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

    pub(crate) fn on_effects(&mut self, effects: &[Effect]) {
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

    pub(crate) fn on_complete(&mut self, c: &Completion) {
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

    pub(crate) fn end_session(&mut self, s: SessionId) {
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
    pub(crate) fn check_compatible(&mut self) {
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
