//! The master role: the resources mastered here. Their queues are in the
//! engine, where other nodes' clients' locks appear under their own session
//! ids; this role serves those nodes' requests, holds the ones that arrive
//! before this node learns it is master, routes the engine's effects to the
//! nodes of remote clients, and releases masterships left idle.
//!
//! [`Masters`] is the state; the `ClusterNode` methods below are the handlers.

use std::collections::VecDeque;

use hashbrown::{HashMap, HashSet};

use crate::cluster::message::{NodeId, PeerMessage};
use crate::cluster::{ClusterNode, Key, ended};
use crate::effect::{Effect, Op, Status};
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::mode::Mode;
use crate::request::{ClientRequest, ConvertRequest, LockRequest, RequestError, UnlockRequest};
use crate::time::Instant;

struct Mastered {
    /// When the engine freed the resource (no lock left); `None` while in use.
    idle_since: Option<Instant>,
    /// Whether it has an entry in the idle queue.
    queued: bool,
    /// The directory's term of this mastership.
    term: u64,
}

/// A mastership as its directory node is to hear of it in recovery.
pub(super) struct Report<'a> {
    pub(super) directory: NodeId,
    pub(super) key: &'a Key,
    pub(super) term: u64,
}

#[derive(Default)]
pub(super) struct Masters {
    mastered: HashMap<Key, Mastered>,
    /// Masterships that became idle, oldest first (an entry may be out of
    /// date: the resource was used again since).
    idle: VecDeque<(Instant, Key)>,
    /// Requests that arrived for a resource this node was about to learn it masters.
    early_requests: HashMap<Key, Vec<(NodeId, PeerMessage)>>,
    /// Sessions of other nodes' clients open in the engine.
    remote_sessions: HashSet<SessionId>,
}

impl Masters {
    pub(super) fn contains(&self, key: &Key) -> bool {
        self.mastered.contains_key(key)
    }

    /// If the resource is mastered here, notes it in use again and says so.
    pub(super) fn mark_in_use(&mut self, key: &Key) -> bool {
        let Some(mastered) = self.mastered.get_mut(key) else { return false };
        mastered.idle_since = None;
        true
    }

    pub(super) fn len(&self) -> usize {
        self.mastered.len()
    }

    /// Masterships in a lockspace.
    pub(super) fn count_in(&self, id: LockspaceId) -> usize {
        self.mastered.keys().filter(|k| k.0 == id).count()
    }

    /// Whether a session is another node's client's.
    pub(super) fn is_remote_session(&self, session: SessionId) -> bool {
        self.remote_sessions.contains(&session)
    }

    /// Forgets a released lockspace's masterships.
    pub(super) fn forget_lockspace(&mut self, id: LockspaceId) {
        self.mastered.retain(|key, _| key.0 != id);
    }

    /// The masterships whose resource `exists` says is gone, sorted.
    pub(super) fn sorted_without(&self, exists: impl Fn(&Key) -> bool) -> Vec<Key> {
        let mut gone: Vec<Key> = self.mastered.keys().filter(|k| !exists(k)).cloned().collect();
        gone.sort_unstable();
        gone
    }

    /// Each mastership's report for its directory node (the node
    /// `directory` names), sorted by resource: those for other nodes, and
    /// those for `me`.
    pub(super) fn reports(&self, me: NodeId, directory: impl Fn(&Key) -> NodeId) -> (Vec<Report<'_>>, Vec<Report<'_>>) {
        let (mut remote, mut here): (Vec<Report<'_>>, Vec<Report<'_>>) = self
            .mastered
            .iter()
            .map(|(key, mastered)| Report { directory: directory(key), key, term: mastered.term })
            .partition(|report| report.directory != me);
        remote.sort_unstable_by(|a, b| a.key.cmp(b.key));
        here.sort_unstable_by(|a, b| a.key.cmp(b.key));
        (remote, here)
    }

    /// The masterships, sorted, with their terms.
    pub(super) fn sorted(&self) -> Vec<(Key, u64)> {
        let mut all: Vec<(Key, u64)> = self.mastered.iter().map(|(k, m)| (k.clone(), m.term)).collect();
        all.sort_unstable();
        all
    }

