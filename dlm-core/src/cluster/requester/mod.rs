//! The requester role: this node's clients' locks on resources mastered
//! elsewhere. For each, this node keeps its own copy (master, mode, token,
//! the request in flight), which is what recovery rebuilds a master from; it
//! looks masters up at the directory, remembers them in a cache, sends the
//! requests, and turns the master's answers into completions for its clients.
//!
//! [`Requester`] (in `copies`) is the state; the `ClusterNode` methods
//! below are the handlers of client requests for remote locks and of the
//! answers.

use crate::cluster::directory::{Answer, Mastership};
use crate::cluster::message::{NodeId, PeerMessage};
use crate::cluster::{ClusterNode, Key, ended};
use crate::effect::{Completion, Effect, Op, Status};
use crate::flags::{LockFlags, StatusFlags, UnlockFlags};
use crate::ids::{LockHandle, SessionId};
use crate::limits::Limit;
use crate::mode::Mode;
use crate::request::{ClientRequest, ConvertRequest, LockRequest, RequestError, UnlockRequest};
use crate::time::Instant;

mod copies;
use copies::LockKey;
pub(super) use copies::{RemoteLock, Requester};

impl ClusterNode {
    pub(super) fn client_lock(
        &mut self,
        now: Instant,
        session: SessionId,
        req: LockRequest,
    ) -> Result<(), RequestError> {
        if self.requester.get(session, req.handle).is_some() || self.engine.lock_info(session, req.handle).is_some() {
            return Err(RequestError::HandleInUse);
        }
        let held = self.engine.session_lock_count(session) + self.requester.count_of(session) as usize;
        if held >= self.config.engine.limits.locks_per_session_max as usize {
            return Err(RequestError::LimitExceeded(Limit::LocksPerSession));
        }
        self.engine.validate_lock(&req)?;
        let key: Key = (req.lockspace, req.name.clone().into_boxed_slice());
        if self.masters.mark_in_use(&key) {
            return self.lock_here(now, session, req);
        }
        let directory = self.directory_of(&key);
        if directory == self.config.node {
            let master = self.directory.claim(key.clone(), self.config.node);
            if master.0 == self.config.node {
                self.become_master(now, key, master.1);
                return self.lock_here(now, session, req);
            }
            self.requester.cache_master(key.clone(), master, self.config.master_cache_max);
        }
        let handle = req.handle;
        let copy = RemoteLock {
            lockspace: req.lockspace,
            name: key.1.clone(),
            master: None,
            master_term: 0,
            granted: None,
            requested: req.mode,
            token: None,
            pending: Some(Op::Lock),
            flags: req.flags,
            request: Some(req),
            abandoned: false,
            resend: None,
            cancel_sent: false,
            forced_over: None,
            lvb: None,
        };
        match self.requester.cache.get(&key).copied() {
            Some(master) if self.can_wait_for(master.0) => {
                self.requester.insert(session, handle, copy);
                self.send_request(now, session, handle, master);
            }
            Some(_) => self.fail_unavailable(session, handle),
            None if !self.can_wait_for(directory) => self.fail_unavailable(session, handle),
            None => {
                self.requester.insert(session, handle, copy);
                self.start_lookup(now, key, session, handle, None);
            }
        }
        Ok(())
    }

    fn fail_unavailable(&mut self, session: SessionId, handle: LockHandle) {
        self.effects.push_back(Effect::Complete(ended(session, handle, Op::Lock, Status::Unavailable, None)));
    }

    /// A local client's request refused (by a master, or for want of the
    /// lockspace there). The reason does not travel: the status says refused.
    fn complete_rejected(&mut self, session: SessionId, handle: LockHandle) {
        self.effects.push_back(Effect::Complete(ended(session, handle, Op::Lock, Status::Rejected, None)));
    }

    fn start_lookup(
        &mut self,
        now: Instant,
        key: Key,
        session: SessionId,
        handle: LockHandle,
        stale: Option<Mastership>,
    ) {
        if let Some(waiting) = self.requester.lookups.get_mut(&key) {
            waiting.push((session, handle));
            return;
        }
        self.requester.lookups.insert(key.clone(), vec![(session, handle)]);
        let directory = self.directory_of(&key);
        let lockspace = self.lockspace_name(key.0);
        self.stats.lookups += 1;
        self.send(now, directory, PeerMessage::Lookup { lockspace, name: key.1.to_vec(), stale });
    }

