//! The requester's state: this node's copies of its clients' locks
//! mastered elsewhere, the lookups outstanding and the cache of masters.

use hashbrown::HashMap;

use crate::cluster::Key;
use crate::cluster::directory::Mastership;
use crate::cluster::message::NodeId;
use crate::effect::Op;
use crate::flags::LockFlags;
use crate::ids::{FencingToken, LockHandle, LockspaceId, SessionId};
use crate::mode::Mode;
use crate::request::{ClientRequest, LockRequest};

/// A lock of a local client whose resource is mastered elsewhere: this
/// node's copy.
#[derive(Clone, Debug)]
pub(in crate::cluster) struct RemoteLock {
    pub(in crate::cluster) lockspace: LockspaceId,
    pub(in crate::cluster) name: Box<[u8]>,
    /// `None` while the master is being looked up.
    pub(in crate::cluster) master: Option<NodeId>,
    /// The directory's term of that mastership.
    pub(super) master_term: u64,
    pub(in crate::cluster) granted: Option<Mode>,
    /// The mode of the request in flight.
    pub(in crate::cluster) requested: Mode,
    /// The token of the latest grant.
    pub(in crate::cluster) token: Option<FencingToken>,
    /// The request in flight.
    pub(in crate::cluster) pending: Option<Op>,
    /// The new lock's request, kept until it is granted to resend it when a
    /// master turns out stale.
    pub(in crate::cluster) request: Option<LockRequest>,
    /// The client was told the request failed (its master became
    /// unreachable); whatever the master answers later is undone.
    pub(in crate::cluster) abandoned: bool,
    /// The conversion or unlock in flight, kept to send it again when a
    /// new view voids the messages of the old one.
    pub(in crate::cluster) resend: Option<ClientRequest>,
    /// A cancel of the pending request was sent (it is sent again with it).
    pub(in crate::cluster) cancel_sent: bool,
    /// The request a forced unlock overtook (its completion is owed first).
    pub(in crate::cluster) forced_over: Option<Op>,
    /// The lock's flags (`PERSISTENT` travels with it in recovery).
    pub(in crate::cluster) flags: LockFlags,
    /// The value block read at the latest grant, if the client asked for it:
    /// a master rebuilt in recovery takes it from a holder above CR.
    pub(in crate::cluster) lvb: Option<Box<[u8]>>,
}

pub(super) type LockKey = (SessionId, LockHandle);

#[derive(Default)]
pub(in crate::cluster) struct Requester {
    pub(super) locks: HashMap<LockKey, RemoteLock>,
    pub(super) per_session: HashMap<SessionId, u32>,
    /// Outstanding lookups, with the local requests waiting for them.
    pub(in crate::cluster) lookups: HashMap<Key, Vec<LockKey>>,
    /// Masters of other nodes, as the directory last said.
    pub(super) cache: HashMap<Key, Mastership>,
}

impl Requester {
    pub(in crate::cluster) fn get(&self, session: SessionId, handle: LockHandle) -> Option<&RemoteLock> {
        self.locks.get(&(session, handle))
    }

    pub(in crate::cluster) fn len(&self) -> usize {
        self.locks.len()
    }

    /// Remote locks of a session.
    pub(in crate::cluster) fn count_of(&self, session: SessionId) -> u32 {
        self.per_session.get(&session).copied().unwrap_or(0)
    }

    /// A session's remote locks, by handle.
    pub(in crate::cluster) fn handles_of(&self, session: SessionId) -> Vec<LockHandle> {
        let mut handles: Vec<LockHandle> = self.locks.keys().filter(|(s, _)| *s == session).map(|&(_, h)| h).collect();
        handles.sort_unstable();
        handles
    }

    /// Remote locks in a lockspace.
    pub(in crate::cluster) fn count_in(&self, id: LockspaceId) -> usize {
        self.locks.values().filter(|l| l.lockspace == id).count()
    }

    pub(in crate::cluster) fn insert(&mut self, session: SessionId, handle: LockHandle, copy: RemoteLock) {
        self.locks.insert((session, handle), copy);
        *self.per_session.entry(session).or_default() += 1;
    }

    pub(in crate::cluster) fn remove(&mut self, session: SessionId, handle: LockHandle) -> Option<RemoteLock> {
        let lock = self.locks.remove(&(session, handle))?;
        if let Some(count) = self.per_session.get_mut(&session) {
            *count -= 1;
            if *count == 0 {
                self.per_session.remove(&session);
            }
        }
        Some(lock)
    }

