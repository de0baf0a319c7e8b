//! Queues and bookkeeping: waiting with its deadline and the per-session
//! index, releasing and destroying locks, the value block's bytes.

use crate::flags::LockFlags;
use crate::lock::LockState;
use crate::lockspace::Lockspace;
use crate::outbox::Outbox;
use crate::time::Instant;

impl Lockspace {
    pub(super) fn start_wait(&mut self, out: &mut Outbox, now: Instant, l: u32, timeout: Option<std::time::Duration>) {
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
    pub(super) fn stop_wait(&mut self, l: u32) {
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
    pub(super) fn release(&mut self, out: &mut Outbox, l: u32) {
        let lock = &self.locks[l];
        let r = lock.resource;
        let held = lock.granted.expect("release of a granted lock");
        let resource = &mut self.resources[r];
        resource.granted.remove(&mut self.locks, l);
        resource.held.remove(held);
        self.destroy(out, l);
    }

    /// Frees a lock that is on no queue and tells the node its handle is free.
    pub(super) fn destroy(&mut self, out: &mut Outbox, l: u32) {
        let lock = self.locks.remove(l);
        out.locks -= 1;
        if !lock.orphan {
            out.freed.push((lock.session, lock.handle));
        }
    }

    pub(super) fn write_lvb(&mut self, r: u32, bytes: &[u8]) {
        let len = self.config.lvb_len;
        let resource = &mut self.resources[r];
        let lvb = resource.lvb.get_or_insert_with(|| vec![0; len].into_boxed_slice());
        lvb.fill(0);
        lvb[..bytes.len()].copy_from_slice(bytes);
        resource.lvb_invalid = false;
    }
}
