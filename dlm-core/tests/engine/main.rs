//! One event in, the exact effects out: every flag and status of the engine.
//!
//! Sessions are numbered 1.., each test's lock handles are small numbers, and
//! fencing tokens are the lockspace-wide grant count, so every expected
//! effect is written out in full.
//!
//! One file per part of the engine: `queues`, `value_blocks`, `sessions`,
//! `ending`, `tokens`, `input`.

mod ending;
mod input;
mod queues;
mod sessions;
mod tokens;
mod value_blocks;

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