    /// Forgets every remote lock of an ended session; returns their masters, by id.
    pub(in crate::cluster) fn end_session(&mut self, session: SessionId) -> Vec<NodeId> {
        if self.per_session.remove(&session).is_none() {
            return Vec::new();
        }
        let handles: Vec<LockHandle> = self.locks.keys().filter(|(s, _)| *s == session).map(|&(_, h)| h).collect();
        let mut masters: Vec<NodeId> = Vec::new();
        for handle in handles {
            if let Some(lock) = self.locks.remove(&(session, handle))
                && let Some(master) = lock.master
                && !masters.contains(&master)
            {
                masters.push(master);
            }
        }
        masters.sort_unstable();
        masters
    }

    /// Whether the local lock `(session, handle)` is a new lock of `key`
    /// waiting for its master to be looked up. The handle may have been
    /// reused for another lock since the lookup went out (the first one
    /// cancelled meanwhile): the answer is then not for it.
    pub(super) fn awaits_lookup(&self, session: SessionId, handle: LockHandle, key: &Key) -> bool {
        self.locks.get(&(session, handle)).is_some_and(|l| {
            l.master.is_none()
                && l.pending == Some(Op::Lock)
                && l.request.is_some()
                && l.lockspace == key.0
                && l.name == key.1
        })
    }

    pub(in crate::cluster) fn cache_master(&mut self, key: Key, master: Mastership, max: usize) {
        if self.cache.len() >= max && !self.cache.contains_key(&key) {
            // The cache is advisory (a request to a stale master is
            // redirected): forgetting everything is always safe.
            self.cache.clear();
        }
        self.cache.insert(key, master);
    }

    /// Every copy, sorted by session and handle.
    pub(in crate::cluster) fn sorted_keys(&self) -> Vec<LockKey> {
        self.sorted_keys_where(|_| true)
    }

    /// The copies `pick` picks, sorted (filtered first: recovery walks tens
    /// of thousands of copies for the few with a request in flight).
    pub(in crate::cluster) fn sorted_keys_where(&self, pick: impl Fn(&RemoteLock) -> bool) -> Vec<LockKey> {
        let mut keys: Vec<LockKey> = self.locks.iter().filter(|(_, copy)| pick(copy)).map(|(&key, _)| key).collect();
        keys.sort_unstable();
        keys
    }

    /// Every copy, in no particular order (for what does not depend on it).
    pub(in crate::cluster) fn iter(&self) -> impl Iterator<Item = (LockKey, &RemoteLock)> {
        self.locks.iter().map(|(&key, copy)| (key, copy))
    }

    pub(in crate::cluster) fn get_mut(&mut self, session: SessionId, handle: LockHandle) -> Option<&mut RemoteLock> {
        self.locks.get_mut(&(session, handle))
    }

    /// A new view voids what was in flight: outstanding lookups and the
    /// cache go, copies the clients were told had failed go, and new locks
    /// sent to a master wait to be sent again. Returns the copies that went
    /// or wait with the master they had been sent to (sorted): that master
    /// may hold them, and must drop them if it stays.
    pub(in crate::cluster) fn start_recovery(&mut self) -> Vec<(NodeId, SessionId, LockHandle, Key)> {
        self.lookups.clear();
        self.cache.clear();
        let mut sent = Vec::new();
        let abandoned: Vec<LockKey> = self.locks.iter().filter(|(_, l)| l.abandoned).map(|(&k, _)| k).collect();
        for (session, handle) in abandoned {
            if let Some(lock) = self.remove(session, handle)
                && let Some(master) = lock.master
            {
                sent.push((master, session, handle, (lock.lockspace, lock.name)));
            }
        }
        for (&(session, handle), lock) in &mut self.locks {
            if lock.granted.is_none()
                && let Some(master) = lock.master.take()
            {
                sent.push((master, session, handle, (lock.lockspace, lock.name.clone())));
            }
        }
        sent.sort_unstable();
        sent
    }

    /// Forgets everything (the node fenced itself).
    pub(in crate::cluster) fn clear(&mut self) {
        self.locks.clear();
        self.per_session.clear();
        self.lookups.clear();
        self.cache.clear();
    }

    /// Forgets what is known of a released lockspace.
    pub(in crate::cluster) fn forget_lockspace(&mut self, id: LockspaceId) {
        self.cache.retain(|key, _| key.0 != id);
    }
}
