//! The grant rules of a resource: what may be granted now (the VMS rules
//! the Linux DLM keeps), granting with its token and value block, failing
//! and completing pending requests, demoting.

use crate::effect::{Completion, Effect, Op, Status};
use crate::flags::{LockFlags, StatusFlags};
use crate::ids::FencingToken;
use crate::lock::LockState;
use crate::lockspace::{Grant, Lockspace};
use crate::mode::{LvbAction, Mode};
use crate::outbox::Outbox;

impl Lockspace {
    /// Whether the lock may be granted `mode` now. `now` is true while its
    /// request is first processed, false when it is reconsidered from a queue;
    /// the rules are the VMS ones the Linux DLM keeps (`_can_be_granted`).
    pub(super) fn grantable(&self, l: u32, mode: Mode, now: bool) -> bool {
        let lock = &self.locks[l];
        let resource = &self.resources[lock.resource];
        let converting = lock.granted.is_some();
        // EXPEDITE is validated to be a new NL request, compatible with
        // everything: it skips the queue.
        if lock.flags.contains(LockFlags::EXPEDITE) && !converting {
            return true;
        }
        if self.delays.blocks(&resource.name, mode) {
            return false;
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
    pub(super) fn grant_mode(&self, l: u32, now: bool) -> Option<Grant> {
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
    pub(super) fn conversion_deadlock(&self, l: u32) -> bool {
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
    pub(super) fn grant_pending(&mut self, out: &mut Outbox, r: u32) {
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
    pub(super) fn settle(&mut self, out: &mut Outbox, r: u32, changed_holders_or_queue: bool) {
        let grants_before = out.grants;
        self.grant_pending(out, r);
        if self.resources[r].queued > 0 && (changed_holders_or_queue || out.grants != grants_before) {
            self.notify_blocking_holders(out, r);
        }
        self.free_if_unused(out, r);
    }

    pub(super) fn grant(&mut self, out: &mut Outbox, l: u32, grant: Grant, lvb_in: Option<&[u8]>) {
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
    pub(super) fn fail_pending(&mut self, out: &mut Outbox, l: u32, status: Status) {
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
    pub(super) fn complete_convert(&mut self, out: &mut Outbox, l: u32, status: Status) {
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
    pub(super) fn demote(&mut self, l: u32) {
        let lock = &mut self.locks[l];
        let held = lock.granted.expect("only granted locks are demoted");
        lock.granted = Some(Mode::Nl);
        lock.status.insert(StatusFlags::DEMOTED);
        let resource = &mut self.resources[lock.resource];
        resource.held.remove(held);
        resource.held.add(Mode::Nl);
    }
}
