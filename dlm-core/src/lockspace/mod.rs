//! A lockspace: its resources and locks, and the VMS / Linux DLM rules that
//! decide, per resource, what is granted, what waits, who is told that they
//! block someone, and what happens to the value block.
//!
//! Every operation here leaves each resource it touched "settled": everything
//! grantable is granted, holders in the way of a queued request have had
//! their blocking callback, and a resource with no lock left is gone.
//!
//! This module holds the lockspace, its resources and the requests; the
//! rules are in its children:
//!
//! | module | job |
//! |---|---|
//! | `grant` | what may be granted, granting, failing and demoting, the value block on a grant |
//! | `queues` | waiting (deadlines, the per-session index), releasing, writing the value block |
//! | `blocking` | blocking callbacks to holders in the way |
//! | `wait_for` | the wait-for edges deadlock detection searches |
//! | `recover` | a cluster's recovery on this master: purging, re-adding and settling locks |
//! | `delay` | lock-delay: holds taken without an unlock, kept in the way for a while |
//! | `validate` | request validation (names, flags, timeouts, value blocks) |

mod blocking;
mod delay;
mod grant;
mod queues;
mod recover;
mod validate;
mod wait_for;

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::time::Duration;

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::deadlock::{Edge, WaitRef};
use crate::effect::{Completion, Effect, Op, RevokeReason, Status};
use crate::flags::{LockFlags, StatusFlags, UnlockFlags};
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::limits::{LVB_LEN_MAX, LVB_LEN_MULTIPLE, Limit, Limits};
use crate::lock::{Lock, LockState};
use crate::mode::Mode;
use crate::outbox::Outbox;
use crate::request::{ConvertRequest, LockRequest, RequestError, UnlockRequest};
use crate::resource::Resource;
use crate::slab::Slab;
use crate::time::Instant;

/// Per-lockspace settings, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockspaceConfig {
    /// Value block length in bytes: a multiple of 8 from 8 to 256.
    pub lvb_len: usize,
    /// How long a hold taken from its holder without an unlock (its node
    /// lost) stays in the way of conflicting requests (lock-delay, see
    /// `lockspace/delay.rs`). Zero turns it off.
    pub lock_delay: Duration,
}

/// The lock-delay of a lockspace unless configured: see the README's
/// "Lock-delay" for the measurement it was chosen from and its cost.
pub const LOCK_DELAY_DEFAULT: Duration = Duration::from_millis(500);

impl Default for LockspaceConfig {
    fn default() -> Self {
        LockspaceConfig { lvb_len: crate::limits::LVB_LEN_DEFAULT, lock_delay: LOCK_DELAY_DEFAULT }
    }
}

impl LockspaceConfig {
    /// Checks a lockspace's name and settings as [`crate::Node::create_lockspace`] does.
    ///
    /// # Errors
    /// A name empty or over [`crate::LOCKSPACE_NAME_LEN_MAX`] bytes, or a bad value block length.
    pub fn validate(&self, name: &[u8]) -> Result<(), RequestError> {
        if name.is_empty() || name.len() > crate::LOCKSPACE_NAME_LEN_MAX {
            return Err(RequestError::InvalidLockspaceName { len: name.len() });
        }
        let len = self.lvb_len;
        if len == 0 || len > LVB_LEN_MAX || !len.is_multiple_of(LVB_LEN_MULTIPLE) {
            return Err(RequestError::InvalidLvbLen { len });
        }
        Ok(())
    }
}

pub(crate) struct Lockspace {
    pub(crate) id: LockspaceId,
    pub(crate) name: Box<[u8]>,
    pub(crate) config: LockspaceConfig,
    pub(crate) resources: Slab<Resource>,
    /// Resource indices, hashed by the name stored in the resource itself, so
    /// that a name is held once.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    pub(crate) locks: Slab<Lock>,
    /// The last fencing token issued. One counter per lockspace makes tokens
    /// strictly increasing per resource even when a resource is freed and
    /// created again (part 1 of [`crate::tokens`]).
    last_token: u64,
    /// Pending requests with a timeout, by deadline.
    pub(crate) deadlines: BTreeSet<(Instant, u32)>,
    /// Pending requests by session: the out-edges of the wait-for graph.
    pub(crate) waiting_by_session: BTreeSet<(SessionId, u32)>,
    /// Holds taken without an unlock, still in the way (lock-delay).
    pub(crate) delays: delay::Delays,
}

