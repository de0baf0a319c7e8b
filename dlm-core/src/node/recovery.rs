//! The engine's part in a cluster's recovery (see [`crate::cluster`]): what
//! a master does to its queues while the cluster rebuilds them, and what a
//! node that fenced itself does to its clients' locks.

use crate::effect::{RevokeReason, Status};
use crate::flags::LockFlags;
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::lockspace::Lockspace;
use crate::mode::{Mode, ModeSet};
use crate::node::{LockRef, Node};
use crate::request::RequestError;
use crate::time::Instant;

impl Node {
    /// Removes every lock (orphans excepted) of the sessions `purge` selects,
    /// in every lockspace, granting nothing and freeing no resource until
    /// [`Node::recovery_settle`]. A PW or EX holder removed for which
    /// `suspect` says true marks its resource's value block not valid, and
    /// every holder it says true of stays in the way of conflicting requests
    /// for its lockspace's lock-delay from `now`.
    /// Returns the PW and EX holders removed that `suspect` spared, as
    /// (session, handle, lockspace, resource name): if one of them does not
    /// come back and its node departs, its value block is suspect too.
    pub fn recovery_purge(
        &mut self,
        now: Instant,
        purge: impl Fn(SessionId) -> bool,
        suspect: impl Fn(SessionId) -> bool,
    ) -> Vec<(SessionId, LockHandle, LockspaceId, Box<[u8]>)> {
        let mut spared = Vec::new();
        for (&id, lockspace) in &mut self.lockspaces {
            let mut here = Vec::new();
            lockspace.recovery_purge(&mut self.out, now, &purge, &suspect, &mut here);
            spared.extend(here.into_iter().map(|(session, handle, name)| (session, handle, id, name)));
        }
        self.apply_freed();
        spared
    }

    /// Removes one lock of an open session as [`Node::recovery_purge`]
    /// removes the locks it selects, its node not suspect (a lock about to
    /// come back in another form, or one its node no longer has). Returns
    /// it, as it was, if there was one; a PW or EX holder is returned in
    /// `spared` too (see [`Node::recovery_purge`]).
    pub fn recovery_remove_lock(
        &mut self,
        now: Instant,
        session: SessionId,
        handle: LockHandle,
        spared: &mut Vec<(SessionId, LockHandle, LockspaceId, Box<[u8]>)>,
    ) -> Option<crate::LockInfo> {
        let lock = *self.sessions.get(&session)?.locks.get(&handle)?;
        let lockspace = self.lockspaces.get_mut(&lock.lockspace)?;
        let info = lockspace.lock_info(lock.lock)?;
        let mut here = Vec::new();
        lockspace.recovery_remove(&mut self.out, now, lock.lock, &|_| false, &mut here);
        spared.extend(here.into_iter().map(|(session, handle, name)| (session, handle, lock.lockspace, name)));
        self.apply_freed();
        Some(info)
    }

    /// Every lock of an open session (an orphan is no longer its session's),
    /// with its lockspace and resource name, handed to `each`.
    pub fn for_each_session_lock(
        &self,
        session: SessionId,
        mut each: impl FnMut(LockspaceId, &[u8], &crate::LockInfo),
    ) {
        let Some(owner) = self.sessions.get(&session) else { return };
        for lock in owner.locks.values() {
            let Some(lockspace) = self.lockspaces.get(&lock.lockspace) else { continue };
            let Some(info) = lockspace.lock_info(lock.lock) else { continue };
            each(lock.lockspace, lockspace.resource_name_of(lock.lock), &info);
        }
    }

    /// Adds back a granted lock of an open session (see
    /// [`Node::recovery_purge`]): granted `mode` under fencing `token`, with
    /// nothing granted to anyone until [`Node::recovery_settle`].
    ///
    /// # Errors
    /// Unknown session or lockspace, or the handle is in use.
    #[allow(clippy::too_many_arguments)]
    pub fn recover_lock(
        &mut self,
        session: SessionId,
        handle: LockHandle,
        id: LockspaceId,
        name: &[u8],
        mode: Mode,
        token: u64,
        flags: LockFlags,
    ) -> Result<(), RequestError> {
        let owner = self.sessions.get_mut(&session).ok_or(RequestError::UnknownSession)?;
        if owner.locks.contains_key(&handle) {
            return Err(RequestError::HandleInUse);
        }
        let lockspace = self.lockspaces.get_mut(&id).ok_or(RequestError::UnknownLockspace)?;
        let lock = lockspace.recover_granted(&mut self.out, session, handle, name, mode, token, flags);
        owner.locks.insert(handle, LockRef { lockspace: id, lock });
        Ok(())
    }

    /// Decides the mode of a lock added back whose conversion in flight may
    /// have left it in one of `or_modes` instead: it keeps its mode unless
    /// that conflicts with a lock granted beside it (which says the
    /// conversion was made), and then takes the strongest of `or_modes`
    /// compatible with them all.
    pub fn recovery_decide_mode(&mut self, id: LockspaceId, session: SessionId, handle: LockHandle, or_modes: ModeSet) {
        let Some(lock) = self.sessions.get(&session).and_then(|owner| owner.locks.get(&handle)).copied() else {
            return;
        };
        if let Some(lockspace) = self.lockspaces.get_mut(&id)
            && lock.lockspace == id
        {
            lockspace.recovery_decide_mode(lock.lock, or_modes);
        }
    }

    /// Sets a recovered resource's value block: the bytes a holder read, or
    /// (`None`) not valid.
    pub fn recovery_set_lvb(&mut self, id: LockspaceId, name: &[u8], lvb: Option<&[u8]>) {
        if let Some(lockspace) = self.lockspaces.get_mut(&id) {
            lockspace.recovery_set_lvb(name, lvb);
        }
    }

    /// Ends recovery on this engine: every resource grants what it can, sends
    /// the blocking callbacks that are due (again), and goes if unused.
    pub fn recovery_settle(&mut self, now: Instant) {
        for lockspace in self.lockspaces.values_mut() {
            lockspace.recovery_settle(&mut self.out);
        }
        self.finish(now);
    }

    /// Drops every lock of every lockspace, keeping the lockspaces and their
    /// token counters (tokens never go backwards on a node): pending
    /// requests complete with `status` (a node fencing itself:
    /// [`Status::Fenced`]), granted locks are revoked for `reason`, orphans
    /// go silently. Effects name every session, other nodes' included: the
    /// caller keeps the ones it serves.
    pub fn fence(&mut self, status: Status, reason: RevokeReason) {
        let ids: Vec<LockspaceId> = self.lockspaces.keys().copied().collect();
        for id in ids {
            let old = self.lockspaces.get_mut(&id).expect("listed above");
            old.drop_all(&mut self.out, status, reason);
            self.out.locks -= u64::from(old.locks.len());
            let mut fresh = Lockspace::new(id, old.name.clone(), old.config);
            fresh.raise_token_floor(old.last_token());
            *old = fresh;
        }
        self.apply_freed();
    }
}
