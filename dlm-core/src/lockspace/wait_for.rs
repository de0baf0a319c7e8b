//! The wait-for edges of a lockspace, which deadlock detection searches.

use crate::deadlock::{Blocker, Edge, WaitRef};
use crate::flags::LockFlags;
use crate::ids::SessionId;
use crate::lock::LockState;
use crate::lockspace::Lockspace;
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
            for g in resource.granted.iter(&self.locks) {
                if self.locks[g].granted.is_some_and(|held| !held.compatible(wants)) {
                    push(g);
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
            let ordered = !waiter.flags.contains(LockFlags::NOORDER);
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

    /// Walks a queue towards its head from `from`, pushing each request,
    /// up to and including the first ordered one that is not an orphan
    /// (which waits for the rest itself). Whether there was one.
    fn push_until_ordered(&self, mut from: u32, push: &mut impl FnMut(u32)) -> bool {
        while from != NIL {
            let lock = &self.locks[from];
            push(from);
            if !lock.orphan && !lock.flags.contains(LockFlags::NOORDER) {
                return true;
            }
            from = lock.prev;
        }
        false
    }
}