/// How a grant changes a lock, decided before it is applied.
#[derive(Clone, Copy)]
struct Grant {
    mode: Mode,
    alternate: bool,
}

impl Lockspace {
    pub(crate) fn new(id: LockspaceId, name: Box<[u8]>, config: LockspaceConfig) -> Lockspace {
        Lockspace {
            id,
            name,
            config,
            resources: Slab::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            locks: Slab::new(),
            last_token: 0,
            deadlines: BTreeSet::new(),
            waiting_by_session: BTreeSet::new(),
            delays: delay::Delays::default(),
        }
    }

    // ----- resources -----

    pub(crate) fn find_resource(&self, name: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(name);
        let resources = &self.resources;
        self.index.find(hash, |&r| &*resources[r].name == name).copied()
    }

    fn create_resource(&mut self, name: Vec<u8>) -> u32 {
        let hash = self.hasher.hash_one(&name[..]);
        let r = self.resources.insert(Resource::new(name.into_boxed_slice()));
        let (resources, hasher) = (&self.resources, &self.hasher);
        self.index.insert_unique(hash, r, |&i| hasher.hash_one(&resources[i].name[..]));
        r
    }

    /// Frees the resource if no lock is left on it (its value block goes with it).
    fn free_if_unused(&mut self, out: &mut Outbox, r: u32) {
        if !self.resources[r].is_unused() {
            return;
        }
        let hash = self.hasher.hash_one(&self.resources[r].name[..]);
        if let Ok(entry) = self.index.find_entry(hash, |&i| i == r) {
            entry.remove();
        }
        let resource = self.resources.remove(r);
        if out.track_released {
            out.released.push((self.id, resource.name));
        }
    }

