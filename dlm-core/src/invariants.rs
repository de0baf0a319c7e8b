//! The invariants every resource keeps between events. The node checks the
//! cheap one on every touched resource always, all of them in debug builds
//! (on resources of at most `EVERY_EVENT_CHECK_LOCKS_MAX` locks); tests and
//! simulators check everything with `Node::check_invariants`.

use crate::lock::LockState;
use crate::lockspace::Lockspace;
use crate::mode::{ALL_MODES, ModeCounts};
use crate::slab::NIL;

/// Resources with more locks than this are not checked in full after every
/// event in debug builds (see `Node::check_touched`); `check_invariants`
/// still checks them whole.
#[cfg_attr(not(debug_assertions), allow(dead_code))] // the check runs in debug builds only
pub(crate) const EVERY_EVENT_CHECK_LOCKS_MAX: u32 = 4096;

/// No two incompatible modes are held at once. Constant time: it compares the
/// counted modes, not the locks.
pub(crate) fn held_modes_compatible(held: &ModeCounts) -> bool {
    for (i, &a) in ALL_MODES.iter().enumerate() {
        let count = held.get(a);
        if count == 0 {
            continue;
        }
        if count >= 2 && !a.compatible(a) {
            return false;
        }
        if ALL_MODES[i + 1..].iter().any(|&b| held.get(b) > 0 && !a.compatible(b)) {
            return false;
        }
    }
    true
}

impl Lockspace {
    /// Checks one resource: queue links, lock states, counts, compatibility,
    /// bookkeeping of pending requests, tokens.
    pub(crate) fn check_resource(&self, r: u32) -> Result<(), String> {
        let resource = self.resources.get(r).ok_or_else(|| format!("resource {r} does not exist"))?;
        let name = String::from_utf8_lossy(&resource.name);
        let fail = |what: String| Err(format!("resource {name:?}: {what}"));
        if self.find_resource(&resource.name) != Some(r) {
            return fail("not found by its name".into());
        }
        if resource.is_unused() {
            return fail("has no lock but was not freed".into());
        }
        let mut held = ModeCounts::default();
        let mut queued = 0u32;
        let queues = [
            (&resource.granted, LockState::Granted),
            (&resource.converting, LockState::Converting),
            (&resource.waiting, LockState::Waiting),
        ];
        for (queue, state) in queues {
            let mut prev = NIL;
            for l in queue.iter(&self.locks) {
                let lock = &self.locks[l];
                if lock.prev != prev {
                    return fail(format!("lock {l}: broken back link"));
                }
                prev = l;
                if lock.resource != r || lock.state != state {
                    return fail(format!("lock {l}: on the {state:?} queue in state {:?}", lock.state));
                }
                if lock.token > resource.last_token {
                    return fail(format!("lock {l}: token above the resource's last"));
                }
                match state {
                    LockState::Waiting if lock.granted.is_some() => {
                        return fail(format!("lock {l}: waiting but granted"));
                    }
                    LockState::Granted | LockState::Converting if lock.granted.is_none() => {
                        return fail(format!("lock {l}: held without a granted mode"));
                    }
                    _ => {}
                }
                if let Some(mode) = lock.granted {
                    held.add(mode);
                }
                if state != LockState::Granted {
                    queued += 1;
                    if lock.orphan {
                        return fail(format!("lock {l}: an orphan with a pending request"));
                    }
                    if !self.waiting_by_session.contains(&(lock.session, l)) {
                        return fail(format!("lock {l}: pending but not in the wait-for index"));
                    }
                    if let Some(deadline) = lock.deadline
                        && !self.deadlines.contains(&(deadline, l))
                    {
                        return fail(format!("lock {l}: deadline not scheduled"));
                    }
                } else if lock.deadline.is_some() {
                    return fail(format!("lock {l}: granted with a deadline"));
                }
            }
            if queue.tail != prev {
                return fail(format!("{state:?} queue: tail is not the last lock"));
            }
        }
        if held != resource.held {
            return fail(format!("held counts {:?}, locks say {held:?}", resource.held));
        }
        if queued != resource.queued {
            return fail(format!("queued count {}, queues hold {queued}", resource.queued));
        }
        if !held_modes_compatible(&held) {
            return fail(format!("incompatible modes held: {held:?}"));
        }
        Ok(())
    }

    /// Checks every resource, and that every lock is on one of their queues.
    pub(crate) fn check_all(&self) -> Result<(), String> {
        let mut on_queues = 0u32;
        for (r, resource) in self.resources.iter() {
            self.check_resource(r)?;
            on_queues += [&resource.granted, &resource.converting, &resource.waiting]
                .iter()
                .map(|queue| queue.iter(&self.locks).count() as u32)
                .sum::<u32>();
        }
        if on_queues != self.locks.len() {
            return Err(format!("{} locks, {on_queues} on queues", self.locks.len()));
        }
        let pending = self.locks.iter().filter(|(_, lock)| lock.is_pending()).count();
        if pending != self.waiting_by_session.len() {
            return Err(format!("{pending} pending locks, {} in the wait-for index", self.waiting_by_session.len()));
        }
        Ok(())
    }
}