    fn send_request(&mut self, now: Instant, session: SessionId, handle: LockHandle, master: Mastership) {
        let Some(lock) = self.requester.locks.get_mut(&(session, handle)) else { return };
        let Some(req) = lock.request.clone() else { return };
        lock.master = Some(master.0);
        lock.master_term = master.1;
        let lockspace = self.lockspace_name(req.lockspace);
        self.stats.remote_requests += 1;
        self.send(
            now,
            master.0,
            PeerMessage::Request {
                lockspace,
                session,
                handle,
                name: req.name,
                mode: req.mode,
                flags: req.flags,
                timeout: req.timeout,
            },
        );
    }

    pub(super) fn remote_convert(
        &mut self,
        now: Instant,
        session: SessionId,
        lock: RemoteLock,
        req: ConvertRequest,
    ) -> Result<(), RequestError> {
        // A copy with nothing pending is granted and has a master; a copy
        // that is not (which would be a bug) is treated as busy, not trusted.
        let (None, Some(from), Some(master)) = (lock.pending, lock.granted, lock.master) else {
            return Err(RequestError::Pending);
        };
        self.engine.validate_convert(lock.lockspace, from, &req)?;
        if !self.can_wait_for(master) {
            self.effects.push_back(Effect::Complete(ended(
                session,
                req.handle,
                Op::Convert,
                Status::Unavailable,
                Some(from),
            )));
            return Ok(());
        }
        if let Some(copy) = self.requester.locks.get_mut(&(session, req.handle)) {
            copy.pending = Some(Op::Convert);
            copy.requested = req.mode;
            let persistent =
                if copy.flags.contains(LockFlags::PERSISTENT) { LockFlags::PERSISTENT } else { LockFlags::EMPTY };
            copy.flags = req.flags | persistent;
            copy.resend = Some(ClientRequest::Convert(req.clone()));
        }
        self.stats.remote_requests += 1;
        let ConvertRequest { handle, mode, flags, lvb, timeout } = req;
        self.send(now, master, PeerMessage::Convert { session, handle, mode, flags, lvb, timeout });
        Ok(())
    }

    pub(super) fn remote_unlock(
        &mut self,
        now: Instant,
        session: SessionId,
        lock: RemoteLock,
        req: UnlockRequest,
    ) -> Result<(), RequestError> {
        if lock.abandoned {
            // The client was told this lock failed; it is being undone.
            return Err(RequestError::UnknownHandle);
        }
        let force = req.flags.contains(UnlockFlags::FORCE);
        if lock.pending.is_some() && !force {
            return Err(RequestError::Pending);
        }
        self.engine.validate_unlock(lock.lockspace, &req)?;
        let Some(master) = lock.master else {
            // A new lock still looking for its master: nothing exists remotely.
            self.requester.remove(session, req.handle);
            for (op, status) in [(Op::Lock, Status::Cancelled), (Op::Unlock, Status::Unlocked)] {
                self.effects.push_back(Effect::Complete(ended(session, req.handle, op, status, None)));
            }
            return Ok(());
        };
        if let Some(copy) = self.requester.locks.get_mut(&(session, req.handle)) {
            copy.forced_over = copy.pending;
            copy.pending = Some(Op::Unlock);
            copy.resend = Some(ClientRequest::Unlock(req.clone()));
        }
        self.stats.remote_requests += 1;
        let UnlockRequest { handle, flags, lvb } = req;
        self.send(now, master, PeerMessage::Unlock { session, handle, flags, lvb });
        Ok(())
    }

    pub(super) fn remote_cancel(
        &mut self,
        now: Instant,
        session: SessionId,
        handle: LockHandle,
        lock: RemoteLock,
    ) -> Result<(), RequestError> {
        if lock.abandoned {
            return Err(RequestError::UnknownHandle);
        }
        if lock.pending.is_none() {
            return Err(RequestError::NotPending);
        }
        match lock.master {
            None => {
                self.requester.remove(session, handle);
                self.effects.push_back(Effect::Complete(ended(session, handle, Op::Lock, Status::Cancelled, None)));
            }
            Some(master) => {
                if let Some(copy) = self.requester.locks.get_mut(&(session, handle)) {
                    copy.cancel_sent = true;
                }
                self.stats.remote_requests += 1;
                self.send(now, master, PeerMessage::Cancel { session, handle });
            }
        }
        Ok(())
    }

