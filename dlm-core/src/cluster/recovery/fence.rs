//! A node outside the quorate view, and a node in recovery, as its clients
//! see them: a fenced node revokes everything and refuses new locks; a
//! recovering node holds requests until it is over.

use crate::cluster::recovery::Held;
use crate::cluster::{ClusterNode, Outcome, ended};
use crate::effect::{Effect, Op, RevokeReason, Status};
use crate::ids::SessionId;
use crate::limits::Limit;
use crate::request::{ClientRequest, RequestError};
use crate::time::Instant;

impl ClusterNode {
    /// Drops every lock and request of this node's clients, telling them
    /// (`status` for what was pending, `reason` for what was granted), and
    /// forgets the cluster's state: the other members recover without it.
    pub(in crate::cluster) fn fence_self(&mut self, now: Instant, status: Status, reason: RevokeReason) {
        // Sessions that ended while recovering hear nothing more.
        let held = std::mem::take(&mut self.views.held);
        let gone = std::mem::take(&mut self.views.ending);
        let silent = |session: SessionId| gone.contains(&session);
        self.engine.fence(status, reason);
        while let Some(effect) = self.engine.poll_effect() {
            let session = effect.session();
            if !self.masters.is_remote_session(session) && !silent(session) {
                self.effects.push_back(effect);
            }
        }
        for session in self.masters.start_recovery(|_| true) {
            let _ = self.engine.end_session(now, session);
        }
        for (session, handle) in self.requester.sorted_keys() {
            let Some(copy) = self.requester.get(session, handle) else { continue };
            if copy.abandoned || silent(session) {
                continue;
            }
            let mut tell = |op| self.effects.push_back(Effect::Complete(ended(session, handle, op, status, None)));
            match (copy.pending, copy.granted) {
                (Some(Op::Unlock), None) => {
                    tell(Op::Lock);
                    tell(Op::Unlock);
                }
                (Some(Op::Unlock), Some(_)) => tell(Op::Unlock),
                (Some(op), granted) => {
                    tell(op);
                    if granted.is_some() {
                        self.effects.push_back(Effect::Revoked { session, handle, reason });
                    }
                }
                (None, _) => self.effects.push_back(Effect::Revoked { session, handle, reason }),
            }
        }
        for held in held {
            match held {
                Held::Request(session, _) if silent(session) => {}
                Held::Request(session, request) => {
                    let (handle, op) = match request {
                        ClientRequest::Lock(req) => (req.handle, Op::Lock),
                        ClientRequest::Convert(req) => (req.handle, Op::Convert),
                        ClientRequest::Unlock(req) => (req.handle, Op::Unlock),
                        ClientRequest::Cancel { .. } => continue,
                    };
                    self.effects.push_back(Effect::Complete(ended(session, handle, op, status, None)));
                }
                Held::EndSession(session) => {
                    let _ = self.engine.end_session(now, session);
                }
            }
        }
        self.requester.clear();
        self.masters.clear();
        self.directory.clear_entries();
        self.coordinator.reset();
        self.views.recovery = None;
    }

    /// A client request while this node is fenced: a new lock fails at once
    /// ([`Status::Fenced`]); nothing else has a lock to act on.
    pub(in crate::cluster) fn refuse_fenced(
        &mut self,
        session: SessionId,
        request: &ClientRequest,
    ) -> Result<Outcome, RequestError> {
        if !self.engine.has_session(session) {
            return Err(RequestError::UnknownSession);
        }
        let ClientRequest::Lock(req) = request else { return Err(RequestError::UnknownHandle) };
        self.engine.validate_lock(req)?;
        self.effects.push_back(Effect::Complete(ended(session, req.handle, Op::Lock, Status::Fenced, None)));
        Ok(Outcome::NotQueued)
    }

    /// A client request while this node recovers: checked as far as it can
    /// be now, and held until recovery is over.
    pub(in crate::cluster) fn hold(
        &mut self,
        session: SessionId,
        request: ClientRequest,
    ) -> Result<Outcome, RequestError> {
        if !self.engine.has_session(session) || self.masters.is_remote_session(session) || self.ending(session) {
            return Err(RequestError::UnknownSession);
        }
        if self.views.held.len() as u64 >= self.config.engine.limits.locks_max {
            return Err(RequestError::LimitExceeded(Limit::Locks));
        }
        let held_lock = |handle| {
            self.views.held.iter().any(|held| {
                matches!(held, Held::Request(s, ClientRequest::Lock(req)) if *s == session && req.handle == handle)
            })
        };
        let known = |handle| self.lock_info(session, handle).is_some() || held_lock(handle);
        let outcome = match &request {
            ClientRequest::Lock(req) => {
                if known(req.handle) {
                    return Err(RequestError::HandleInUse);
                }
                self.engine.validate_lock(req)?;
                Outcome::Queued
            }
            ClientRequest::Convert(req) if !known(req.handle) => return Err(RequestError::UnknownHandle),
            ClientRequest::Unlock(req) if !known(req.handle) => return Err(RequestError::UnknownHandle),
            ClientRequest::Convert(_) => Outcome::Queued,
            ClientRequest::Unlock(_) | ClientRequest::Cancel { .. } => Outcome::NotQueued,
        };
        self.views.held.push_back(Held::Request(session, request));
        Ok(outcome)
    }

    /// A local client's session ends while this node recovers: its locks
    /// go once recovery is over (releasing them now could grant a waiter
    /// while other nodes' locks are away).
    pub(in crate::cluster) fn hold_end_session(&mut self, session: SessionId) -> Result<(), RequestError> {
        if !self.engine.has_session(session) || self.masters.is_remote_session(session) || self.ending(session) {
            return Err(RequestError::UnknownSession);
        }
        self.views.held.push_back(Held::EndSession(session));
        self.views.ending.insert(session);
        Ok(())
    }

    /// Whether a session's end is held (nothing more is said to it).
    pub(in crate::cluster) fn ending(&self, session: SessionId) -> bool {
        self.views.ending.contains(&session)
    }
}