    /// Forgets the requests held for lookups of the last epoch, and hands
    /// over the sessions open in the engine of the nodes `gone` says are
    /// (sorted), to be ended.
    pub(super) fn start_recovery(&mut self, gone: impl Fn(NodeId) -> bool) -> Vec<SessionId> {
        self.early_requests.clear();
        let mut sessions: Vec<SessionId> =
            self.remote_sessions.iter().copied().filter(|&s| gone(NodeId::of_session(s))).collect();
        for session in &sessions {
            self.remote_sessions.remove(session);
        }
        sessions.sort_unstable();
        sessions
    }

    /// The sessions of a node's clients open in the engine, sorted.
    pub(super) fn remote_sessions_of(&self, node: NodeId) -> Vec<SessionId> {
        let mut sessions: Vec<SessionId> =
            self.remote_sessions.iter().copied().filter(|&s| NodeId::of_session(s) == node).collect();
        sessions.sort_unstable();
        sessions
    }

    /// Forgets every mastership (the node fenced itself).
    pub(super) fn clear(&mut self) {
        self.mastered.clear();
        self.idle.clear();
        self.early_requests.clear();
    }

    /// Notes another node's session as open in the engine.
    pub(super) fn add_remote_session(&mut self, session: SessionId) {
        self.remote_sessions.insert(session);
    }

    /// The requests held for a resource, to be served or sent back now.
    pub(super) fn take_early(&mut self, key: &Key) -> Vec<(NodeId, PeerMessage)> {
        self.early_requests.remove(key).unwrap_or_default()
    }

    /// When the oldest idle mastership is due for release.
    pub(super) fn release_deadline(&self, delay: std::time::Duration) -> Option<Instant> {
        self.idle.front().map(|(at, _)| at.saturating_add(delay))
    }
}

impl ClusterNode {
    /// Runs a lock request on the engine, for a resource mastered here.
    pub(super) fn lock_here(&mut self, now: Instant, session: SessionId, req: LockRequest) -> Result<(), RequestError> {
        let key: Key = (req.lockspace, req.name.clone().into_boxed_slice());
        let result = self.engine.handle_client(now, session, ClientRequest::Lock(req));
        if result.is_err() && !self.engine.resource_exists(key.0, &key.1) {
            self.mark_idle(now, key);
        }
        result
    }

    /// Takes mastership of a resource (the directory recorded this node),
    /// with fencing tokens above any handed out for it before. A resource
    /// newly mastered here within the lock-delay after a member departed
    /// may have been held on that member, which nobody can tell now: its
    /// grants wait as if an EX hold had been taken from it then.
    pub(super) fn become_master(&mut self, now: Instant, key: Key, term: u64) {
        let floor = self.token_floor(key.0);
        self.engine.raise_token_floor(key.0, floor);
        if let Some(since) = self.views.departure_at
            && !self.masters.contains(&key)
            && self.engine.lock_delay(key.0).is_some_and(|delay| since.saturating_add(delay) > now)
        {
            self.engine.delay_grants(key.0, &key.1, Mode::Ex, since);
        }
        self.masters.mastered.entry(key).and_modify(|mastered| mastered.term = term).or_insert(Mastered {
            idle_since: None,
            queued: false,
            term,
        });
    }

    pub(super) fn on_request(&mut self, now: Instant, from: NodeId, request: PeerMessage) {
        let PeerMessage::Request { lockspace, session, handle, name, mode, flags, timeout } = request else {
            return;
        };
        let Some(id) = self.peer_lockspace(&lockspace) else {
            self.reject_remote(now, from, session, handle, Op::Lock);
            return;
        };
        let key: Key = (id, name.into_boxed_slice());
        if self.requester.lookups.contains_key(&key) && !self.masters.contains(&key) {
            let request =
                PeerMessage::Request { lockspace, session, handle, name: key.1.to_vec(), mode, flags, timeout };
            self.masters.early_requests.entry(key).or_default().push((from, request));
            return;
        }
        if !self.masters.mark_in_use(&key) {
            self.send(now, from, PeerMessage::NotMaster { session, handle });
            return;
        }
        self.stats.served_requests += 1;
        if !self.masters.remote_sessions.contains(&session) {
            if self.engine.open_session(session).is_err() {
                self.reject_remote(now, from, session, handle, Op::Lock);
                return;
            }
            self.masters.remote_sessions.insert(session);
        }
        let request = LockRequest { handle, lockspace: id, name: key.1.into_vec(), mode, flags, timeout };
        if self.engine.handle_client(now, session, ClientRequest::Lock(request)).is_err() {
            self.reject_remote(now, from, session, handle, Op::Lock);
        }
    }