    /// The link to `peer` went down: new locks waiting for it (as master, or
    /// as directory) fail as unavailable; what the peer makes later of the
    /// requests it was sent is undone.
    pub(super) fn strand_requests_of(&mut self, peer: NodeId) {
        let mut stranded: Vec<LockKey> = self
            .requester
            .locks
            .iter()
            .filter(|(_, l)| l.pending == Some(Op::Lock) && !l.abandoned && l.master == Some(peer))
            .map(|(&k, _)| k)
            .collect();
        // Requests waiting for a lookup from the peer as directory fail; the
        // lookup itself stays outstanding (its answer, when the peer is
        // back, may make this node master, which it must then take).
        let mut lookups: Vec<Key> =
            self.requester.lookups.keys().filter(|k| self.directory_of(k) == peer).cloned().collect();
        // In key order: the failures reach the clients in an order that does
        // not depend on the hash map's (randomly seeded) layout.
        lookups.sort_unstable();
        for key in lookups {
            let waiters = self.requester.lookups.get_mut(&key).map(std::mem::take).unwrap_or_default();
            for waiting in waiters {
                if self.requester.locks.get(&waiting).is_some_and(|l| l.master.is_none()) {
                    self.requester.remove(waiting.0, waiting.1);
                    self.fail_unavailable(waiting.0, waiting.1);
                }
            }
        }
        stranded.sort_unstable();
        for (session, handle) in stranded {
            let Some(lock) = self.requester.locks.get_mut(&(session, handle)) else { continue };
            lock.abandoned = true;
            self.fail_unavailable(session, handle);
        }
        self.requester.cache.retain(|_, master| master.0 != peer);
    }

    pub(super) fn on_lookup_reply(
        &mut self,
        now: Instant,
        lockspace: Vec<u8>,
        name: Vec<u8>,
        master: Option<Mastership>,
        floor: u64,
    ) {
        let Some(id) = self.engine.lockspace_id(&lockspace) else { return };
        let key: Key = (id, name.into_boxed_slice());
        // Each lookup has one answer, in order: an answer with no lookup
        // outstanding is not ours to act on.
        let Some(waiting) = self.requester.lookups.remove(&key) else { return };
        match master {
            Some((master, term)) if master == self.config.node => {
                // The directory recorded this node as master: take it even
                // if nobody waits any more (it is released when idle).
                self.engine.raise_token_floor(id, floor);
                self.become_master(now, key.clone(), term);
                for (session, handle) in waiting {
                    if !self.requester.awaits_lookup(session, handle, &key) {
                        continue;
                    }
                    let Some(RemoteLock { request: Some(request), .. }) = self.requester.remove(session, handle) else {
                        continue;
                    };
                    if self.lock_here(now, session, request).is_err() {
                        self.complete_rejected(session, handle);
                    }
                }
                for (from, request) in self.masters.take_early(&key) {
                    self.on_request(now, from, request);
                }
                if !self.engine.resource_exists(id, &key.1) {
                    self.mark_idle(now, key);
                }
            }
            Some(master) => {
                self.requester.cache_master(key.clone(), master, self.config.master_cache_max);
                for (session, handle) in waiting {
                    if self.requester.awaits_lookup(session, handle, &key) {
                        self.send_request(now, session, handle, master);
                    }
                }
                self.return_early_requests(now, &key);
            }
            None => {
                for (session, handle) in waiting {
                    if self.requester.awaits_lookup(session, handle, &key) {
                        self.requester.remove(session, handle);
                        self.complete_rejected(session, handle);
                    }
                }
                // Requests held for it go back to their nodes, which ask
                // the directory themselves.
                self.return_early_requests(now, &key);
            }
        }
    }

