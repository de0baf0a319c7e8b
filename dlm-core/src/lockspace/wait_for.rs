//! The wait-for edges of a lockspace, which deadlock detection searches.

use crate::deadlock::{Blocker, Edge, WaitRef};
use crate::flags::LockFlags;
use crate::ids::SessionId;
use crate::lock::LockState;
use crate::lockspace::Lockspace;
use crate::mode::{ALL_MODES, Mode};
use crate::slab::NIL;

impl Lockspace {
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
                let lock = &self.locks[other];
                if !lock.orphan && lock.session != session {
                    let blocker = Blocker { lock: other, token: lock.token, seq: lock.wait_seq };
                    edges.push(Edge { to: lock.session, wait: waits, blocker });
                }
            };
            // The holders in the way. When the ordered request just ahead
            // conflicts with every mode this one does, it has an edge to (or
            // a path to) each of those holders itself: this one reaches them
            // through it, and N waiters behind H holders keep N + H edges,
            // not N × H (a herd of writers behind many readers).
            let covered = ordered_ahead(self, w).is_some_and(|a| covers(self.locks[a].requested, wants));
            if !covered {
                for g in resource.granted.iter(&self.locks) {
                    if self.locks[g].granted.is_some_and(|held| !held.compatible(wants)) {
                        push(g);
                    }
                }
            }
            // Queue order binds too (see `grantable`): a conversion waits for
            // the conversions ahead of it, a new request for every conversion
            // and the new requests ahead of it, compatible or not, unless
            // NOORDER lets it pass them. An edge to each of them would make a
            // queue of N waiters N²/2 edges, and every new waiter's search
            // walk them all; an edge to the nearest ordered request ahead is
            // enough, since that one waits in turn for everything ahead of it
            // (requests passed on the way, NOORDER ones or orphans, which
            // wait for nothing in order, get an edge of their own). The head
            // of the waiting queue waits for every conversion.
            let ordered = is_ordered(waiter.flags);
            for c in resource.converting.iter(&self.locks) {
                if c != w && self.locks[c].granted.is_some_and(|held| !held.compatible(wants)) {
                    push(c);
                }
            }
            if !ordered {
                continue;
            }
            let chained = self.push_until_ordered(waiter.prev, &mut push);
            if waiter.state == LockState::Waiting && !chained {
                let mut c = resource.converting.head;
                while c != NIL {
                    push(c);
                    c = self.locks[c].next;
                }
            }
        }
    }

    /// Whether `from` waits, now, through `edge.wait`, for `edge.to`, with
    /// `edge.blocker` in the way, by the full rule (granted in a conflicting
    /// mode, or ahead in queue order) that [`Lockspace::wait_edges`] keeps
    /// in compressed form: a wait that reaches a holder through the request
    /// ahead of it has no edge of its own to that holder, yet waits for it.
    pub(crate) fn has_wait_edge(&self, from: SessionId, edge: &Edge) -> bool {
        let Some(w) = self.pending_wait(from, &edge.wait) else { return false };
        self.locks
            .get(edge.blocker.lock)
            .is_some_and(|b| b.session == edge.to && b.token == edge.blocker.token && b.wait_seq == edge.blocker.seq)
            && self.in_the_way(w, edge.blocker.lock)
    }

    /// Whether `from` waits, now, through `wait`, for any lock of `to`, by
    /// the full rule (see [`Lockspace::has_wait_edge`]).
    pub(crate) fn waits_for(&self, from: SessionId, wait: &WaitRef, to: SessionId) -> bool {
        let Some(w) = self.pending_wait(from, wait) else { return false };
        let resource = &self.resources[self.locks[w].resource];
        [&resource.granted, &resource.converting, &resource.waiting]
            .into_iter()
            .flat_map(|queue| queue.iter(&self.locks))
            .any(|b| self.locks[b].session == to && self.in_the_way(w, b))
    }

    /// The waiting lock `wait` names, if it is `from`'s and still in that wait.
    fn pending_wait(&self, from: SessionId, wait: &WaitRef) -> Option<u32> {
        let lock = self.locks.get(wait.lock)?;
        (wait.lockspace == self.id && lock.session == from && lock.is_pending() && lock.wait_seq == wait.seq)
            .then_some(wait.lock)
    }

    /// Whether lock `b` keeps pending request `w` from being granted.
    fn in_the_way(&self, w: u32, b: u32) -> bool {
        let (waiter, lock) = (&self.locks[w], &self.locks[b]);
        if b == w || lock.orphan || lock.session == waiter.session || lock.resource != waiter.resource {
            return false;
        }
        let held = matches!(lock.state, LockState::Granted | LockState::Converting);
        if held && lock.granted.is_some_and(|mode| !mode.compatible(waiter.requested)) {
            return true;
        }
        if !is_ordered(waiter.flags) {
            return false;
        }
        match (waiter.state, lock.state) {
            (LockState::Waiting, LockState::Converting) => true,
            (LockState::Waiting, LockState::Waiting) | (LockState::Converting, LockState::Converting) => {
                let mut at = waiter.prev;
                while at != NIL && at != b {
                    at = self.locks[at].prev;
                }
                at == b
            }
            _ => false,
        }
    }

    /// Walks a queue towards its head from `from`, pushing each request,
    /// up to and including the first ordered one that is not an orphan
    /// (which waits for the rest itself). Whether there was one.
    fn push_until_ordered(&self, mut from: u32, push: &mut impl FnMut(u32)) -> bool {
        while from != NIL {
            let lock = &self.locks[from];
            push(from);
            if !lock.orphan && is_ordered(lock.flags) {
                return true;
            }
            from = lock.prev;
        }
        false
    }
}

fn is_ordered(flags: LockFlags) -> bool {
    !flags.contains(LockFlags::NOORDER)
}

/// The nearest request ahead of `w` in its queue that holds the requests
/// behind it in order (not an orphan, not `NOORDER`), if `w` is bound by
/// queue order at all.
fn ordered_ahead(lockspace: &Lockspace, w: u32) -> Option<u32> {
    if !is_ordered(lockspace.locks[w].flags) {
        return None;
    }
    let mut at = lockspace.locks[w].prev;
    while at != NIL {
        let lock = &lockspace.locks[at];
        if !lock.orphan && is_ordered(lock.flags) {
            return Some(at);
        }
        at = lock.prev;
    }
    None
}

/// Whether every mode that conflicts with `wants` conflicts with `ahead` too.
fn covers(ahead: Mode, wants: Mode) -> bool {
    ALL_MODES.iter().all(|&held| held.compatible(wants) || !held.compatible(ahead))
}
