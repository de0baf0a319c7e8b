//! The steps of recovery after the stop: the directory rebuilt from the
//! masters, every granted copy whose master departed sent to its new master
//! (those whose master stayed are checked in `survivors`), the
//! queues settled, and what was in flight sent again.

use hashbrown::HashMap;

use crate::cluster::message::{NodeId, PeerMessage, RecoveredLock};
use crate::cluster::phase::RecoveryPhase;
use crate::cluster::recovery::Held;
use crate::cluster::recovery::form::recovery_form;
use crate::cluster::{ClusterNode, Key, ended};
use crate::effect::{Effect, Op, RevokeReason, Status};
use crate::flags::LockFlags;
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::mode::{Mode, ModeSet};
use crate::request::ClientRequest;
use crate::time::Instant;

impl ClusterNode {
    /// Every member has stopped: tells each resource's directory node that
    /// this node masters it.
    pub(in crate::cluster) fn rebuild_directory(&mut self, now: Instant) {
        let me = self.config.node;
        let (remote, here) = self.masters.reports(me, |key| self.directory_of(key));
        let here: Vec<(Key, u64)> = here.into_iter().map(|report| (report.key.clone(), report.term)).collect();
        let reports: Vec<(NodeId, PeerMessage)> = remote
            .into_iter()
            .map(|report| {
                let lockspace = self.lockspace_name(report.key.0);
                let name = report.key.1.to_vec();
                (report.directory, PeerMessage::Mastered { lockspace, name, term: report.term })
            })
            .collect();
        for (key, term) in here {
            self.directory.record(key, me, term);
        }
        for (to, report) in reports {
            self.send(now, to, report);
        }
        self.reach_barrier(now, RecoveryPhase::Directory);
    }

    /// A master's report to this directory node.
    pub(in crate::cluster) fn on_mastered(&mut self, from: NodeId, lockspace: &[u8], name: Vec<u8>, term: u64) {
        let Some(id) = self.peer_lockspace(lockspace) else { return };
        self.directory.record((id, name.into_boxed_slice()), from, term);
    }

    /// The directory is whole again: answers the lookups held for it; the
    /// copies whose master stayed are checked with it (`survivors`), and the
    /// master of every other resource this node holds a granted copy of is
    /// looked up.
    pub(in crate::cluster) fn recover_masters(&mut self, now: Instant) {
        let early = self.views.recovery.as_mut().map(|r| std::mem::take(&mut r.early_lookups)).unwrap_or_default();
        for (from, lockspace, name) in early {
            self.on_lookup(now, from, lockspace, name, None);
        }
        // Each resource this node holds a copy of whose master departed (or
        // is not known), with its copies; those granted by a master that
        // stayed are checked with it by digest (`survivors`).
        let mut copies: HashMap<Key, Vec<(SessionId, LockHandle)>> = HashMap::new();
        let mut keys = Vec::new();
        for ((session, handle), copy) in self.requester.iter() {
            if copy.granted.is_some() && copy.master.is_some_and(|m| self.stayed(m)) {
                continue;
            }
            let key: Key = (copy.lockspace, copy.name.clone());
            if copy.granted.is_some() {
                keys.push(key.clone());
            }
            copies.entry(key).or_default().push((session, handle));
        }
        // Each resource's copies go in order (the walk above has none).
        copies.values_mut().for_each(|locks| locks.sort_unstable());
        // And each resource whose master must hear again that a value may be lost.
        keys.extend(self.views.unsure_unlocks.keys().cloned());
        keys.sort_unstable();
        keys.dedup();
        if let Some(recovery) = self.views.recovery.as_mut() {
            recovery.copies = copies;
        }
        // The members that stayed hear first: whatever goes to a new master
        // below must come after this node's digest on the link.
        self.check_with_survivors(now);
        for key in keys {
            self.look_up_in_recovery(now, key);
        }
        self.locks_sent_if_answered(now);
    }

    /// Whether `node` is another member that was one before this view too
    /// (its locks, and what it masters, stayed).
    pub(super) fn stayed(&self, node: NodeId) -> bool {
        node != self.config.node
            && self.config.membership.contains(node)
            && self.views.recovery.as_ref().is_some_and(|r| !r.departed.contains(&node))
    }

