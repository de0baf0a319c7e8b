//! The simulated clients: random requests, conversions, unlocks, cancels
//! and forced unlocks, sessions that go away and come back, and pauses.
//!
//! A client process may stop while its node runs on (a garbage collector,
//! SIGSTOP): it does nothing and hears nothing until it runs again, so what
//! it held when it stopped it goes on believing it holds, whatever its
//! agent was told meanwhile. Half the pauses are shorter than the
//! lock-delay (which must cover them: no conflicting grant meanwhile), half
//! longer (only fencing tokens cover those: the checker does not count such
//! a client while it is paused, as the nemesis does not).

use std::time::Duration;

use crate::cluster::NodeId;
use crate::flags::{LockFlags, UnlockFlags};
use crate::ids::LockHandle;
use crate::mode::{ALL_MODES, Mode};
use crate::request::{ClientRequest, ConvertRequest, LockRequest, UnlockRequest};
use crate::time::Instant;

use crate::sim::{Belief, LOCKSPACE, Sim, Slot, belief, is_waiting};

/// One chance in this many, at each of a client's steps, that it pauses.
const PAUSE_ONE_IN: u64 = 200;

/// A client process stopped for a while.
pub(super) struct Pause {
    pub(super) from: Instant,
    pub(super) until: Instant,
    /// What it believed it held when it stopped.
    pub(super) held: Vec<(u32, Belief)>,
}

impl Sim {
    pub(super) fn pending_summary(&self) -> String {
        let mut out = Vec::new();
        for c in &self.clients {
            for (slot, resource) in &c.slots {
                if *slot != Slot::Empty {
                    out.push(format!("{} r{resource} {slot:?}", c.session.0 >> 48));
                }
            }
        }
        for (n, node) in self.nodes.iter().enumerate() {
            if !self.members.alive[n] {
                out.push(format!("node {} dead", n + 1));
                continue;
            }
            if let Some(status) = node.recovery_status() {
                out.push(format!("node {} recovering {status:?}", n + 1));
            }
            if node.is_fenced() {
                out.push(format!("node {} fenced", n + 1));
            }
            for peer in node.peers() {
                if let Some((up, unacked)) = node.link_state(peer).filter(|&(up, unacked)| !up || unacked > 0) {
                    out.push(format!("node {} link to {peer}: up {up} unacked {unacked}", n + 1));
                }
            }
        }
        if !self.membership_settled() {
            out.push("membership not settled".into());
        }
        out.join(", ")
    }