    pub(super) fn on_convert(&mut self, now: Instant, from: NodeId, session: SessionId, req: ConvertRequest) {
        self.stats.served_requests += 1;
        let handle = req.handle;
        if self.engine.handle_client(now, session, ClientRequest::Convert(req)).is_err() {
            self.reject_remote(now, from, session, handle, Op::Convert);
        }
    }

    pub(super) fn on_unlock(&mut self, now: Instant, from: NodeId, session: SessionId, req: UnlockRequest) {
        self.stats.served_requests += 1;
        let handle = req.handle;
        if self.drop_held_request(now, from, session, handle, true) {
            return;
        }
        if self.engine.handle_client(now, session, ClientRequest::Unlock(req)).is_err() {
            self.reject_remote(now, from, session, handle, Op::Unlock);
        }
    }

    pub(super) fn on_cancel(&mut self, now: Instant, from: NodeId, session: SessionId, handle: LockHandle) {
        self.stats.served_requests += 1;
        if self.drop_held_request(now, from, session, handle, false) {
            return;
        }
        // Too late to cancel (already granted or ended) is no error: the
        // completion is on its way.
        let _ = self.engine.handle_client(now, session, ClientRequest::Cancel { handle });
    }

    pub(super) fn on_end_session(&mut self, now: Instant, session: SessionId) {
        if self.masters.remote_sessions.remove(&session) {
            let _ = self.engine.end_session(now, session);
        }
        // Its requests held until this node hears it masters their
        // resource die with it, or they would be granted to no one.
        for held in self.masters.early_requests.values_mut() {
            held.retain(|(_, request)| !matches!(request, PeerMessage::Request { session: s, .. } if *s == session));
        }
    }

    /// Sends the requests held for a resource back to their nodes (this
    /// node is not its master), which ask the directory themselves.
    pub(super) fn return_early_requests(&mut self, now: Instant, key: &Key) {
        for (from, request) in self.masters.take_early(key) {
            if let PeerMessage::Request { session, handle, .. } = request {
                self.send(now, from, PeerMessage::NotMaster { session, handle });
            }
        }
    }

    /// A request this node holds (it is about to learn that it masters the
    /// resource) that its client cancels or force-unlocks: it ends here, as
    /// the engine would end a pending new lock, and is never granted.
    fn drop_held_request(
        &mut self,
        now: Instant,
        from: NodeId,
        session: SessionId,
        handle: LockHandle,
        unlock: bool,
    ) -> bool {
        let mut found = false;
        for held in self.masters.early_requests.values_mut() {
            held.retain(|(_, request)| {
                let this = matches!(request, PeerMessage::Request { session: s, handle: h, .. } if *s == session && *h == handle);
                found |= this;
                !this
            });
        }
        if found {
            self.send(now, from, PeerMessage::Complete(ended(session, handle, Op::Lock, Status::Cancelled, None)));
            if unlock {
                self.send(now, from, PeerMessage::Complete(ended(session, handle, Op::Unlock, Status::Unlocked, None)));
            }
        }
        found
    }

    /// Tells a remote client's node that its request was refused here.
    fn reject_remote(&mut self, now: Instant, to: NodeId, session: SessionId, handle: LockHandle, op: Op) {
        let mode = self.engine.lock_info(session, handle).and_then(|info| info.granted);
        let mode = if op == Op::Lock { None } else { mode };
        self.send(now, to, PeerMessage::Complete(ended(session, handle, op, Status::Rejected, mode)));
        self.close_if_empty(now, session);
    }