    /// Finds the master of a resource this node holds copies of, in
    /// recovery: at the directory, or here if this node is the directory.
    pub(super) fn look_up_in_recovery(&mut self, now: Instant, key: Key) {
        let me = self.config.node;
        if self.directory_of(&key) == me {
            let (master, term) = self.directory.claim(key.clone(), me);
            let floor = self.token_floor(key.0);
            self.on_recovered_master(now, key, master, term, floor);
            return;
        }
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        if !recovery.lookups.insert(key.clone()) {
            return;
        }
        let directory = self.directory_of(&key);
        let lockspace = self.lockspace_name(key.0);
        self.stats.lookups += 1;
        self.send(now, directory, PeerMessage::Lookup { lockspace, name: key.1.into_vec(), stale: None });
    }

    /// A lookup from a peer while this node rebuilds: held until the
    /// directory is whole.
    pub(in crate::cluster) fn on_recovery_lookup(
        &mut self,
        now: Instant,
        from: NodeId,
        lockspace: Vec<u8>,
        name: Vec<u8>,
    ) {
        match self.views.recovery.as_mut() {
            Some(recovery) if recovery.phase <= RecoveryPhase::Directory => {
                recovery.early_lookups.push((from, lockspace, name));
            }
            _ => self.on_lookup(now, from, lockspace, name, None),
        }
    }

    /// The directory's answer to a recovery lookup.
    pub(in crate::cluster) fn on_recovery_lookup_reply(
        &mut self,
        now: Instant,
        lockspace: &[u8],
        name: Vec<u8>,
        master: Option<(NodeId, u64)>,
        floor: u64,
    ) {
        let Some(id) = self.engine.lockspace_id(lockspace) else { return };
        let key: Key = (id, name.into_boxed_slice());
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        if !recovery.lookups.remove(&key) {
            return;
        }
        match master {
            Some((master, term)) => self.on_recovered_master(now, key, master, term, floor),
            None => {
                // The directory node has no such lockspace: these locks
                // cannot be kept anywhere.
                for (session, handle) in self.take_copies(&key) {
                    if self.requester.remove(session, handle).is_some_and(|l| l.granted.is_some()) {
                        let reason = RevokeReason::LockspaceReleased;
                        self.effects.push_back(Effect::Revoked { session, handle, reason });
                    }
                }
            }
        }
        self.locks_sent_if_answered(now);
    }

    /// Once every lookup of this node is answered, and every member that
    /// stayed has checked its digest, its copies are all on their way: it
    /// reaches the locks barrier.
    pub(super) fn locks_sent_if_answered(&mut self, now: Instant) {
        let me = self.config.node;
        let done = self.views.recovery.as_ref().is_some_and(|r| {
            r.phase == RecoveryPhase::Locks
                && r.lookups.is_empty()
                && r.checks.is_empty()
                && !r.arrived[usize::from(RecoveryPhase::Locks.index())].contains(&me)
        });
        if done {
            self.reach_barrier(now, RecoveryPhase::Locks);
        }
    }

    /// The master of a resource this node holds granted copies of: they go
    /// there (into this node's engine, if it is this node), each in the form
    /// [`recovery_form`] gives it.
    fn on_recovered_master(&mut self, now: Instant, key: Key, master: NodeId, term: u64, floor: u64) {
        let me = self.config.node;
        if master == me {
            self.engine.raise_token_floor(key.0, floor);
            let new = !self.masters.contains(&key);
            self.become_master(now, key.clone(), term);
            if new && let Some(recovery) = self.views.recovery.as_mut() {
                recovery.new_masters.insert(key.clone());
            }
        } else {
            self.requester.cache_master(key.clone(), (master, term), self.config.master_cache_max);
        }
        for notice in self.views.unsure_unlocks.get(&key).cloned().unwrap_or_default() {
            if master == me {
                self.note_lvb_unsure(&key);
            } else {
                self.send(now, master, PeerMessage::RecoverLock(notice));
            }
        }
        let mut reissue = Vec::new();
        for (session, handle) in self.take_copies(&key) {
            if master != me {
                self.send_copy(now, master, &key, session, handle, false);
                continue;
            }
            let Some(copy) = self.requester.get(session, handle) else { continue };
            let (Some(form), Some(token)) = (recovery_form(copy), copy.token) else { continue };
            let lvb = if form.lvb_unsure { None } else { copy.lvb.as_deref().map(<[u8]>::to_vec) };
            let Some(mode) = form.mode else {
                let held = copy.granted.unwrap_or(Mode::Nl);
                self.unlocked_in_recovery(session, handle);
                if form.lvb_unsure {
                    self.note_unsure_unlock(&key, session, handle, held, token.0);
                }
                continue;
            };
            // This node's own copy comes home: its lock goes into the engine,
            // and what it had in flight runs here once recovery is over.
            let Some(copy) = self.requester.remove(session, handle) else { continue };
            if self.engine.recover_lock(session, handle, key.0, &key.1, mode, token.0, copy.flags).is_err() {
                continue;
            }
            self.note_undecided(key.0, session, handle, form.or_modes);
            self.vote_lvb(&key, mode, lvb);
            if form.lvb_unsure {
                self.note_lvb_unsure(&key);
            }
            if let Some(request @ ClientRequest::Convert(_)) = copy.resend {
                reissue.push(Held::Request(session, request));
                if copy.cancel_sent {
                    reissue.push(Held::Request(session, ClientRequest::Cancel { handle }));
                }
            }
        }
        // They were made before anything held during recovery.
        for held in reissue.into_iter().rev() {
            self.views.held.push_front(held);
        }
    }

