//! What the cluster layer asks of a node's engine beyond a single node's
//! needs: which resources were freed (to give up mastership), fencing-token
//! floors, wait-for edges for deadlock detection across nodes, and
//! checking a request before it is sent to a remote master.

use super::Node;
use crate::deadlock::{Edge, WaitRef};
use crate::effect::Status;
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::lockspace::Lockspace;
use crate::mode::Mode;
use crate::request::RequestError;
use crate::time::Instant;

impl Node {
    /// Records the names of resources freed from now on, for
    /// [`Node::drain_released`] (a cluster node releases its mastership of
    /// a resource some time after it is freed).
    pub fn track_released(&mut self, on: bool) {
        self.out.track_released = on;
    }

    /// The resources freed since the last call (when tracked).
    pub fn drain_released(&mut self) -> std::vec::Drain<'_, (LockspaceId, Box<[u8]>)> {
        self.out.released.drain(..)
    }

    /// Whether the lockspace has a resource of that name (one with a lock).
    #[must_use]
    pub fn resource_exists(&self, id: LockspaceId, name: &[u8]) -> bool {
        self.lockspaces.get(&id).is_some_and(|ls| ls.find_resource(name).is_some())
    }

    /// The last fencing token handed out in a lockspace.
    #[must_use]
    pub fn last_token(&self, id: LockspaceId) -> Option<u64> {
        self.lockspaces.get(&id).map(Lockspace::last_token)
    }

    /// Makes every later fencing token of the lockspace larger than `floor`:
    /// a cluster node that becomes master of a resource learns from the
    /// directory how far tokens went where the resource was mastered before.
    pub fn raise_token_floor(&mut self, id: LockspaceId, floor: u64) {
        if let Some(lockspace) = self.lockspaces.get_mut(&id) {
            lockspace.raise_token_floor(floor);
        }
    }

    /// Keeps `mode` in the way of conflicting requests on a resource for
    /// its lockspace's lock-delay from `since`: a cluster node does this for
    /// holds its recovery took without an unlock (see `lockspace/delay.rs`).
    pub fn delay_grants(&mut self, id: LockspaceId, name: &[u8], mode: Mode, since: Instant) {
        if let Some(lockspace) = self.lockspaces.get_mut(&id) {
            lockspace.delay_grants(name, mode, since);
        }
    }

    /// How many resources are held by a lock-delay, in every lockspace.
    #[must_use]
    pub fn delayed_resources(&self) -> usize {
        self.lockspaces.values().map(|ls| ls.delays.len()).sum()
    }

    /// The lock-delay of a lockspace.
    #[must_use]
    pub fn lock_delay(&self, id: LockspaceId) -> Option<std::time::Duration> {
        self.lockspaces.get(&id).map(|ls| ls.config.lock_delay)
    }

    /// Every wait-for edge on this node, with the session each leaves (for
    /// deadlock detection across nodes).
    #[must_use]
    pub fn wait_edges(&self) -> Vec<(SessionId, Edge)> {
        let mut edges = Vec::new();
        for lockspace in self.lockspaces.values() {
            lockspace.all_wait_edges(&mut edges);
        }
        edges
    }

    /// Fails a pending request with [`Status::Deadlock`] if it is still the
    /// wait `wait` names (same lock, same start of waiting); true if it was.
    pub fn abort_wait(&mut self, now: Instant, wait: WaitRef) -> bool {
        let Some(lockspace) = self.lockspaces.get_mut(&wait.lockspace) else { return false };
        if !lockspace.is_waiting(wait) {
            return false;
        }
        lockspace.abort_pending(&mut self.out, wait.lock, Status::Deadlock);
        self.finish(now);
        true
    }

    /// Whether any request is waiting, in any lockspace.
    #[must_use]
    pub fn has_waiters(&self) -> bool {
        self.lockspaces.values().any(|ls| !ls.waiting_by_session.is_empty())
    }

    /// The open sessions, by id.
    #[must_use]
    pub fn session_ids(&self) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// A session's locks here, by handle.
    #[must_use]
    pub fn session_handles(&self, session: SessionId) -> Vec<LockHandle> {
        let mut handles: Vec<LockHandle> =
            self.sessions.get(&session).map(|s| s.locks.keys().copied().collect()).unwrap_or_default();
        handles.sort_unstable();
        handles
    }

    /// Whether `from` waits, now, through `edge.wait`, for `edge.to`, with
    /// the very blocker `edge.blocker` in the way (whether or not
    /// [`Node::wait_edges`] lists that edge: it omits a holder that the
    /// request ahead already waits for).
    #[must_use]
    pub fn has_wait_edge(&self, from: SessionId, edge: &Edge) -> bool {
        self.lockspaces.get(&edge.wait.lockspace).is_some_and(|ls| ls.has_wait_edge(from, edge))
    }

    /// Whether `from` waits, now, through `wait`, for any lock of `to`.
    #[must_use]
    pub fn waits_for(&self, from: SessionId, wait: &WaitRef, to: SessionId) -> bool {
        self.lockspaces.get(&wait.lockspace).is_some_and(|ls| ls.waits_for(from, wait, to))
    }

    /// Whether a session is open.
    #[must_use]
    pub fn has_session(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// How many locks a session has here.
    #[must_use]
    pub fn session_lock_count(&self, session: SessionId) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.locks.len())
    }

    /// Checks a new lock request as [`Node::handle_client`] would, without
    /// carrying it out (a cluster node checks requests it sends to a remote master).
    ///
    /// # Errors
    /// What `handle_client` would reject the request with.
    pub fn validate_lock(&self, req: &crate::LockRequest) -> Result<(), RequestError> {
        let lockspace = self.lockspaces.get(&req.lockspace).ok_or(RequestError::UnknownLockspace)?;
        lockspace.validate_lock(&self.config.limits, req)
    }

    /// Checks a conversion of a lock held in `from`, as [`Node::validate_lock`] does.
    ///
    /// # Errors
    /// What `handle_client` would reject the request with.
    pub fn validate_convert(
        &self,
        id: LockspaceId,
        from: crate::Mode,
        req: &crate::ConvertRequest,
    ) -> Result<(), RequestError> {
        let lockspace = self.lockspaces.get(&id).ok_or(RequestError::UnknownLockspace)?;
        lockspace.validate_convert(&self.config.limits, from, req)
    }

    /// Checks an unlock, as [`Node::validate_lock`] does.
    ///
    /// # Errors
    /// What `handle_client` would reject the request with.
    pub fn validate_unlock(&self, id: LockspaceId, req: &crate::UnlockRequest) -> Result<(), RequestError> {
        let lockspace = self.lockspaces.get(&id).ok_or(RequestError::UnknownLockspace)?;
        lockspace.validate_unlock(req)
    }

    /// The name of a lockspace.
    #[must_use]
    pub fn lockspace_name(&self, id: LockspaceId) -> Option<&[u8]> {
        self.lockspaces.get(&id).map(|ls| &*ls.name)
    }
}
