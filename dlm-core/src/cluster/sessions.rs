//! This node's clients' sessions: opening them (with ids this node hands
//! out), ending them here and at every master holding their locks, and the
//! node's shutdown, which answers and revokes everything its clients have.

use crate::cluster::ClusterNode;
use crate::cluster::message::{NodeId, PeerMessage};
use crate::effect::{Effect, RevokeReason};
use crate::ids::SessionId;
use crate::request::{ClientRequest, RequestError};
use crate::time::Instant;

impl ClusterNode {
    /// Opens a session of a local client. Its id must carry this node's id
    /// ([`NodeId::session`]) when the cluster has other members.
    ///
    /// # Errors
    /// As [`crate::Node::open_session`]; `InvalidFlags` for a session id of another node.
    pub fn open_session(&mut self, session: SessionId) -> Result<(), RequestError> {
        if !self.single() && NodeId::of_session(session) != self.config.node {
            return Err(RequestError::InvalidFlags("a session id must carry this node's id"));
        }
        self.engine.open_session(session)
    }

    /// Ends a local client's session, here and on every master holding its locks.
    ///
    /// # Errors
    /// Unknown session.
    pub fn end_session(&mut self, now: Instant, session: SessionId) -> Result<(), RequestError> {
        if self.recovering() {
            return self.hold_end_session(session);
        }
        self.engine.end_session(now, session)?;
        for master in self.requester.end_session(session) {
            self.send(now, master, PeerMessage::EndSession { session });
        }
        self.pump(now);
        Ok(())
    }

    /// How many sessions are open (local clients' and other nodes' with locks here).
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.engine.session_count()
    }

    /// Opens a session of a local client with the next id of this node's
    /// own ([`NodeId::session`] of the next serial; a single node's ids are
    /// the serials themselves).
    ///
    /// # Errors
    /// As [`crate::Node::open_session`] (the limit of sessions); no id is used up.
    pub fn open_next_session(&mut self) -> Result<SessionId, RequestError> {
        // Ids opened by the caller's own choice are passed over.
        let node = (!self.single()).then_some(self.config.node);
        let id = |serial| node.map_or(SessionId(serial), |node| node.session(serial));
        while self.engine.has_session(id(self.next_session)) {
            self.next_session += 1;
        }
        let session = id(self.next_session);
        self.open_session(session)?;
        self.next_session += 1;
        Ok(session)
    }

    /// The node stops serving its clients: every pending request of a local
    /// client is cancelled (all sessions' first, so that nothing an ending
    /// session releases is granted to a local waiter meanwhile), then, per
    /// session in id order, every lock it holds is revoked
    /// ([`RevokeReason::Shutdown`], in handle order) and the session ends,
    /// here and at every master of its locks. The effects are the
    /// cancellations and revocations: nothing is left for any local client
    /// after them. Other nodes' clients keep their locks here, and their
    /// waiters are granted what the ended sessions released.
    pub fn shutdown(&mut self, now: Instant) {
        if self.recovering() {
            // Nothing may be granted or released until recovery is over:
            // this node leaves it, revoking everything here at once.
            self.fence_self(now, crate::effect::Status::Cancelled, RevokeReason::Shutdown);
            self.views.fenced = true;
            let sessions: Vec<SessionId> = self.engine.session_ids();
            for session in sessions {
                let _ = self.engine.end_session(now, session);
            }
            return;
        }
        let sessions: Vec<SessionId> =
            self.engine.session_ids().into_iter().filter(|&s| !self.masters.is_remote_session(s)).collect();
        for &session in &sessions {
            for handle in self.client_handles(session) {
                if self.lock_info(session, handle).is_some_and(|info| info.requested.is_some()) {
                    let _ = self.handle_client(now, session, ClientRequest::Cancel { handle });
                }
            }
        }
        for &session in &sessions {
            for handle in self.client_handles(session) {
                if self.lock_info(session, handle).is_some_and(|info| info.granted.is_some()) {
                    self.effects.push_back(Effect::Revoked { session, handle, reason: RevokeReason::Shutdown });
                }
            }
        }
        let answered = self.effects.len();
        for session in sessions {
            let _ = self.end_session(now, session);
        }
        // Ending the sessions granted nothing to any local client: none is left.
        self.effects.truncate(answered);
    }

    /// A local client's locks, here and mastered elsewhere, by handle.
    fn client_handles(&self, session: SessionId) -> Vec<crate::ids::LockHandle> {
        let mut handles = self.engine.session_handles(session);
        handles.extend(self.requester.handles_of(session));
        handles.sort_unstable();
        handles
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Outcome;
    use crate::cluster::testing::{Harness, LOCKSPACE, ended, granted};
    use crate::effect::Op;
    use crate::effect::Status;
    use crate::ids::LockHandle;
    use crate::mode::Mode;

    #[test]
    fn session_ids_carry_the_node_and_pass_over_ids_in_use() {
        let mut h = Harness::new(2);
        // The harness opened serials 1 and 2 itself.
        assert_eq!(h.node.open_next_session(), Ok(NodeId(2).session(3)));
        assert_eq!(h.node.open_next_session(), Ok(NodeId(2).session(4)));
    }

    #[test]
    fn a_lock_says_whether_it_waits_here_or_for_a_remote_master() {
        let mut h = Harness::new(1);
        let here = h.name_with_directory(1);
        assert_eq!(h.lock(1, 1, &here, Mode::Ex), Outcome::NotQueued, "granted at once");
        assert_eq!(h.lock(2, 1, &here, Mode::Ex), Outcome::Queued, "behind the first");
        let elsewhere = h.name_with_directory(2);
        assert_eq!(h.lock(1, 2, &elsewhere, Mode::Nl), Outcome::Queued, "its master is looked up");
    }

    #[test]
    fn shutdown_cancels_every_pending_request_revokes_every_lock_and_tells_the_masters() {
        let mut h = Harness::new(1);
        let (s1, s2) = (h.session(1), h.session(2));
        let here = h.name_with_directory(1);
        let elsewhere = h.name_with_directory(2);
        h.lock(1, 1, &here, Mode::Ex);
        h.lock(2, 1, &here, Mode::Ex);
        h.lock(1, 2, &elsewhere, Mode::Pr);
        let reply = PeerMessage::LookupReply {
            lockspace: LOCKSPACE.to_vec(),
            name: elsewhere,
            master: Some(NodeId(3)),
            term: 1,
            token_floor: 0,
        };
        h.deliver(2, reply);
        h.deliver(3, PeerMessage::Complete(granted(s1, 2, Op::Lock, Mode::Pr, 5)));
        h.effects();
        h.sent();
        h.node.shutdown(h.now);
        assert_eq!(
            h.effects(),
            vec![
                Effect::Complete(ended(s2, 1, Op::Lock, Status::Cancelled)),
                Effect::Revoked { session: s1, handle: LockHandle(1), reason: RevokeReason::Shutdown },
                Effect::Revoked { session: s1, handle: LockHandle(2), reason: RevokeReason::Shutdown },
            ]
        );
        assert_eq!(h.sent(), vec![(NodeId(3), PeerMessage::EndSession { session: s1 })]);
        assert_eq!(h.node.session_count(), 0);
        assert_eq!(h.node.remote_lock_count(), 0);
    }
}