    /// Sends a granted copy to its master (another node) in the form
    /// [`recovery_form`] gives it: to be added back, or, if its unlock was
    /// in flight, to be dropped there if it is there (`direct`: the master
    /// it had, which stayed; always told) or to say its value block may be
    /// lost (a new master: told only then).
    pub(super) fn send_copy(
        &mut self,
        now: Instant,
        master: NodeId,
        key: &Key,
        session: SessionId,
        handle: LockHandle,
        direct: bool,
    ) {
        let Some(copy) = self.requester.get(session, handle) else { return };
        let (Some(form), Some(token)) = (recovery_form(copy), copy.token) else { return };
        let lvb = if form.lvb_unsure { None } else { copy.lvb.as_deref().map(<[u8]>::to_vec) };
        let held = copy.granted.unwrap_or(Mode::Nl);
        let flags = copy.flags;
        let Some(mode) = form.mode else {
            self.unlocked_in_recovery(session, handle);
            let mut lock = if form.lvb_unsure {
                self.note_unsure_unlock(key, session, handle, held, token.0)
            } else if direct {
                self.unsure_notice(key, session, handle, held, token.0, false)
            } else {
                return;
            };
            lock.direct = direct;
            self.stats.recovery_locks_sent += 1;
            self.send(now, master, PeerMessage::RecoverLock(lock));
            return;
        };
        let Some(copy) = self.requester.get_mut(session, handle) else { return };
        copy.granted = Some(mode);
        copy.master = Some(master);
        let lock = RecoveredLock {
            lockspace: self.lockspace_name(key.0),
            name: key.1.to_vec(),
            session,
            handle,
            mode,
            token: token.0,
            flags,
            lvb,
            unlocking: false,
            lvb_unsure: form.lvb_unsure,
            or_modes: form.or_modes,
            direct,
        };
        self.stats.recovery_locks_sent += 1;
        self.send(now, master, PeerMessage::RecoverLock(lock));
    }

    /// An unlock that counts as done in recovery although it may have
    /// written the value block: noted, and kept to tell the resource's
    /// master in every recovery until one is done everywhere. Returns the notice.
    fn note_unsure_unlock(
        &mut self,
        key: &Key,
        session: SessionId,
        handle: LockHandle,
        held: Mode,
        token: u64,
    ) -> RecoveredLock {
        self.note_lvb_unsure(key);
        let lock = self.unsure_notice(key, session, handle, held, token, true);
        self.views.unsure_unlocks.entry(key.clone()).or_default().push(lock.clone());
        lock
    }

    /// A lock that is not to be added back: only, if `lvb_unsure`, that the
    /// value block may be lost.
    pub(super) fn unsure_notice(
        &self,
        key: &Key,
        session: SessionId,
        handle: LockHandle,
        held: Mode,
        token: u64,
        lvb_unsure: bool,
    ) -> RecoveredLock {
        RecoveredLock {
            lockspace: self.lockspace_name(key.0),
            name: key.1.to_vec(),
            session,
            handle,
            mode: held,
            token,
            flags: LockFlags::EMPTY,
            lvb: None,
            unlocking: true,
            lvb_unsure,
            or_modes: ModeSet::EMPTY,
            direct: false,
        }
    }

    /// The copies of a resource's locks held here, sorted (each resource's
    /// are taken once: its master is found once).
    fn take_copies(&mut self, key: &Key) -> Vec<(SessionId, LockHandle)> {
        self.views.recovery.as_mut().and_then(|r| r.copies.remove(key)).unwrap_or_default()
    }

