//! A lockspace: its resources and locks, and the VMS / Linux DLM rules that
//! decide, per resource, what is granted, what waits, who is told that they
//! block someone, and what happens to the value block.
//!
//! Every operation here leaves each resource it touched "settled": everything
//! grantable is granted, holders in the way of a queued request have had
//! their blocking callback, and a resource with no lock left is gone.

use std::collections::BTreeSet;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::deadlock::{Edge, WaitRef};
use crate::effect::{Completion, Effect, Op, RevokeReason, Status};
use crate::flags::{LockFlags, StatusFlags, UnlockFlags};
use crate::ids::{FencingToken, LockHandle, LockspaceId, SessionId};
use crate::limits::{LVB_LEN_MAX, LVB_LEN_MULTIPLE, Limit, Limits, RESOURCE_NAME_LEN_MAX};
use crate::lock::{Lock, LockState};
use crate::mode::{LvbAction, Mode, ModeCounts};
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
}

impl Default for LockspaceConfig {
    fn default() -> Self {
        LockspaceConfig { lvb_len: crate::limits::LVB_LEN_DEFAULT }
    }
}

impl LockspaceConfig {
    pub(crate) fn validate(&self) -> Result<(), RequestError> {
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
    /// created again.
    last_token: u64,
    /// Pending requests with a timeout, by deadline.
    pub(crate) deadlines: BTreeSet<(Instant, u32)>,
    /// Pending requests by session: the out-edges of the wait-for graph.
    pub(crate) waiting_by_session: BTreeSet<(SessionId, u32)>,
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

    pub(crate) fn validate_lock(&self, limits: &Limits, req: &LockRequest) -> Result<(), RequestError> {
        validate_name(&req.name)?;
        validate_lock_flags(req.mode, req.flags)?;
        check_timeout(limits, req.timeout)
    }

    pub(crate) fn validate_convert(
        &self,
        limits: &Limits,
        from: Mode,
        req: &ConvertRequest,
    ) -> Result<(), RequestError> {
        validate_convert_flags(from, req.mode, req.flags)?;
        check_timeout(limits, req.timeout)?;
        self.validate_lvb(req.lvb.as_deref(), req.flags.contains(LockFlags::VALBLK))?;
        let writes = Mode::lvb_action(Some(from), req.mode) == LvbAction::Write;
        if req.flags.contains(LockFlags::VALBLK)
            && writes
            && req.lvb.is_none()
            && !req.flags.contains(LockFlags::IVVALBLK)
        {
            return Err(RequestError::InvalidFlags("VALBLK converting down from PW/EX needs the value block to write"));
        }
        Ok(())
    }

    pub(crate) fn validate_unlock(&self, req: &UnlockRequest) -> Result<(), RequestError> {
        self.validate_lvb(req.lvb.as_deref(), req.flags.contains(UnlockFlags::VALBLK))
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
        let r = match self.find_resource(&req.name) {
            Some(r) => r,
            None if self.resources.len() >= limits.resources_per_lockspace_max => {
                return Err(RequestError::LimitExceeded(Limit::ResourcesPerLockspace));
            }
            None => self.create_resource(req.name),
        };
        let l = self.locks.insert(Lock::new(session, req.handle, r, req.mode, req.flags));
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

    /// Times out every pending request whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, out: &mut Outbox, now: Instant) {
        while let Some(&(deadline, l)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.abort_pending(out, l, Status::TimedOut);
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

    /// Drops every lock (a forced release): pending requests complete as
    /// cancelled, granted locks are revoked.
    pub(crate) fn drop_all(&mut self, out: &mut Outbox) {
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
                    status: Status::Cancelled,
                    mode: None,
                    token: None,
                    lvb: None,
                    flags: StatusFlags::EMPTY,
                }));
            }
            if lock.granted.is_some() {
                out.effects.push_back(Effect::Revoked { session, handle, reason: RevokeReason::LockspaceReleased });
            }
            out.freed.push((session, handle));
        }
    }

    // ----- grant rules -----

    /// Whether the lock may be granted `mode` now. `now` is true while its
    /// request is first processed, false when it is reconsidered from a queue;
    /// the rules are the VMS ones the Linux DLM keeps (`_can_be_granted`).
    fn grantable(&self, l: u32, mode: Mode, now: bool) -> bool {
        let lock = &self.locks[l];
        let resource = &self.resources[lock.resource];
        let converting = lock.granted.is_some();
        // EXPEDITE is validated to be a new NL request, compatible with
        // everything: it skips the queue.
        if lock.flags.contains(LockFlags::EXPEDITE) && !converting {
            return true;
        }
        if !resource.held.compatible_with(mode, lock.granted) {
            return false;
        }
        if converting && now {
            // A compatible conversion is granted in place, ahead of all
            // waiters, unless QUECVT asks it to queue behind other conversions.
            return !lock.flags.contains(LockFlags::QUECVT) || resource.converting.is_empty();
        }
        if lock.flags.contains(LockFlags::NOORDER) {
            return true;
        }
        if converting {
            return resource.converting.head == l;
        }
        if now {
            return resource.converting.is_empty() && resource.waiting.is_empty();
        }
        resource.converting.is_empty() && resource.waiting.head == l
    }

    /// The mode the lock can be granted now: its requested mode, or its
    /// alternate mode (`ALTPR`, `ALTCW`).
    fn grant_mode(&self, l: u32, now: bool) -> Option<Grant> {
        let lock = &self.locks[l];
        if self.grantable(l, lock.requested, now) {
            return Some(Grant { mode: lock.requested, alternate: false });
        }
        let alternate = if lock.flags.contains(LockFlags::ALTPR) {
            Mode::Pr
        } else if lock.flags.contains(LockFlags::ALTCW) {
            Mode::Cw
        } else {
            return None;
        };
        (alternate != lock.requested && self.grantable(l, alternate, now))
            .then_some(Grant { mode: alternate, alternate: true })
    }

    /// Whether converting `l` would deadlock with another conversion: a
    /// conversion ahead of it that its granted mode blocks, or one behind it
    /// that they block each other with (the Linux DLM's rule). A lock not yet
    /// on the convert queue counts as behind every conversion on it.
    fn conversion_deadlock(&self, l: u32) -> bool {
        let lock = &self.locks[l];
        let Some(held) = lock.granted else { return false };
        let resource = &self.resources[lock.resource];
        let mut ahead = true;
        for c in resource.converting.iter(&self.locks) {
            if c == l {
                ahead = false;
                continue;
            }
            let other = &self.locks[c];
            let blocks_other = !held.compatible(other.requested);
            let other_blocks = other.granted.is_some_and(|g| !g.compatible(lock.requested));
            if blocks_other && (ahead || other_blocks) {
                return true;
            }
        }
        false
    }

    /// Grants what can be granted: conversions first, in order, then waiting
    /// requests (Linux's `grant_pending_locks`).
    fn grant_pending(&mut self, out: &mut Outbox, r: u32) {
        let resource = &self.resources[r];
        if resource.converting.is_empty() && resource.waiting.is_empty() {
            return;
        }
        // A grant or a demotion can make earlier conversions grantable, so
        // walk again until a pass changes nothing. Each pass removes a
        // conversion or demotes one to NL (once), so this ends.
        loop {
            let mut changed = false;
            for c in self.resources[r].converting.snapshot(&self.locks) {
                if let Some(grant) = self.grant_mode(c, false) {
                    self.grant(out, c, grant, None);
                    changed = true;
                } else if self.conversion_deadlock(c) {
                    let lock = &self.locks[c];
                    if lock.flags.contains(LockFlags::CONVDEADLK) && lock.granted != Some(Mode::Nl) {
                        self.demote(c);
                    } else {
                        self.complete_convert(out, c, Status::Deadlock);
                    }
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        for w in self.resources[r].waiting.snapshot(&self.locks) {
            if let Some(grant) = self.grant_mode(w, false) {
                self.grant(out, w, grant, None);
            }
        }
    }

    /// Finishes an operation on a resource: grants what is grantable, sends
    /// the blocking callbacks that are due, frees the resource if unused.
    /// `changed_holders_or_queue` says the operation itself queued a request
    /// or granted one, either of which can put a holder in someone's way.
    fn settle(&mut self, out: &mut Outbox, r: u32, changed_holders_or_queue: bool) {
        let grants_before = out.grants;
        self.grant_pending(out, r);
        if self.resources[r].queued > 0 && (changed_holders_or_queue || out.grants != grants_before) {
            self.notify_blocking_holders(out, r);
        }
        self.free_if_unused(out, r);
    }

    fn grant(&mut self, out: &mut Outbox, l: u32, grant: Grant, lvb_in: Option<&[u8]>) {
        let r = self.locks[l].resource;
        match self.locks[l].state {
            LockState::Converting | LockState::Waiting => {
                self.stop_wait(l);
                self.resources[r].granted.push_back(&mut self.locks, l);
            }
            LockState::New => self.resources[r].granted.push_back(&mut self.locks, l),
            // An in-place conversion (or an adoption) stays where it is.
            LockState::Granted => {}
        }
        let lock = &self.locks[l];
        let from = lock.granted;
        let flags = lock.flags;
        let mut status = lock.status;
        if grant.alternate {
            status.insert(StatusFlags::ALTMODE);
        }
        let resource = &mut self.resources[r];
        if let Some(from) = from {
            resource.held.remove(from);
        }
        resource.held.add(grant.mode);

        let mut lvb = None;
        let action = Mode::lvb_action(from, grant.mode);
        if flags.contains(LockFlags::IVVALBLK) && action == LvbAction::Write {
            resource.lvb_invalid = true;
        } else if flags.contains(LockFlags::VALBLK) {
            match action {
                LvbAction::Read => {
                    lvb = Some(resource.lvb.as_deref().map_or_else(|| vec![0; self.config.lvb_len], <[u8]>::to_vec));
                    if resource.lvb_invalid {
                        status.insert(StatusFlags::VALNOTVALID);
                    }
                }
                LvbAction::Write => {
                    if let Some(bytes) = lvb_in {
                        self.write_lvb(r, bytes);
                    }
                }
                LvbAction::None => {}
            }
        }

        self.last_token += 1;
        let token = self.last_token;
        let resource = &mut self.resources[r];
        resource.last_token = token;
        let still_queued = resource.queued > 0;
        let lock = &mut self.locks[l];
        lock.granted = Some(grant.mode);
        lock.state = LockState::Granted;
        lock.bast_level = None;
        lock.status = StatusFlags::EMPTY;
        lock.token = token;
        out.grants += 1;
        if still_queued {
            // Whoever still waits may now wait for this session: look for a
            // cycle through it.
            out.deadlock_roots.push(lock.session);
        }
        out.effects.push_back(Effect::Complete(Completion {
            session: lock.session,
            handle: lock.handle,
            op: if from.is_some() { Op::Convert } else { Op::Lock },
            status: Status::Granted,
            mode: Some(grant.mode),
            token: Some(FencingToken(token)),
            lvb,
            flags: status,
        }));
    }

    /// Ends a pending request unsuccessfully: a conversion goes back to its
    /// granted mode, a new request goes away.
    fn fail_pending(&mut self, out: &mut Outbox, l: u32, status: Status) {
        if self.locks[l].granted.is_some() {
            self.complete_convert(out, l, status);
            return;
        }
        self.stop_wait(l);
        let lock = &self.locks[l];
        out.effects.push_back(Effect::Complete(Completion {
            session: lock.session,
            handle: lock.handle,
            op: Op::Lock,
            status,
            mode: None,
            token: None,
            lvb: None,
            flags: lock.status,
        }));
        self.destroy(out, l);
    }

    /// Completes a conversion that was not granted; the lock keeps (or is
    /// put back on the granted queue in) its granted mode.
    fn complete_convert(&mut self, out: &mut Outbox, l: u32, status: Status) {
        if self.locks[l].is_pending() {
            self.stop_wait(l);
            let r = self.locks[l].resource;
            self.resources[r].granted.push_back(&mut self.locks, l);
            self.locks[l].state = LockState::Granted;
        }
        let lock = &mut self.locks[l];
        let flags = lock.status;
        lock.status = StatusFlags::EMPTY;
        out.effects.push_back(Effect::Complete(Completion {
            session: lock.session,
            handle: lock.handle,
            op: Op::Convert,
            status,
            mode: lock.granted,
            token: None,
            lvb: None,
            flags,
        }));
    }

    /// Drops the lock's granted mode to NL to break a conversion deadlock (`CONVDEADLK`).
    fn demote(&mut self, l: u32) {
        let lock = &mut self.locks[l];
        let held = lock.granted.expect("only granted locks are demoted");
        lock.granted = Some(Mode::Nl);
        lock.status.insert(StatusFlags::DEMOTED);
        let resource = &mut self.resources[lock.resource];
        resource.held.remove(held);
        resource.held.add(Mode::Nl);
    }

    // ----- queues and bookkeeping -----

    fn start_wait(&mut self, out: &mut Outbox, now: Instant, l: u32, timeout: Option<std::time::Duration>) {
        let lock = &mut self.locks[l];
        let r = lock.resource;
        let head = lock.flags.contains(LockFlags::HEADQUE);
        let converting = lock.granted.is_some();
        let lock_was_granted = lock.state == LockState::Granted;
        out.wait_seq += 1;
        lock.wait_seq = out.wait_seq;
        lock.deadline = timeout.map(|t| now.saturating_add(t));
        lock.state = if converting { LockState::Converting } else { LockState::Waiting };
        let (session, deadline) = (lock.session, lock.deadline);
        let resource = &mut self.resources[r];
        if lock_was_granted {
            resource.granted.remove(&mut self.locks, l);
        }
        let queue = if converting { &mut resource.converting } else { &mut resource.waiting };
        if head {
            queue.push_front(&mut self.locks, l);
        } else {
            queue.push_back(&mut self.locks, l);
        }
        resource.queued += 1;
        if let Some(deadline) = deadline {
            self.deadlines.insert((deadline, l));
        }
        self.waiting_by_session.insert((session, l));
        out.deadlock_roots.push(session);
    }

    /// Takes a pending lock off its queue and out of the timeout and
    /// wait-for bookkeeping; it is then on no queue.
    fn stop_wait(&mut self, l: u32) {
        let lock = &mut self.locks[l];
        let (r, state, session) = (lock.resource, lock.state, lock.session);
        if let Some(deadline) = lock.deadline.take() {
            self.deadlines.remove(&(deadline, l));
        }
        self.waiting_by_session.remove(&(session, l));
        let resource = &mut self.resources[r];
        match state {
            LockState::Converting => resource.converting.remove(&mut self.locks, l),
            LockState::Waiting => resource.waiting.remove(&mut self.locks, l),
            LockState::Granted | LockState::New => unreachable!("stop_wait on a lock that is not queued"),
        }
        resource.queued -= 1;
    }

    /// Removes a granted lock: off the granted queue, its mode no longer held.
    fn release(&mut self, out: &mut Outbox, l: u32) {
        let lock = &self.locks[l];
        let r = lock.resource;
        let held = lock.granted.expect("release of a granted lock");
        let resource = &mut self.resources[r];
        resource.granted.remove(&mut self.locks, l);
        resource.held.remove(held);
        self.destroy(out, l);
    }

    /// Frees a lock that is on no queue and tells the node its handle is free.
    fn destroy(&mut self, out: &mut Outbox, l: u32) {
        let lock = self.locks.remove(l);
        if !lock.orphan {
            out.freed.push((lock.session, lock.handle));
        }
    }

    fn write_lvb(&mut self, r: u32, bytes: &[u8]) {
        let len = self.config.lvb_len;
        let resource = &mut self.resources[r];
        let lvb = resource.lvb.get_or_insert_with(|| vec![0; len].into_boxed_slice());
        lvb.fill(0);
        lvb[..bytes.len()].copy_from_slice(bytes);
        resource.lvb_invalid = false;
    }

    fn validate_lvb(&self, lvb: Option<&[u8]>, valblk: bool) -> Result<(), RequestError> {
        let Some(lvb) = lvb else { return Ok(()) };
        if !valblk {
            return Err(RequestError::InvalidFlags("a value block needs VALBLK"));
        }
        if lvb.len() > self.config.lvb_len {
            return Err(RequestError::LvbTooLong { len: lvb.len(), max: self.config.lvb_len });
        }
        Ok(())
    }

    // ----- blocking callbacks -----

    /// Tells every holder in the way of a queued request that it blocks
    /// someone, once per blocking episode: a holder hears again only of a
    /// stronger blocked mode, or after it is granted anew.
    fn notify_blocking_holders(&mut self, out: &mut Outbox, r: u32) {
        let resource = &self.resources[r];
        let mut blocked = ModeCounts::default();
        for q in resource.converting.iter(&self.locks).chain(resource.waiting.iter(&self.locks)) {
            blocked.add(self.locks[q].requested);
        }
        let holders: Vec<u32> =
            resource.granted.iter(&self.locks).chain(resource.converting.iter(&self.locks)).collect();
        for h in holders {
            let lock = &self.locks[h];
            let held = lock.granted.expect("holders are granted");
            let own = (lock.state == LockState::Converting).then_some(lock.requested);
            let strongest = Mode::ALL.into_iter().rev().find(|&mode| {
                let count = blocked.get(mode) - u32::from(own == Some(mode));
                count > 0 && !held.compatible(mode)
            });
            if let Some(mode) = strongest {
                self.send_blocking(out, h, mode);
            }
        }
    }

    /// One-off blocking callbacks for a failed `NOQUEUE|NOQUEUEBAST` request.
    fn notify_holders_of(&mut self, out: &mut Outbox, r: u32, mode: Mode, except: Option<u32>) {
        let resource = &self.resources[r];
        let holders: Vec<u32> =
            resource.granted.iter(&self.locks).chain(resource.converting.iter(&self.locks)).collect();
        for h in holders {
            if Some(h) != except && self.locks[h].granted.is_some_and(|held| !held.compatible(mode)) {
                self.send_blocking(out, h, mode);
            }
        }
    }

    fn send_blocking(&mut self, out: &mut Outbox, h: u32, mode: Mode) {
        let lock = &mut self.locks[h];
        if lock.orphan || lock.bast_level.is_some_and(|level| level >= mode) {
            return;
        }
        lock.bast_level = Some(mode);
        out.effects.push_back(Effect::Blocking { session: lock.session, handle: lock.handle, mode });
    }

    // ----- wait-for graph -----

    /// The wait-for edges out of `session` in this lockspace: for each of its
    /// pending requests, the other sessions owning a lock it cannot pass:
    /// granted in a conflicting mode, or ahead of it in queue order (which
    /// binds compatible requests too, as `grantable` does). Orphans are never waited *for* in a
    /// cycle: nobody can release them but an administrator.
    pub(crate) fn wait_edges(&self, session: SessionId, edges: &mut Vec<Edge>) {
        for &(_, w) in self.waiting_by_session.range((session, 0)..=(session, u32::MAX)) {
            let waiter = &self.locks[w];
            let resource = &self.resources[waiter.resource];
            let wants = waiter.requested;
            let waits = WaitRef { lockspace: self.id, lock: w, seq: waiter.wait_seq };
            let mut push = |other: u32| {
                let other = &self.locks[other];
                if !other.orphan && other.session != session {
                    edges.push(Edge { to: other.session, wait: waits });
                }
            };
            for g in resource.granted.iter(&self.locks) {
                if self.locks[g].granted.is_some_and(|held| !held.compatible(wants)) {
                    push(g);
                }
            }
            // Queue order binds too (see `grantable`): a conversion waits for
            // the conversions ahead of it, a new request for every conversion
            // and the new requests ahead of it, compatible or not, unless
            // NOORDER lets it pass them.
            let ordered = !waiter.flags.contains(LockFlags::NOORDER);
            let mut ahead = true;
            for c in resource.converting.iter(&self.locks) {
                if c == w {
                    ahead = false;
                    continue;
                }
                let held_conflicts = self.locks[c].granted.is_some_and(|held| !held.compatible(wants));
                if held_conflicts || (ordered && ahead) {
                    push(c);
                }
            }
            if waiter.state == LockState::Waiting && ordered {
                for q in resource.waiting.iter(&self.locks) {
                    if q == w {
                        break;
                    }
                    push(q);
                }
            }
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

fn validate_name(name: &[u8]) -> Result<(), RequestError> {
    if name.is_empty() || name.len() > RESOURCE_NAME_LEN_MAX {
        return Err(RequestError::InvalidResourceName { len: name.len() });
    }
    Ok(())
}

fn check_timeout(limits: &Limits, timeout: Option<std::time::Duration>) -> Result<(), RequestError> {
    match timeout {
        Some(t) if t > limits.request_timeout_max => Err(RequestError::LimitExceeded(Limit::RequestTimeout)),
        _ => Ok(()),
    }
}

/// Flag rules shared by new requests and conversions.
fn validate_common_flags(flags: LockFlags) -> Result<(), RequestError> {
    if flags.contains(LockFlags::NOQUEUEBAST) && !flags.contains(LockFlags::NOQUEUE) {
        return Err(RequestError::InvalidFlags("NOQUEUEBAST goes with NOQUEUE"));
    }
    if flags.contains(LockFlags::ALTPR | LockFlags::ALTCW) {
        return Err(RequestError::InvalidFlags("ALTPR and ALTCW exclude each other"));
    }
    Ok(())
}

fn validate_lock_flags(mode: Mode, flags: LockFlags) -> Result<(), RequestError> {
    validate_common_flags(flags)?;
    if flags.intersects(LockFlags::QUECVT | LockFlags::CONVDEADLK | LockFlags::IVVALBLK) {
        return Err(RequestError::InvalidFlags("QUECVT, CONVDEADLK and IVVALBLK apply to conversions"));
    }
    if flags.contains(LockFlags::EXPEDITE) {
        if mode != Mode::Nl {
            return Err(RequestError::InvalidFlags("EXPEDITE is for NL requests"));
        }
        if flags.intersects(LockFlags::NOQUEUE | LockFlags::HEADQUE | LockFlags::NOORDER) {
            return Err(RequestError::InvalidFlags(
                "EXPEDITE never queues: NOQUEUE, HEADQUE, NOORDER make no sense with it",
            ));
        }
    }
    let adopt_compatible = LockFlags::ADOPT | LockFlags::VALBLK | LockFlags::PERSISTENT;
    if flags.contains(LockFlags::ADOPT) && !adopt_compatible.contains(flags) {
        return Err(RequestError::InvalidFlags("ADOPT goes only with VALBLK and PERSISTENT"));
    }
    Ok(())
}

fn validate_convert_flags(from: Mode, to: Mode, flags: LockFlags) -> Result<(), RequestError> {
    validate_common_flags(flags)?;
    if flags.intersects(LockFlags::EXPEDITE | LockFlags::ADOPT) {
        return Err(RequestError::InvalidFlags("EXPEDITE and ADOPT apply to new requests"));
    }
    if flags.contains(LockFlags::CONVDEADLK | LockFlags::NOQUEUE) {
        return Err(RequestError::InvalidFlags("CONVDEADLK and NOQUEUE exclude each other"));
    }
    if flags.contains(LockFlags::QUECVT) && !from.quecvt_allowed(to) {
        return Err(RequestError::QuecvtNotAllowed { from, to });
    }
    Ok(())
}
