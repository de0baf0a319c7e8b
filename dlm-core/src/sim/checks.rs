//! What the simulation checks after every step: the nodes' effects carried
//! out against what each client knows, fencing tokens, single masters.

use std::fmt::Write as _;
use std::time::Duration;

use crate::cluster::{NodeId, PeerMessage};
use crate::effect::{Completion, Effect, Op, RevokeReason, Status};
use crate::flags::StatusFlags;
use crate::ids::{LockHandle, SessionId};
use crate::mode::Mode;
use crate::request::{ClientRequest, UnlockRequest};

use std::collections::BTreeMap;

use crate::cluster::DeadlockEvent;

use crate::sim::{LOCKSPACE, Sim, Slot};

impl Sim {
    pub(super) fn after(&mut self, n: usize) -> Result<(), String> {
        // A node that asks for its connection to be re-made has marked the
        // link down; the fault tick reconnects it when no cut is in the way.
        while self.nodes[n].poll_reset().is_some() {}
        self.note_recovery(n);
        self.check_deadlock_events(n)?;
        let mut grants: Vec<(u32, u64, SessionId, LockHandle)> = Vec::new();
        while let Some(effect) = self.nodes[n].poll_effect() {
            let _ = write!(self.trace, "{} {n} {effect:?};", self.now.as_nanos());
            self.log(1, || format!("node {} effect {effect:?}", n + 1));
            if let Effect::Complete(c) = &effect
                && let (Some(token), Some(&(_, resource))) = (c.token, self.owners.get(&(c.session, c.handle)))
            {
                grants.push((resource, token.0, c.session, c.handle));
            }
            self.deliver(n, effect)?;
        }
        while let Some((to, envelope)) = self.nodes[n].poll_transmit() {
            let _ = write!(self.trace, "{} {n}>{to} {envelope:?};", self.now.as_nanos());
            self.log(2, || format!("node {} sends to {to} {envelope:?}", n + 1));
            // A message resent after a reconnection was seen the first time
            // (when its lock's handle could not have been reused yet); each
            // epoch numbers its messages afresh.
            let first_time = envelope.seq != 0 && self.transmitted.insert((n, to.0, envelope.epoch, envelope.seq));
            if let Some(PeerMessage::Complete(c)) = &envelope.message
                && let (Some(token), Some(&(_, resource))) = (c.token, self.owners.get(&(c.session, c.handle)))
                && first_time
            {
                grants.push((resource, token.0, c.session, c.handle));
            }
            self.send(NodeId(n as u16 + 1), to, envelope);
        }
        let mut by_resource: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        // A remote grant is seen when its master sends it and again when
        // the client's node delivers it: count it once.
        let mut fresh = Vec::new();
        for (resource, token, session, handle) in grants {
            match self.seen_grants.insert((resource, token), (session, handle)) {
                None => fresh.push((resource, token)),
                Some(lock) if lock == (session, handle) => {}
                Some(other) => {
                    return Err(format!(
                        "at {:?}: r{resource} token {token} granted to {session} {handle} and to {} {}",
                        self.elapsed(),
                        other.0,
                        other.1
                    ));
                }
            }
        }
        for (resource, token) in &fresh {
            self.log(1, || format!("node {} grants r{resource} token {token:x}", n + 1));
        }
        for (resource, token) in fresh {
            by_resource.entry(resource).or_default().push(token);
        }
        // A grant is seen when its master sends it; one sent while the link
        // was down goes out later, after younger grants of the same master.
        // So: a token below the largest seen is wrong only from another
        // master — another node, or the same node restarted (a new master
        // must start above every token handed out before; the old one cannot
        // have let the resource go while a grant of it was still
        // undelivered, and a restarted node's old outbox died with it).
        let me = (n, self.members.incarnations[n]);
        for (resource, tokens) in by_resource {
            let (last, issuer) = self.last_token.get(&resource).copied().unwrap_or((0, me));
            let min = tokens.iter().copied().min().expect("non-empty");
            if min <= last && issuer != me {
                return Err(format!(
                    "at {:?}: r{resource} granted token {min} by node {} (incarnation {}) after token {last} by \
                     node {} (incarnation {})",
                    self.elapsed(),
                    n + 1,
                    me.1,
                    issuer.0 + 1,
                    issuer.1
                ));
            }
            let max = tokens.into_iter().max().expect("non-empty");
            if max > last {
                self.last_token.insert(resource, (max, me));
            }
        }
        Ok(())
    }

    pub(super) fn deliver(&mut self, n: usize, effect: Effect) -> Result<(), String> {
        let at = self.elapsed();
        match effect {
            Effect::Complete(completion) => self.complete(n, completion),
            Effect::Blocking { session, handle, .. } => {
                let known = self.owners.get(&(session, handle)).map(|&(c, _)| c);
                match known {
                    Some(c) if self.clients[c].node == n => {
                        // A blocked-on holder lets go soon.
                        self.clients[c].next_action = self.clients[c].next_action.min(self.now);
                        Ok(())
                    }
                    _ => Err(format!("at {at:?}: blocking callback for unknown lock {session} {handle}")),
                }
            }
            Effect::Revoked { session, handle, reason } => {
                // Only a node that fenced itself takes locks back.
                if reason != RevokeReason::Fenced || !self.nodes[n].is_fenced() {
                    return Err(format!("at {at:?}: unexpected revocation {session} {handle} ({reason:?})"));
                }
                if let Some(&(c, _)) = self.owners.get(&(session, handle)) {
                    self.forget_lock(c, handle);
                }
                Ok(())
            }
        }
    }