    /// The last fencing token handed out in this lockspace.
    pub(crate) fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Makes the next fencing token larger than `floor` (a resource mastered
    /// elsewhere before handed out tokens up to it).
    pub(crate) fn raise_token_floor(&mut self, floor: u64) {
        self.last_token = self.last_token.max(floor);
    }

    /// Every wait-for edge of this lockspace, with the session it leaves.
    pub(crate) fn all_wait_edges(&self, edges: &mut Vec<(SessionId, Edge)>) {
        let mut scratch = Vec::new();
        let mut sessions: Vec<SessionId> = self.waiting_by_session.iter().map(|&(s, _)| s).collect();
        sessions.dedup();
        for session in sessions {
            self.wait_edges(session, &mut scratch);
            edges.extend(scratch.drain(..).map(|edge| (session, edge)));
        }
    }

    /// Whether `wait` still names a pending request that started waiting at `wait.seq`.
    pub(crate) fn is_waiting(&self, wait: WaitRef) -> bool {
        self.locks.get(wait.lock).is_some_and(|lock| lock.is_pending() && lock.wait_seq == wait.seq)
    }

    // ----- requests -----

    /// A new lock. Returns the lock's index while it exists after the call
    /// (granted or queued); `None` when the request already completed without
    /// a lock (a failed try, a failed adoption).
    pub(crate) fn request(
        &mut self,
        out: &mut Outbox,
        now: Instant,
        limits: &Limits,
        session: SessionId,
        req: LockRequest,
    ) -> Result<Option<u32>, RequestError> {
        self.validate_lock(limits, &req)?;
        if req.flags.contains(LockFlags::ADOPT) {
            return Ok(self.adopt(out, session, req));
        }
        if self.locks.len() >= limits.locks_per_lockspace_max {
            return Err(RequestError::LimitExceeded(Limit::LocksPerLockspace));
        }
        if out.locks >= limits.locks_max {
            return Err(RequestError::LimitExceeded(Limit::Locks));
        }
        let r = match self.find_resource(&req.name) {
            Some(r) => r,
            None if self.resources.len() >= limits.resources_per_lockspace_max => {
                return Err(RequestError::LimitExceeded(Limit::ResourcesPerLockspace));
            }
            None => self.create_resource(req.name),
        };
        let l = self.locks.insert(Lock::new(session, req.handle, r, req.mode, req.flags));
        out.locks += 1;
        out.touched.push((self.id, r));

        if let Some(grant) = self.grant_mode(l, true) {
            self.grant(out, l, grant, None);
            self.settle(out, r, true);
            return Ok(Some(l));
        }
        if req.flags.contains(LockFlags::NOQUEUE) {
            if req.flags.contains(LockFlags::NOQUEUEBAST) {
                self.notify_holders_of(out, r, req.mode, None);
            }
            self.locks.remove(l);
            out.locks -= 1;
            out.effects.push_back(Effect::Complete(Completion {
                session,
                handle: req.handle,
                op: Op::Lock,
                status: Status::WouldBlock,
                mode: None,
                token: None,
                lvb: None,
                flags: StatusFlags::EMPTY,
            }));
            self.free_if_unused(out, r);
            return Ok(None);
        }
        if self.resources[r].queued >= limits.waiters_per_resource_max {
            self.locks.remove(l);
            out.locks -= 1;
            return Err(RequestError::LimitExceeded(Limit::WaitersPerResource));
        }
        self.start_wait(out, now, l, req.timeout);
        self.settle(out, r, true);
        Ok(Some(l))
    }

    /// Hands an orphan of the named resource, held in the requested mode, to
    /// the session (the Linux DLM's `DLM_LKF_ORPHAN`).
    fn adopt(&mut self, out: &mut Outbox, session: SessionId, req: LockRequest) -> Option<u32> {
        let orphan = self.find_resource(&req.name).and_then(|r| {
            self.resources[r]
                .granted
                .iter(&self.locks)
                .find(|&l| self.locks[l].orphan && self.locks[l].granted == Some(req.mode))
        });
        let Some(l) = orphan else {
            out.effects.push_back(Effect::Complete(Completion {
                session,
                handle: req.handle,
                op: Op::Lock,
                status: Status::NotFound,
                mode: None,
                token: None,
                lvb: None,
                flags: StatusFlags::EMPTY,
            }));
            return None;
        };
        let lock = &mut self.locks[l];
        lock.orphan = false;
        lock.session = session;
        lock.handle = req.handle;
        let mut flags = req.flags;
        flags.remove(LockFlags::ADOPT);
        lock.flags = flags;
        lock.requested = req.mode;
        // Adoption is a grant to a new owner, with a token of its own and the
        // value block read as for a new lock: present it to grant() as one.
        lock.granted = None;
        let r = lock.resource;
        self.resources[r].held.remove(req.mode);
        out.touched.push((self.id, r));
        self.grant(out, l, Grant { mode: req.mode, alternate: false }, None);
        self.settle(out, r, true);
        Some(l)
    }

    pub(crate) fn convert(
        &mut self,
        out: &mut Outbox,
        now: Instant,
        limits: &Limits,
        l: u32,
        req: ConvertRequest,
    ) -> Result<(), RequestError> {
        let lock = &self.locks[l];
        if lock.is_pending() {
            return Err(RequestError::Pending);
        }
        let from = lock.granted.expect("a lock not pending is granted");
        self.validate_convert(limits, from, &req)?;
        let r = self.locks[l].resource;
        let lock = &mut self.locks[l];
        let previous_flags = lock.flags;
        lock.requested = req.mode;
        // PERSISTENT belongs to the lock, not to one request: a conversion
        // may set it but does not clear it.
        let persistent = previous_flags.contains(LockFlags::PERSISTENT);
        lock.flags = if persistent { req.flags | LockFlags::PERSISTENT } else { req.flags };
        lock.status = StatusFlags::EMPTY;
        out.touched.push((self.id, r));

        if let Some(grant) = self.grant_mode(l, true) {
            self.grant(out, l, grant, req.lvb.as_deref());
            self.settle(out, r, true);
            return Ok(());
        }
        let would_queue = !req.flags.contains(LockFlags::NOQUEUE);
        if would_queue && self.resources[r].queued >= limits.waiters_per_resource_max {
            self.locks[l].flags = previous_flags;
            return Err(RequestError::LimitExceeded(Limit::WaitersPerResource));
        }
        if self.conversion_deadlock(l) {
            if !req.flags.contains(LockFlags::CONVDEADLK) {
                self.complete_convert(out, l, Status::Deadlock);
                return Ok(());
            }
            // Give up the granted mode to break the deadlock, let the others
            // through, then try again as a conversion from NL.
            self.demote(l);
            self.grant_pending(out, r);
            if let Some(grant) = self.grant_mode(l, true) {
                self.grant(out, l, grant, None);
                self.settle(out, r, true);
                return Ok(());
            }
        }
        if !would_queue {
            if req.flags.contains(LockFlags::NOQUEUEBAST) {
                self.notify_holders_of(out, r, req.mode, Some(l));
            }
            self.complete_convert(out, l, Status::WouldBlock);
            self.settle(out, r, false);
            return Ok(());
        }
        self.start_wait(out, now, l, req.timeout);
        self.settle(out, r, true);
        Ok(())
    }

    pub(crate) fn unlock(&mut self, out: &mut Outbox, l: u32, req: &UnlockRequest) -> Result<(), RequestError> {
        let force = req.flags.contains(UnlockFlags::FORCE);
        if self.locks[l].is_pending() && !force {
            return Err(RequestError::Pending);
        }
        self.validate_unlock(req)?;
        let lock = &self.locks[l];
        let (r, session, handle) = (lock.resource, lock.session, lock.handle);
        out.touched.push((self.id, r));
        if lock.is_pending() {
            let never_granted = lock.granted.is_none();
            self.fail_pending(out, l, Status::Cancelled);
            if never_granted {
                // The request completed as cancelled and took the lock with
                // it; the unlock completes too.
                out.effects.push_back(unlocked(handle, session));
                self.settle(out, r, false);
                return Ok(());
            }
        }
        let held = self.locks[l].granted.expect("granted after its pending request ended");
        if held.unlock_writes_lvb() {
            if req.flags.contains(UnlockFlags::IVVALBLK) {
                self.resources[r].lvb_invalid = true;
            } else if req.flags.contains(UnlockFlags::VALBLK)
                && let Some(lvb) = &req.lvb
            {
                self.write_lvb(r, lvb);
            }
        }
        self.release(out, l);
        out.effects.push_back(unlocked(handle, session));
        self.settle(out, r, false);
        Ok(())
    }

    pub(crate) fn cancel(&mut self, out: &mut Outbox, l: u32) -> Result<(), RequestError> {
        if !self.locks[l].is_pending() {
            return Err(RequestError::NotPending);
        }
        let r = self.locks[l].resource;
        out.touched.push((self.id, r));
        self.fail_pending(out, l, Status::Cancelled);
        self.settle(out, r, false);
        Ok(())
    }

    /// Ends the pending request of `l` with `status` (timeouts, deadlock victims).
    pub(crate) fn abort_pending(&mut self, out: &mut Outbox, l: u32, status: Status) {
        let r = self.locks[l].resource;
        out.touched.push((self.id, r));
        self.fail_pending(out, l, status);
        self.settle(out, r, false);
    }

    /// Times out every pending request whose deadline is at or before `now`,
    /// and settles the resources whose lock-delay has ended.
    pub(crate) fn expire(&mut self, out: &mut Outbox, now: Instant) {
        while let Some(&(deadline, l)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.abort_pending(out, l, Status::TimedOut);
        }
        for name in self.delays.take_ended(now) {
            if let Some(r) = self.find_resource(&name) {
                out.touched.push((self.id, r));
                self.settle(out, r, true);
            }
        }
    }

    /// Keeps `mode` in the way of conflicting requests on `name` for the
    /// lockspace's lock-delay from `since` (a hold taken without an unlock).
    pub(crate) fn delay_grants(&mut self, name: &[u8], mode: Mode, since: Instant) {
        if let Some(until) = self.delay_end(since) {
            self.delays.add(name, mode, until);
        }
    }

    /// [`Lockspace::delay_grants`] on resource `r`'s name.
    pub(crate) fn delay_grants_on(&mut self, r: u32, mode: Mode, since: Instant) {
        if let Some(until) = self.delay_end(since) {
            self.delays.add(&self.resources[r].name, mode, until);
        }
    }

    /// When a lock-delay from `since` ends (none if the lockspace has none).
    fn delay_end(&self, since: Instant) -> Option<Instant> {
        (!self.config.lock_delay.is_zero()).then(|| since.saturating_add(self.config.lock_delay))
    }

    /// When the next timeout or lock-delay ends.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.deadlines.first().map(|&(at, _)| at);
        match (timeout, self.delays.next_end()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Releases the locks of an ended session (sorted by handle, so the
    /// outcome does not depend on hash order): `PERSISTENT` granted locks
    /// become orphans, everything else is unlocked. No completion is sent to
    /// the ended session.
    pub(crate) fn end_session(&mut self, out: &mut Outbox, locks: &[u32]) {
        let mut touched = Vec::new();
        for &l in locks {
            let r = self.locks[l].resource;
            touched.push(r);
            out.touched.push((self.id, r));
            if self.locks[l].is_pending() {
                self.stop_wait(l);
                if self.locks[l].granted.is_none() {
                    self.destroy(out, l);
                    continue;
                }
                self.resources[r].granted.push_back(&mut self.locks, l);
                // The dropped request's status (DEMOTED) goes with it.
                self.locks[l].state = LockState::Granted;
                self.locks[l].status = StatusFlags::EMPTY;
            }
            let lock = &mut self.locks[l];
            if lock.flags.contains(LockFlags::PERSISTENT) {
                lock.orphan = true;
                lock.bast_level = None;
                continue;
            }
            if lock.granted.is_some_and(Mode::unlock_writes_lvb) {
                // The holder could have been half way through an update.
                self.resources[r].lvb_invalid = true;
            }
            self.release(out, l);
        }
        touched.sort_unstable();
        touched.dedup();
        for r in touched {
            if self.resources.get(r).is_some() {
                self.settle(out, r, false);
            }
        }
    }

    /// Unlocks orphans, of one resource or of all; returns how many.
    pub(crate) fn purge_orphans(&mut self, out: &mut Outbox, name: Option<&[u8]>) -> usize {
        let resources: Vec<u32> = match name {
            Some(name) => self.find_resource(name).into_iter().collect(),
            None => self.resources.iter().map(|(r, _)| r).collect(),
        };
        let mut purged = 0;
        for r in resources {
            let orphans: Vec<u32> =
                self.resources[r].granted.iter(&self.locks).filter(|&l| self.locks[l].orphan).collect();
            if orphans.is_empty() {
                continue;
            }
            out.touched.push((self.id, r));
            for l in orphans {
                if self.locks[l].granted.is_some_and(Mode::unlock_writes_lvb) {
                    self.resources[r].lvb_invalid = true;
                }
                self.release(out, l);
                purged += 1;
            }
            self.settle(out, r, false);
        }
        purged
    }

    /// Drops every lock (a forced release, a node fencing itself): pending
    /// requests complete with `status`, granted locks are revoked for `reason`.
    pub(crate) fn drop_all(&mut self, out: &mut Outbox, status: Status, reason: RevokeReason) {
        let mut locks: Vec<(SessionId, LockHandle, u32)> = self
            .locks
            .iter()
            .filter(|(_, lock)| !lock.orphan)
            .map(|(l, lock)| (lock.session, lock.handle, l))
            .collect();
        locks.sort_unstable();
        for (session, handle, l) in locks {
            let lock = &self.locks[l];
            if lock.is_pending() {
                let op = if lock.granted.is_some() { Op::Convert } else { Op::Lock };
                out.effects.push_back(Effect::Complete(Completion {
                    session,
                    handle,
                    op,
                    status,
                    mode: None,
                    token: None,
                    lvb: None,
                    flags: StatusFlags::EMPTY,
                }));
            }
            if lock.granted.is_some() {
                out.effects.push_back(Effect::Revoked { session, handle, reason });
            }
            out.freed.push((session, handle));
        }
    }

    pub(crate) fn lock_count(&self) -> u32 {
        self.locks.len()
    }
}

fn unlocked(handle: LockHandle, session: SessionId) -> Effect {
    Effect::Complete(Completion {
        session,
        handle,
        op: Op::Unlock,
        status: Status::Unlocked,
        mode: None,
        token: None,
        lvb: None,
        flags: StatusFlags::EMPTY,
    })
}