    /// Ends every remote client's session left with no lock here (recovery
    /// keeps the sessions of nodes that stayed, and may have taken their
    /// locks since).
    pub(super) fn close_empty_remote_sessions(&mut self, now: Instant) {
        let mut sessions: Vec<SessionId> = self.masters.remote_sessions.iter().copied().collect();
        sessions.sort_unstable();
        for session in sessions {
            self.close_if_empty(now, session);
        }
    }

    /// Ends a remote client's session in the engine once it has no lock here.
    fn close_if_empty(&mut self, now: Instant, session: SessionId) {
        if self.masters.remote_sessions.contains(&session) && self.engine.session_lock_count(session) == 0 {
            self.masters.remote_sessions.remove(&session);
            let _ = self.engine.end_session(now, session);
        }
    }

    /// Routes the engine's effects: to local clients, or as messages to the
    /// nodes of remote ones; and notes resources the engine freed.
    pub(super) fn pump(&mut self, now: Instant) {
        let mut touched_remote: Vec<SessionId> = Vec::new();
        while let Some(effect) = self.engine.poll_effect() {
            let session = effect.session();
            if !self.masters.remote_sessions.contains(&session) {
                self.effects.push_back(effect);
                continue;
            }
            let node = NodeId::of_session(session);
            match effect {
                Effect::Complete(completion) => {
                    touched_remote.push(session);
                    self.send(now, node, PeerMessage::Complete(completion));
                }
                Effect::Blocking { session, handle, mode } => {
                    self.send(now, node, PeerMessage::Blocking { session, handle, mode });
                }
                Effect::Revoked { .. } => {}
            }
        }
        touched_remote.sort_unstable();
        touched_remote.dedup();
        for session in touched_remote {
            self.close_if_empty(now, session);
        }
        let released: Vec<Key> = self.engine.drain_released().collect();
        for key in released {
            self.mark_idle(now, key);
        }
    }

    pub(super) fn mark_idle(&mut self, now: Instant, key: Key) {
        let Some(mastered) = self.masters.mastered.get_mut(&key) else { return };
        mastered.idle_since = Some(now);
        if !mastered.queued {
            mastered.queued = true;
            self.masters.idle.push_back((now, key));
        }
    }

    /// Releases masterships idle for the release delay.
    pub(super) fn release_idle(&mut self, now: Instant) {
        let delay = self.config.release_delay;
        while let Some((at, _)) = self.masters.idle.front() {
            if at.saturating_add(delay) > now {
                break;
            }
            let (_, key) = self.masters.idle.pop_front().expect("front exists");
            let Some(mastered) = self.masters.mastered.get_mut(&key) else { continue };
            if self.engine.resource_exists(key.0, &key.1) {
                // In use again (and freed later, if ever, with a new entry).
                mastered.idle_since = None;
                mastered.queued = false;
                continue;
            }
            match mastered.idle_since {
                Some(since) if since.saturating_add(delay) <= now => {
                    let term = mastered.term;
                    self.masters.mastered.remove(&key);
                    self.stats.released += 1;
                    self.remove_from_directory(now, key, term);
                }
                Some(since) => self.masters.idle.push_back((since, key)),
                None => mastered.queued = false,
            }
        }
    }