    /// A copy whose unlock was in flight: the unlock counts as done (the
    /// lock is not added back anywhere), and the client hears so.
    fn unlocked_in_recovery(&mut self, session: SessionId, handle: LockHandle) {
        let Some(copy) = self.requester.remove(session, handle) else { return };
        if copy.forced_over == Some(Op::Convert) {
            let done = ended(session, handle, Op::Convert, Status::Cancelled, copy.granted);
            self.effects.push_back(Effect::Complete(done));
        }
        self.effects.push_back(Effect::Complete(ended(session, handle, Op::Unlock, Status::Unlocked, None)));
    }

    /// A resource mastered here whose value block may have been written by
    /// a request lost with the old epoch: not valid from now on. It is
    /// marked at once (a newer view may abandon this recovery, and the copy
    /// that told is gone by then) and again when recovery settles (after a
    /// new master's vote).
    fn note_lvb_unsure(&mut self, key: &Key) {
        self.engine.recovery_set_lvb(key.0, &key.1, None);
        if let Some(recovery) = self.views.recovery.as_mut() {
            recovery.lvb_unsure.insert(key.clone());
        }
    }

    /// Notes the value block a lock came back with, for a resource this node
    /// became master of: one held above CR has the current value.
    fn vote_lvb(&mut self, key: &Key, mode: Mode, lvb: Option<Vec<u8>>) {
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        if let Some(lvb) = lvb
            && mode.index() > Mode::Cr.index()
            && recovery.new_masters.contains(key)
        {
            recovery.lvb_votes.entry(key.clone()).or_insert(lvb);
        }
    }

    /// A lock of another node's client comes back to this master, in place
    /// of the one here if there is one (a node that stayed sends again what
    /// it had in flight).
    pub(in crate::cluster) fn on_recover_lock(&mut self, now: Instant, from: NodeId, lock: RecoveredLock) {
        if lock.direct {
            // Sent to the master its node knew: only a master takes it (the
            // directory may have no entry, or another master, for it).
            let mastered = self
                .engine
                .lockspace_id(&lock.lockspace)
                .is_some_and(|id| self.masters.contains(&(id, lock.name.clone().into_boxed_slice())));
            if !mastered {
                let RecoveredLock { lockspace, name, .. } = lock;
                self.send(now, from, PeerMessage::RecoverRefused { lockspace, name });
                return;
            }
        }
        let Some(id) = self.peer_lockspace(&lock.lockspace) else { return };
        if !self.masters.is_remote_session(lock.session) {
            if self.engine.open_session(lock.session).is_err() {
                return;
            }
            self.masters.add_remote_session(lock.session);
        }
        let RecoveredLock { name, session, handle, mode, token, flags, lvb, unlocking, lvb_unsure, or_modes, .. } =
            lock;
        let key: Key = (id, name.into_boxed_slice());
        self.views.spared_writers.remove(&(session, handle));
        // What was here for it goes: this is its node's word on it. (It
        // comes straight back, or its unlock counts as done.)
        self.engine.recovery_remove_lock(now, session, handle, &mut Vec::new());
        if !self.masters.contains(&key) {
            // The directory named this node master, and its own answer is
            // on its way (with the term): it masters the resource from
            // now, even if a newer view comes first.
            self.become_master(now, key.clone(), 0);
            if let Some(recovery) = self.views.recovery.as_mut() {
                recovery.new_masters.insert(key.clone());
            }
        }
        if lvb_unsure {
            self.note_lvb_unsure(&key);
        }
        if unlocking {
            return;
        }
        if self.engine.recover_lock(session, handle, id, &key.1, mode, token, flags).is_err() {
            debug_assert!(false, "{from} sent back a lock the engine refused: {session} {handle}");
            return;
        }
        self.note_undecided(id, session, handle, or_modes);
        self.vote_lvb(&key, mode, lvb);
    }

    /// A lock added back here whose conversion in flight may have left it
    /// in one of `or_modes` instead: decided once every lock is back.
    fn note_undecided(&mut self, id: LockspaceId, session: SessionId, handle: LockHandle, or_modes: ModeSet) {
        if let Some(recovery) = self.views.recovery.as_mut()
            && !or_modes.is_empty()
        {
            recovery.undecided.push((id, session, handle, or_modes));
        }
    }