    pub(super) fn on_not_master(&mut self, now: Instant, from: NodeId, session: SessionId, handle: LockHandle) {
        let Some(lock) = self.requester.locks.get_mut(&(session, handle)) else { return };
        if lock.master != Some(from) || lock.pending != Some(Op::Lock) {
            return;
        }
        self.stats.stale_masters += 1;
        let stale = (from, lock.master_term);
        lock.master = None;
        let key: Key = (lock.lockspace, lock.name.clone());
        if lock.abandoned {
            self.requester.remove(session, handle);
            return;
        }
        if self.requester.cache.get(&key) == Some(&stale) {
            self.requester.cache.remove(&key);
        }
        if self.masters.contains(&key) {
            // This node took mastership meanwhile.
            self.run_here(now, session, handle);
            return;
        }
        if let Some(waiting) = self.requester.lookups.get_mut(&key) {
            // A lookup is out already: its answer serves this request too.
            waiting.push((session, handle));
            return;
        }
        if self.directory_of(&key) != self.config.node {
            self.start_lookup(now, key, session, handle, Some(stale));
            return;
        }
        // This node is the directory. An entry still naming the stale
        // mastership goes when its node's Remove arrives, which answers the
        // lookups held meanwhile.
        match self.directory.lookup(key.clone(), self.config.node, Some(stale), self.config.node) {
            Answer::Held => {
                self.requester.lookups.entry(key).or_default().push((session, handle));
            }
            Answer::Master(master) if master.0 == self.config.node => {
                self.become_master(now, key, master.1);
                self.run_here(now, session, handle);
            }
            Answer::Master(master) => {
                self.requester.cache_master(key, master, self.config.master_cache_max);
                self.send_request(now, session, handle, master);
            }
        }
    }

    /// Runs a local client's new lock, so far meant for a remote master, on
    /// the engine (this node masters its resource now).
    fn run_here(&mut self, now: Instant, session: SessionId, handle: LockHandle) {
        let Some(RemoteLock { request: Some(request), .. }) = self.requester.remove(session, handle) else { return };
        if self.lock_here(now, session, request).is_err() {
            self.complete_rejected(session, handle);
        }
    }

    pub(super) fn on_blocking(&mut self, from: NodeId, session: SessionId, handle: LockHandle, mode: Mode) {
        if self.requester.get(session, handle).is_some_and(|l| !l.abandoned && l.master == Some(from)) {
            self.effects.push_back(Effect::Blocking { session, handle, mode });
        }
    }

    pub(super) fn on_complete(&mut self, now: Instant, from: NodeId, completion: Completion) {
        let key = (completion.session, completion.handle);
        let Some(lock) = self.requester.locks.get_mut(&key) else { return };
        if lock.master != Some(from) {
            return;
        }
        if completion.op == Op::Unlock
            && completion.status == Status::Rejected
            && lock.granted.is_none()
            && lock.pending == Some(Op::Unlock)
        {
            // A forced unlock of a new lock reached a node that never had
            // it (a stale master: its "not master" came first and was left
            // for this). The request exists nowhere: both end here.
            let abandoned = lock.abandoned;
            self.requester.remove(completion.session, completion.handle);
            if !abandoned {
                for (op, status) in [(Op::Lock, Status::Cancelled), (Op::Unlock, Status::Unlocked)] {
                    let done = ended(completion.session, completion.handle, op, status, None);
                    self.effects.push_back(Effect::Complete(done));
                }
            }
            return;
        }
        // A forced unlock of a pending request ends that request first,
        // then the lock: keep the copy for the second completion.
        let unlock_follows = lock.pending == Some(Op::Unlock) && completion.op != Op::Unlock;
        if !unlock_follows {
            lock.pending = None;
            lock.resend = None;
            lock.cancel_sent = false;
            lock.forced_over = None;
        }
        if completion.mode.is_some() {
            lock.granted = completion.mode;
        }
        if completion.status == Status::Granted {
            lock.request = None;
            lock.token = completion.token;
            // A value read as not valid is not one recovery may hand on.
            let valid = !completion.flags.contains(StatusFlags::VALNOTVALID);
            lock.lvb = completion.lvb.as_deref().filter(|_| valid).map(Box::from);
        }
        let gone = completion.mode.is_none() && !unlock_follows;
        let abandoned = lock.abandoned;
        if gone {
            self.requester.remove(completion.session, completion.handle);
        }
        if abandoned {
            // The client was told this request failed: undo what the master did.
            if completion.status == Status::Granted {
                if let Some(lock) = self.requester.locks.get_mut(&key) {
                    lock.pending = Some(Op::Unlock);
                }
                self.send(
                    now,
                    from,
                    PeerMessage::Unlock {
                        session: completion.session,
                        handle: completion.handle,
                        flags: UnlockFlags::FORCE,
                        lvb: None,
                    },
                );
            }
            return;
        }
        self.effects.push_back(Effect::Complete(completion));
    }
}

#[cfg(test)]
mod tests;