    pub(super) fn complete(&mut self, n: usize, done: Completion) -> Result<(), String> {
        let at = self.elapsed();
        let Some(&(c, _)) = self.owners.get(&(done.session, done.handle)) else {
            // A request held while recovering that fails as the node fences
            // itself, about a lock the fence has just revoked.
            if done.status == Status::Fenced && self.nodes[n].is_fenced() {
                return Ok(());
            }
            return Err(format!("at {at:?}: completion for unknown lock: {done:?}"));
        };
        if self.clients[c].node != n {
            return Err(format!("at {at:?}: completion delivered on the wrong node: {done:?}"));
        }
        let s = *self.clients[c].handles.get(&done.handle.0).expect("owned handles are mapped");
        let (slot, resource) = self.clients[c].slots[s];
        if done.status == Status::Granted {
            self.report.grants += 1;
        }
        if done.status == Status::Deadlock {
            self.report.deadlocks += 1;
        }
        if done.status == Status::Unavailable {
            self.report.unavailable += 1;
        }
        if done.status == Status::Granted
            && let Some(token) = done.token
        {
            self.tokens.insert((done.session, done.handle), token.0);
        }
        if done.op == Op::Unlock && done.status == Status::Unlocked {
            self.value_blocks.unlocked(done.session, done.handle, self.now);
        }
        if done.status == Status::Granted
            && let Some(lvb) = &done.lvb
            && !done.flags.contains(StatusFlags::VALNOTVALID)
        {
            self.value_blocks
                .check_read(resource, done.mode.unwrap_or(Mode::Nl), done.session, done.handle, lvb, self.now)
                .map_err(|e| format!("at {at:?}: {e}"))?;
        }
        let next = match (slot, done.op, done.mode) {
            (_, _, _) if done.status == Status::Fenced && !self.nodes[n].is_fenced() => {
                return Err(format!("at {at:?}: {done:?} from a node that is not fenced"));
            }
            (Slot::Busy { unlocking: false, .. }, Op::Convert, None) if done.status == Status::Fenced => Slot::Empty,
            (Slot::Requested, Op::Lock, Some(mode)) if done.status == Status::Granted => Slot::Granted(mode),
            (Slot::Requested, Op::Lock, None) => Slot::Empty,
            (Slot::Busy { unlocking: false, .. }, Op::Convert, Some(mode)) => Slot::Granted(mode),
            (Slot::Busy { unlocking: true, .. } | Slot::ForceUnlocking, Op::Unlock, None) => Slot::Empty,
            (Slot::ForceUnlocking, Op::Lock, _) => Slot::ForceUnlocking,
            _ => return Err(format!("at {at:?}: completion {done:?} for a lock in state {slot:?}")),
        };
        self.clients[c].slots[s] = (next, resource);
        if next == Slot::Empty {
            self.forget_lock(c, done.handle);
        }
        let soon = self.now.saturating_add(Duration::from_micros(self.rng.below(200)));
        self.clients[c].next_action = self.clients[c].next_action.min(soon);
        Ok(())
    }

    /// A client's lock is gone.
    fn forget_lock(&mut self, c: usize, handle: LockHandle) {
        let session = self.clients[c].session;
        if let Some(s) = self.clients[c].handles.remove(&handle.0) {
            self.clients[c].slots[s] = (Slot::Empty, 0);
        }
        self.owners.remove(&(session, handle));
        self.tokens.remove(&(session, handle));
        self.value_blocks.forget(session, handle);
    }

    /// Notes what a client's request means for the value-block check.
    pub(super) fn note_value_block(&mut self, session: SessionId, resource: u32, request: &ClientRequest) {
        match request {
            ClientRequest::Lock(r) => self.value_blocks.requested(session, r.handle, self.now),
            ClientRequest::Convert(r) => self.value_blocks.requested(session, r.handle, self.now),
            ClientRequest::Unlock(UnlockRequest { handle, lvb: Some(lvb), .. }) => {
                let value = lvb.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("eight bytes")));
                self.value_blocks.write_made(resource, session, *handle, value, self.now);
            }
            _ => {}
        }
    }

    /// No resource may have locks on two nodes' engines at once.
    pub(super) fn check_masters(&self) -> Result<(), String> {
        for r in 0..self.config.resources {
            let name = format!("r{r}");
            let masters: Vec<usize> = (0..self.nodes.len())
                .filter(|&n| self.members.alive[n] && !self.frozen_out(n))
                .filter(|&n| {
                    let node = &self.nodes[n];
                    node.lockspace_id(LOCKSPACE).is_some_and(|ls| node.engine().resource_exists(ls, name.as_bytes()))
                })
                .collect();
            if masters.len() > 1 {
                return Err(format!("at {:?}: r{r} has locks on nodes {masters:?}", self.elapsed()));
            }
        }
        Ok(())
    }

    /// Judges the deadlock coordinator's candidates against every engine's
    /// real waits now (the step that found them is not over), and its victims
    /// against their candidates.
    fn check_deadlock_events(&mut self, n: usize) -> Result<(), String> {
        for event in self.nodes[n].drain_deadlock_events() {
            match event {
                DeadlockEvent::Candidate { probe, edges } => {
                    let real = edges.iter().all(|&(master, edge, exists)| {
                        exists.unwrap_or_else(|| {
                            let engine = self.nodes[usize::from(master.0 - 1)].engine();
                            engine.waits_for(edge.from, &edge.wait, edge.to)
                        })
                    });
                    self.candidates.insert((n, probe), real);
                }
                DeadlockEvent::Victim { probe, master, wait } => {
                    if self.candidates.get(&(n, probe)) != Some(&true) {
                        return Err(format!(
                            "at {:?}: node {} chose a deadlock victim ({master}, {wait:?}) on a cycle whose waits \
                             did not all exist when it was found",
                            self.elapsed(),
                            n + 1
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