    /// Every lock is back where it belongs: the modes of conversions in
    /// doubt are decided from the locks beside them, value blocks of the new
    /// masters are set, every resource settles, and this node is done.
    pub(in crate::cluster) fn settle_recovered(&mut self, now: Instant) {
        // Every copy that was to come back has.
        self.views.spared_writers.clear();
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        for (id, session, handle, or_modes) in std::mem::take(&mut recovery.undecided) {
            self.engine.recovery_decide_mode(id, session, handle, or_modes);
        }
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        let new_masters = std::mem::take(&mut recovery.new_masters);
        let votes = std::mem::take(&mut recovery.lvb_votes);
        let unsure = std::mem::take(&mut recovery.lvb_unsure);
        for key in &new_masters {
            self.engine.recovery_set_lvb(key.0, &key.1, votes.get(key).map(Vec::as_slice));
        }
        for key in &unsure {
            self.engine.recovery_set_lvb(key.0, &key.1, None);
        }
        self.engine.recovery_settle(now);
        self.pump(now);
        self.close_empty_remote_sessions(now);
        for key in self.masters.sorted_without(|key| self.engine.resource_exists(key.0, &key.1)) {
            self.mark_idle(now, key);
        }
        self.reach_barrier(now, RecoveryPhase::Done);
    }

    /// Recovery is over: what was in flight when the view came goes again,
    /// then the requests held meanwhile run, in order.
    pub(in crate::cluster) fn resume(&mut self, now: Instant) {
        // Sessions that ended meanwhile go first, with whatever they had
        // held or in flight: nothing is sent again for them.
        let ended_sessions: Vec<SessionId> = std::mem::take(&mut self.views.ending).into_iter().collect();
        self.views.held.retain(|held| match held {
            Held::Request(s, _) | Held::EndSession(s) => !ended_sessions.contains(s),
        });
        for &session in &ended_sessions {
            let _ = self.end_session(now, session);
        }
        // What ending one granted to another of them is not said either.
        self.effects.retain(|effect| !ended_sessions.contains(&effect.session()));
        for (session, handle) in self.requester.sorted_keys_where(|copy| copy.pending.is_some()) {
            self.resend_in_flight(now, session, handle);
        }
        while let Some(held) = self.views.held.pop_front() {
            match held {
                Held::Request(session, request) => {
                    let (handle, op) = match &request {
                        ClientRequest::Lock(req) => (req.handle, Some(Op::Lock)),
                        ClientRequest::Convert(req) => (req.handle, Some(Op::Convert)),
                        ClientRequest::Unlock(req) => (req.handle, Some(Op::Unlock)),
                        ClientRequest::Cancel { handle } => (*handle, None),
                    };
                    let held_mode = self.lock_info(session, handle).and_then(|l| l.granted);
                    if self.handle_client(now, session, request).is_err()
                        && let Some(op) = op
                    {
                        // Accepted when it was held: it ends, refused.
                        let mode = if op == Op::Lock { None } else { held_mode };
                        self.effects.push_back(Effect::Complete(ended(session, handle, op, Status::Rejected, mode)));
                    }
                }
                Held::EndSession(session) => {
                    let _ = self.end_session(now, session);
                }
            }
        }
        self.pump(now);
    }

    /// Sends again a copy's request that the old epoch's messages lost.
    fn resend_in_flight(&mut self, now: Instant, session: SessionId, handle: LockHandle) {
        let Some(copy) = self.requester.get(session, handle) else { return };
        let cancel = copy.cancel_sent;
        match (copy.pending, copy.granted, copy.master) {
            (Some(Op::Lock), None, _) => {
                let Some(copy) = self.requester.remove(session, handle) else { return };
                let Some(request) = copy.request else { return };
                if self.client_lock(now, session, request).is_err() {
                    self.effects.push_back(Effect::Complete(ended(session, handle, Op::Lock, Status::Rejected, None)));
                    return;
                }
                if cancel {
                    let _ = self.handle_client(now, session, ClientRequest::Cancel { handle });
                }
            }
            (Some(Op::Unlock), None, _) => {
                // A forced unlock of a new lock: the request exists nowhere now.
                self.requester.remove(session, handle);
                for (op, status) in [(Op::Lock, Status::Cancelled), (Op::Unlock, Status::Unlocked)] {
                    self.effects.push_back(Effect::Complete(ended(session, handle, op, status, None)));
                }
            }
            (Some(_), Some(_), Some(master)) => {
                let message = match copy.resend.clone() {
                    Some(ClientRequest::Convert(req)) => PeerMessage::Convert {
                        session,
                        handle,
                        mode: req.mode,
                        flags: req.flags,
                        lvb: req.lvb,
                        timeout: req.timeout,
                    },
                    Some(ClientRequest::Unlock(req)) => {
                        PeerMessage::Unlock { session, handle, flags: req.flags, lvb: req.lvb }
                    }
                    _ => return,
                };
                self.stats.remote_requests += 1;
                self.send(now, master, message);
                if cancel {
                    self.send(now, master, PeerMessage::Cancel { session, handle });
                }
            }
            _ => {}
        }
    }
}
