//! The wait-for edges of a lockspace, which deadlock detection searches.

use crate::deadlock::{Blocker, Edge, WaitRef};
use crate::flags::LockFlags;
use crate::ids::SessionId;
use crate::lock::LockState;
use crate::lockspace::Lockspace;

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
}