    /// Tells the directory that this node no longer masters a resource,
    /// with the last token it handed out.
    fn remove_from_directory(&mut self, now: Instant, key: Key, term: u64) {
        let directory = self.directory_of(&key);
        let floor = self.token_floor(key.0);
        if directory == self.config.node {
            if let Some(held) = self.directory.remove(&key, self.config.node, term) {
                self.answer_held(now, key, held);
            }
            return;
        }
        let lockspace = self.lockspace_name(key.0);
        let name = key.1.into_vec();
        self.send(now, directory, PeerMessage::Remove { lockspace, name, term, token_floor: floor });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{Harness, LOCKSPACE, RELEASE_DELAY, granted, lookup_reply, request_message};
    use crate::mode::Mode;

    /// Node 1 looks up a resource of directory 2 for a local PR lock, and
    /// node 3's request for it comes first: it is held.
    fn request_held_for_a_lookup() -> (Harness, Vec<u8>, SessionId, SessionId) {
        let mut h = Harness::new(1);
        let name = h.name_with_directory(2);
        let local = h.session(1);
        h.lock(1, 1, &name, Mode::Pr);
        h.sent();
        let remote = NodeId(3).session(1);
        h.deliver(3, request_message(remote, 1, &name, Mode::Pr));
        assert_eq!(h.sent(), vec![], "held: this node may be about to master it");
        (h, name, local, remote)
    }

    #[test]
    fn another_nodes_request_is_served_here_and_its_grant_sent_back_when_due() {
        let mut h = Harness::new(1);
        // Node 1 is the directory: its first local lock makes it master at once.
        let name = h.name_with_directory(1);
        let local = h.session(1);
        h.lock(1, 1, &name, Mode::Pr);
        assert_eq!(h.effects(), vec![Effect::Complete(granted(local, 1, Op::Lock, Mode::Pr, 1))]);
        assert_eq!(h.sent(), vec![]);
        let remote = NodeId(2).session(1);
        h.deliver(2, request_message(remote, 1, &name, Mode::Pr));
        assert_eq!(h.sent(), vec![(NodeId(2), PeerMessage::Complete(granted(remote, 1, Op::Lock, Mode::Pr, 2)))]);
        h.deliver(2, request_message(remote, 2, &name, Mode::Ex));
        assert_eq!(
            h.sent(),
            vec![(NodeId(2), PeerMessage::Blocking { session: remote, handle: LockHandle(1), mode: Mode::Ex })]
        );
        assert_eq!(h.effects(), vec![Effect::Blocking { session: local, handle: LockHandle(1), mode: Mode::Ex }]);
        assert_eq!(h.node.stats().served_requests, 2);
    }

    #[test]
    fn requests_that_come_before_the_directorys_answer_are_held_and_served_once_it_names_this_node() {
        let (mut h, name, local, remote) = request_held_for_a_lookup();
        h.deliver(2, lookup_reply(&name, 1, 4, 10));
        // Tokens start above the directory's floor.
        assert_eq!(h.effects(), vec![Effect::Complete(granted(local, 1, Op::Lock, Mode::Pr, 11))]);
        assert_eq!(h.sent(), vec![(NodeId(3), PeerMessage::Complete(granted(remote, 1, Op::Lock, Mode::Pr, 12)))]);
    }

    #[test]
    fn requests_held_for_a_resource_mastered_elsewhere_go_back_to_their_nodes() {
        let (mut h, name, local, remote) = request_held_for_a_lookup();
        h.deliver(2, lookup_reply(&name, 3, 4, 0));
        assert_eq!(
            h.sent(),
            vec![
                (NodeId(3), request_message(local, 1, &name, Mode::Pr)),
                (NodeId(3), PeerMessage::NotMaster { session: remote, handle: LockHandle(1) }),
            ]
        );
    }

    #[test]
    fn an_idle_mastership_is_released_to_the_directory_with_its_last_token() {
        let mut h = Harness::new(1);
        let name = h.name_with_directory(2);
        h.lock(1, 1, &name, Mode::Ex);
        h.deliver(2, lookup_reply(&name, 1, 4, 10));
        h.unlock(1, 1);
        h.sent();
        h.effects();
        assert_eq!(h.node.mastered_count(), 1);
        let idle_at = h.now;
        h.advance_to(idle_at.saturating_add(RELEASE_DELAY - std::time::Duration::from_nanos(1)));
        assert_eq!(h.sent(), vec![]);
        h.advance_to(idle_at.saturating_add(RELEASE_DELAY));
        let remove =
            PeerMessage::Remove { lockspace: LOCKSPACE.to_vec(), name: name.clone(), term: 4, token_floor: 11 };
        assert_eq!(h.sent(), vec![(NodeId(2), remove)]);
        assert_eq!(h.node.mastered_count(), 0);
        assert_eq!(h.node.stats().released, 1);
    }
}