    pub(super) fn client_step(&mut self, c: usize) -> Result<(), String> {
        let delay = 20_000 + self.rng.below(400_000);
        self.clients[c].next_action = if self.draining && self.clients[c].slots.iter().all(|(s, _)| *s == Slot::Empty) {
            Instant::from_nanos(u64::MAX)
        } else {
            self.now.saturating_add(Duration::from_nanos(delay))
        };
        let node = self.clients[c].node;
        if !self.members.alive[node] {
            self.clients[c].next_action = Instant::from_nanos(u64::MAX);
            return Ok(());
        }
        self.check_lease(node)?;
        if self.members.paused(node, self.now) {
            self.clients[c].next_action = self.members.paused_until[node];
            return Ok(());
        }
        if let Some(until) = self.clients[c].pause.as_ref().map(|p| p.until) {
            if until > self.now {
                self.clients[c].next_action = until;
                return Ok(());
            }
            // It runs again and hears what happened meanwhile.
            self.clients[c].pause = None;
        }
        if !self.draining && self.pause_rng.below(PAUSE_ONE_IN) == 0 {
            return self.pause_client(c);
        }
        if !self.draining && self.rng.chance(2) {
            return self.restart_session(c);
        }
        let s = self.rng.below(self.clients[c].slots.len() as u64) as usize;
        let (slot, _) = self.clients[c].slots[s];
        let session = self.clients[c].session;
        let request = match slot {
            Slot::Empty if !self.draining => {
                let resource = self.rng.below(u64::from(self.config.resources)) as u32;
                // A session waiting for its own lock is no deadlock (it can
                // release it), but this client would not: one lock per resource.
                if self.clients[c].slots.iter().any(|&(slot, r)| slot != Slot::Empty && r == resource) {
                    return Ok(());
                }
                // Clients reuse handles as soon as their lock is gone, half
                // the time: answers about the old lock must not land on the new one.
                let reuse = (1..=4).find(|h| !self.clients[c].handles.contains_key(h));
                let handle = match reuse {
                    Some(h) if self.rng.chance(50) => h,
                    _ => {
                        self.clients[c].next_handle += 1;
                        self.clients[c].next_handle + 4
                    }
                };
                let mode = ALL_MODES[self.rng.below(6) as usize];
                let mut flags = LockFlags::EMPTY;
                if self.rng.chance(15) {
                    flags.insert(LockFlags::NOQUEUE);
                }
                if self.rng.chance(30) {
                    flags.insert(LockFlags::VALBLK);
                }
                let timeout = self.rng.chance(20).then(|| Duration::from_micros(100 + self.rng.below(5000)));
                self.clients[c].slots[s] = (Slot::Requested, resource);
                self.clients[c].handles.insert(handle, s);
                self.owners.insert((session, LockHandle(handle)), (c, resource));
                self.report.requests += 1;
                ClientRequest::Lock(LockRequest {
                    handle: LockHandle(handle),
                    lockspace: self.nodes[node].lockspace_id(LOCKSPACE).expect("lockspace"),
                    name: format!("r{resource}").into_bytes(),
                    mode,
                    flags,
                    timeout,
                })
            }
            // Like most applications, a client waiting for one lock does
            // not let go of the others: only deadlock detection (or a
            // timeout) gets it out of a cycle.
            Slot::Granted(_) if self.clients[c].slots.iter().any(|(s, _)| is_waiting(*s)) => return Ok(()),
            Slot::Granted(held) => {
                let handle = self.handle_of(c, s);
                if self.draining || self.rng.chance(60) {
                    self.clients[c].slots[s].0 = Slot::Busy { held, to: Mode::Nl, unlocking: true, demotable: false };
                    let writes = matches!(held, Mode::Pw | Mode::Ex);
                    let (flags, lvb) = if writes && self.rng.chance(50) {
                        (UnlockFlags::VALBLK, Some(self.rng.next_u64().to_le_bytes().to_vec()))
                    } else {
                        (UnlockFlags::EMPTY, None)
                    };
                    ClientRequest::Unlock(UnlockRequest { handle, flags, lvb })
                } else {
                    let mode = ALL_MODES[self.rng.below(6) as usize];
                    let mut flags = LockFlags::EMPTY;
                    if self.rng.chance(20) {
                        flags.insert(LockFlags::NOQUEUE);
                    } else if self.rng.chance(30) {
                        flags.insert(LockFlags::CONVDEADLK);
                    }
                    let timeout = self.rng.chance(20).then(|| Duration::from_micros(100 + self.rng.below(5000)));
                    let demotable = flags.contains(LockFlags::CONVDEADLK);
                    self.clients[c].slots[s].0 = Slot::Busy { held, to: mode, unlocking: false, demotable };
                    ClientRequest::Convert(ConvertRequest { handle, mode, flags, lvb: None, timeout })
                }
            }
            Slot::Requested if !self.draining && self.rng.chance(3) => {
                self.clients[c].slots[s].0 = Slot::ForceUnlocking;
                let handle = self.handle_of(c, s);
                ClientRequest::Unlock(UnlockRequest { handle, flags: UnlockFlags::FORCE, lvb: None })
            }
            Slot::Requested | Slot::Busy { unlocking: false, .. } if !self.draining && self.rng.chance(5) => {
                ClientRequest::Cancel { handle: self.handle_of(c, s) }
            }
            _ => return Ok(()),
        };
        self.log(1, || format!("node {} client {session} {request:?}", node + 1));
        self.note_value_block(session, self.clients[c].slots[s].1, &request);
        let result = self.nodes[node].handle_client(self.now, session, request.clone());
        if let Err(error) = result {
            // A convert the engine refuses (flags that make no sense for
            // this conversion) changes nothing; anything else is a bug here.
            match request {
                ClientRequest::Convert(_) => self.clients[c].slots[s].0 = slot,
                ClientRequest::Cancel { .. } if error == crate::RequestError::NotPending => {}
                // A lock the client was told had failed (unavailable) keeps
                // its handle until its master's answer is undone: reusing
                // the handle meanwhile is refused, and changes nothing. Cut
                // links make requests unavailable, and so does a peer silent
                // past the acknowledgement timeout with no view to say so,
                // as pauses of one node can make it (seed 30078).
                ClientRequest::Lock(lock)
                    if error == crate::RequestError::HandleInUse
                        && (self.config.link_faults || self.config.membership_faults) =>
                {
                    self.clients[c].slots[s] = (Slot::Empty, 0);
                    self.clients[c].handles.remove(&lock.handle.0);
                    self.owners.remove(&(session, lock.handle));
                    self.report.requests -= 1;
                }
                other => return Err(format!("at {:?}: {other:?} refused: {error}", self.elapsed())),
            }
        }
        self.after(node)
    }

    /// Client `c` stops for a while, half the time within the lock-delay.
    fn pause_client(&mut self, c: usize) -> Result<(), String> {
        let delay = self.lockspace.lock_delay.as_micros() as u64;
        let length = if delay > 0 && self.pause_rng.chance(50) {
            Duration::from_micros(self.pause_rng.below(delay))
        } else {
            Duration::from_micros(delay + 1 + self.pause_rng.below(4_000))
        };
        let held = self.clients[c].slots.iter().filter_map(|&(slot, r)| belief(slot).map(|b| (r, b))).collect();
        let until = self.now.saturating_add(length);
        self.clients[c].pause = Some(Pause { from: self.now, until, held });
        self.clients[c].next_action = until;
        self.report.faults.client_pauses += 1;
        let session = self.clients[c].session;
        self.log(1, || format!("client {session} paused for {length:?}"));
        Ok(())
    }

    /// The client goes away (its session ends, with whatever it held or
    /// asked for) and comes back with a new session.
    pub(super) fn restart_session(&mut self, c: usize) -> Result<(), String> {
        let node = self.clients[c].node;
        let old = self.clients[c].session;
        self.log(1, || format!("node {} ends {old}", node + 1));
        self.nodes[node].end_session(self.now, old).map_err(|e| format!("ending {old}: {e}"))?;
        self.owners.retain(|&(session, _), _| session != old);
        self.tokens.retain(|&(session, _), _| session != old);
        self.next_session += 1;
        let session = NodeId(node as u16 + 1).session(self.next_session);
        self.nodes[node].open_session(session).map_err(|e| format!("opening {session}: {e}"))?;
        let client = &mut self.clients[c];
        client.session = session;
        client.slots.iter_mut().for_each(|slot| *slot = (Slot::Empty, 0));
        client.handles.clear();
        self.after(node)
    }

    pub(super) fn handle_of(&self, c: usize, s: usize) -> LockHandle {
        let handle = self.clients[c].handles.iter().find(|&(_, &slot)| slot == s).map(|(&h, _)| h);
        LockHandle(handle.expect("a busy slot has a handle"))
    }
}
