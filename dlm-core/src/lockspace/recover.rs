//! A cluster's recovery on this lockspace, as a master sees it (the Linux
//! DLM's `dlm_recover_purge`, `dlm_recover_master_copy` and
//! `dlm_recover_rsbs`): locks are purged and added back while nothing is
//! granted and no resource is freed, then every resource settles at once.
//!
//! Nothing here grants, sends a callback or frees a resource until
//! [`Lockspace::recovery_settle`]: between the purge and the settle a
//! resource's queues are incomplete (other nodes' locks are on their way
//! back), and a grant made from them could be incompatible with a lock
//! that is about to return.

use crate::flags::LockFlags;
use crate::ids::{LockHandle, SessionId};
use crate::lock::{Lock, LockState};
use crate::lockspace::Lockspace;
use crate::mode::{Mode, ModeSet};
use crate::outbox::Outbox;
use crate::time::Instant;

impl Lockspace {
    /// Removes every lock (orphans excepted) whose session `purge` selects,
    /// granting nothing and freeing no resource, so that a resource keeps its
    /// value block while its locks are away. A PW or EX holder removed for
    /// which `suspect` says true invalidates the value block: it may have
    /// been written and the new value lost with its node; and every holder
    /// `suspect` says true of stays in the way of conflicting requests for
    /// the lock-delay from `now` (its client may not have stopped yet). The PW and EX
    /// holders removed that `suspect` spared are pushed to `spared`
    /// (session, handle, resource name): they are expected back.
    pub(crate) fn recovery_purge(
        &mut self,
        out: &mut Outbox,
        now: Instant,
        purge: &dyn Fn(SessionId) -> bool,
        suspect: &dyn Fn(SessionId) -> bool,
        spared: &mut Vec<(SessionId, LockHandle, Box<[u8]>)>,
    ) {
        let doomed: Vec<u32> =
            self.locks.iter().filter(|(_, lock)| !lock.orphan && purge(lock.session)).map(|(l, _)| l).collect();
        for l in doomed {
            self.recovery_remove(out, now, l, suspect, spared);
        }
    }

    /// Removes one lock as [`Lockspace::recovery_purge`] does (granting
    /// nothing, freeing no resource).
    pub(crate) fn recovery_remove(
        &mut self,
        out: &mut Outbox,
        now: Instant,
        l: u32,
        suspect: &dyn Fn(SessionId) -> bool,
        spared: &mut Vec<(SessionId, LockHandle, Box<[u8]>)>,
    ) {
        let (r, session, granted) = (self.locks[l].resource, self.locks[l].session, self.locks[l].granted);
        if let Some(mode) = granted
            && suspect(session)
        {
            self.delay_grants_on(r, mode, now);
        }
        let lock = &self.locks[l];
        if granted.is_some_and(Mode::unlock_writes_lvb) {
            if suspect(session) {
                self.resources[r].lvb_invalid = true;
            } else {
                spared.push((session, lock.handle, self.resources[r].name.clone()));
            }
        }
        match lock.state {
            LockState::Converting | LockState::Waiting => self.stop_wait(l),
            LockState::Granted => self.resources[r].granted.remove(&mut self.locks, l),
            LockState::New => {}
        }
        if let Some(mode) = granted {
            self.resources[r].held.remove(mode);
        }
        self.destroy(out, l);
    }

    /// The resource name of a lock.
    pub(crate) fn resource_name_of(&self, l: u32) -> &[u8] {
        &self.resources[self.locks[l].resource].name
    }

    /// Adds back a lock that another node's client holds (or this node's,
    /// whose resource lost its master): granted `mode` under `token`, at the
    /// end of the granted queue. No limit applies (the lock existed before),
    /// and nothing is granted until [`Lockspace::recovery_settle`]. Tokens
    /// handed out here later are larger than `token`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn recover_granted(
        &mut self,
        out: &mut Outbox,
        session: SessionId,
        handle: LockHandle,
        name: &[u8],
        mode: Mode,
        token: u64,
        flags: LockFlags,
    ) -> u32 {
        let r = match self.find_resource(name) {
            Some(r) => r,
            None => {
                // Its value block was at the old master: unknown until a
                // holder's copy says what it was.
                let r = self.create_resource(name.to_vec());
                self.resources[r].lvb_invalid = true;
                r
            }
        };
        let l = self.locks.insert(Lock::new(session, handle, r, mode, flags));
        out.locks += 1;
        let lock = &mut self.locks[l];
        lock.state = LockState::Granted;
        lock.granted = Some(mode);
        lock.token = token;
        let resource = &mut self.resources[r];
        resource.granted.push_back(&mut self.locks, l);
        resource.held.add(mode);
        resource.last_token = resource.last_token.max(token);
        self.last_token = self.last_token.max(token);
        l
    }

    /// Decides the mode of a lock added back in doubt (see
    /// [`crate::Node::recovery_decide_mode`]).
    pub(crate) fn recovery_decide_mode(&mut self, l: u32, or_modes: ModeSet) {
        let Some(mode) = self.locks[l].granted else { return };
        let r = self.locks[l].resource;
        let others: Vec<Mode> = self.resources[r]
            .granted
            .iter(&self.locks)
            .chain(self.resources[r].converting.iter(&self.locks))
            .filter(|&o| o != l)
            .filter_map(|o| self.locks[o].granted)
            .collect();
        let fits = |m: Mode| others.iter().all(|&o| o.compatible(m));
        if fits(mode) {
            return;
        }
        let Some(decided) = or_modes.strongest_first().find(|&m| fits(m)) else { return };
        let resource = &mut self.resources[r];
        resource.held.remove(mode);
        resource.held.add(decided);
        self.locks[l].granted = Some(decided);
        self.locks[l].requested = decided;
    }

    /// Sets a resource's value block as recovery found it: the bytes a
    /// holder read, or (`None`) not valid.
    pub(crate) fn recovery_set_lvb(&mut self, name: &[u8], lvb: Option<&[u8]>) {
        let Some(r) = self.find_resource(name) else { return };
        match lvb {
            Some(bytes) if bytes.len() <= self.config.lvb_len => self.write_lvb(r, bytes),
            _ => self.resources[r].lvb_invalid = true,
        }
    }

    /// Ends recovery here: every resource grants what it can, holders in a
    /// queued request's way are told again (a callback sent before may have
    /// been lost with the old epoch's messages), and unused resources go.
    pub(crate) fn recovery_settle(&mut self, out: &mut Outbox) {
        let resources: Vec<u32> = self.resources.iter().map(|(r, _)| r).collect();
        // One buffer for every resource's holders (a recovery settles tens
        // of thousands of resources).
        let mut holders: Vec<u32> = Vec::new();
        for r in resources {
            holders.clear();
            holders.extend(
                self.resources[r].granted.iter(&self.locks).chain(self.resources[r].converting.iter(&self.locks)),
            );
            for &l in &holders {
                self.locks[l].bast_level = None;
            }
            out.touched.push((self.id, r));
            self.settle(out, r, true);
        }
    }
}
