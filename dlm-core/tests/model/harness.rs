//! The harness: one engine, the model and the checker, stepped together.

use std::time::Duration;

use dlm_core::{
    ClientRequest, ConvertRequest, Effect, Instant, LockFlags, LockHandle, LockRequest, LockspaceConfig, LockspaceId,
    Mode, Node, NodeConfig, RequestError, SessionId, UnlockFlags, UnlockRequest,
};

use crate::*;
use crate::{checker::*, reference::*, steps::*};

pub(crate) struct Harness {
    pub(crate) node: Node,
    pub(crate) ls: LockspaceId,
    pub(crate) model: Model,
    pub(crate) check: Checker,
    pub(crate) slots: Vec<SessionId>,
    pub(crate) next_session: u64,
    pub(crate) step_no: u64,
}

pub(crate) fn drain(node: &mut Node) -> Vec<Effect> {
    std::iter::from_fn(|| node.poll_effect()).collect()
}

impl Harness {
    pub(crate) fn new() -> Harness {
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

    pub(crate) fn open_session(&mut self) -> SessionId {
        let s = SessionId(self.next_session);
        self.next_session += 1;
        self.node.open_session(s).expect("open session");
        self.model.open_session(s);
        s
    }

    pub(crate) fn handle(&self, s: SessionId, h: u64) -> LockHandle {
        let existing: Vec<LockHandle> = self.model.sessions[&s].keys().copied().collect();
        resolve(h, &existing)
    }

    /// The slot `s`, or for a request about one of a session's locks, the
    /// next slot whose session has a lock, if `s`'s has none.
    pub(crate) fn slot(&self, s: usize, h: u64) -> usize {
        if h < HANDLES {
            return s;
        }
        (0..SLOTS).map(|i| (s + i) % SLOTS).find(|&i| !self.model.sessions[&self.slots[i]].is_empty()).unwrap_or(s)
    }

    pub(crate) fn now(&self) -> Instant {
        Instant::from_nanos(self.model.now)
    }

    /// A request sent to both; returns the engine's result.
    pub(crate) fn request(&mut self, s: SessionId, req: ClientRequest) -> Result<(), RequestError> {
        let want = self.model.handle_client(s, &req);
        let got = self.node.handle_client(self.now(), s, req.clone());
        assert_eq!(got, want, "result of {req:?}");
        self.check.on_request(s, &req, &got);
        got
    }

    pub(crate) fn apply(&mut self, step: &Step) {
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

    pub(crate) fn after_step(&mut self) {
        self.node.check_invariants().unwrap_or_else(|e| panic!("engine invariant: {e}"));
        self.check.check_compatible();
        let dump = self.node.dump(self.ls, None, usize::MAX).expect("dump");
        check_settled(&dump);
        assert_eq!(engine_view(&dump), self.model.view(), "queues after step {}", self.step_no);
    }

    /// Ends every session but one, which cancels whatever it has pending and
    /// unlocks everything; then time passes every deadline. Every accepted
    /// request must have completed.
    pub(crate) fn liveness(&mut self) {
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
