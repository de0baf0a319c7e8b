//! Recovery between members that stayed: a lock whose master stayed stays
//! where it is, and only what the view may have changed travels.
//!
//! The kernel DLM sends a lock in recovery only when its resource's master
//! departed; it can, because its links never lose a message. Here a view
//! voids what was in flight, so a master that stayed may hold a lock its
//! node no longer has (its unlock, or its session's end, was lost), may have
//! made a change its node never heard of (a grant, a conversion), or may
//! lack a lock its node thinks it holds (one sent to it in a recovery a
//! newer view abandoned). So each node, once the directory is whole:
//! 1. tells the masters that stayed to drop the new locks it had sent them
//!    (they are sent again after recovery) and sends them its copies with a
//!    request in flight (each replaces the master's lock, in the form
//!    recovery gives it, or drops it if its unlock was in flight);
//! 2. sends every other member a digest of the locks it should then hold
//!    for this node's clients: their number and the XOR of a 128-bit hash
//!    of each (lockspace, resource, session, handle, mode, token, whether
//!    persistent). A master whose own digest of this node's locks is the
//!    same keeps them as they are: nothing else travels for them. One that
//!    differs drops every lock of this node's clients (as the Linux DLM's
//!    purge would) and this node sends them all, as for a new master.
//!
//! A lock sent straight to its old master is taken only if that node still
//! masters the resource; otherwise it is refused and its master is looked
//! up at the directory as in any recovery. A node reaches the locks barrier
//! once each member has answered its digest (links are ordered: any
//! refusal is ahead of the answer).
//!
//! The outcome is the state a full rebuild would give: every master holds
//! exactly the locks of the other members' copies (in the same modes, under
//! the same tokens), only in the order it had them. A false match would
//! take two different sets of locks with the same hash; the hash (FNV-1a
//! over 128 bits, each half then mixed) is fixed, so nodes of different
//! builds agree on it.

use hashbrown::HashMap;

use crate::cluster::message::{NodeId, PeerMessage};
use crate::cluster::{ClusterNode, Key};
use crate::flags::LockFlags;
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::mode::Mode;
use crate::time::Instant;

impl ClusterNode {
    /// Step 1 and 2 above, once this node's copies are sorted into those
    /// kept (their master stayed) and the others.
    pub(super) fn check_with_survivors(&mut self, now: Instant) {
        let voided = self.views.recovery.as_mut().map(|r| std::mem::take(&mut r.voided)).unwrap_or_default();
        for (master, session, handle, key) in voided {
            if self.stayed(master) {
                // A lock that was on its way to it (a new lock, sent again
                // after recovery; or one its client gave up): dropped there.
                let mut lock = self.unsure_notice(&key, session, handle, Mode::Nl, 0, false);
                lock.direct = true;
                self.stats.recovery_locks_sent += 1;
                self.send(now, master, PeerMessage::RecoverLock(lock));
            }
        }
        // Copies with a request in flight go again, in order.
        let in_flight = self.requester.sorted_keys_where(|copy| copy.granted.is_some() && copy.pending.is_some());
        for (session, handle) in in_flight {
            let Some(copy) = self.requester.get(session, handle) else { continue };
            let (Some(master), Some(_), Some(_)) = (copy.master, copy.granted, copy.pending) else { continue };
            if self.stayed(master) {
                let key: Key = (copy.lockspace, copy.name.clone());
                self.send_copy(now, master, &key, session, handle, true);
            }
        }
        let mut digests = self.digests_of_copies();
        let me = self.config.node;
        let members: Vec<NodeId> = self.config.membership.members().iter().map(|m| m.id).filter(|&m| m != me).collect();
        for member in members {
            let (locks, digest) = digests.remove(&member).unwrap_or_default();
            if let Some(recovery) = self.views.recovery.as_mut() {
                recovery.checks.insert(member);
            }
            self.send(now, member, PeerMessage::RecoverDigest { locks, digest });
        }
    }

    /// A member's digest of the locks it says this node holds for its clients.
    pub(super) fn on_recover_digest(&mut self, now: Instant, from: NodeId, locks: u64, digest: u128) {
        let matched = self.digest_of_node(from) == (locks, digest);
        if matched {
            self.stats.recovery_locks_kept += locks;
        } else {
            self.stats.recovery_digest_mismatches += 1;
            // Its node's copies are the truth: every lock of its clients
            // here goes, and comes back listed.
            let spared = self.engine.recovery_purge(now, |s| NodeId::of_session(s) == from, |_| false);
            for (session, handle, lockspace, name) in spared {
                self.views.spared_writers.insert((session, handle), (lockspace, name));
            }
        }
        self.send(now, from, PeerMessage::RecoverChecked { matched });
    }

    /// A member's answer to this node's digest, or to its listing.
    pub(super) fn on_recover_checked(&mut self, now: Instant, from: NodeId, matched: bool) {
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        if !recovery.checks.remove(&from) {
            return;
        }
        if !matched {
            // It dropped them all: every copy it masters goes again.
            recovery.checks.insert(from);
            for (session, handle) in
                self.requester.sorted_keys_where(|copy| copy.master == Some(from) && copy.granted.is_some())
            {
                let Some(copy) = self.requester.get(session, handle) else { continue };
                let key: Key = (copy.lockspace, copy.name.clone());
                self.send_copy(now, from, &key, session, handle, true);
            }
            self.send(now, from, PeerMessage::RecoverListed);
            return;
        }
        self.locks_sent_if_answered(now);
    }

    /// A member that does not master a resource refused the copies sent
    /// straight to it: their master is looked up.
    pub(super) fn on_recover_refused(&mut self, now: Instant, from: NodeId, lockspace: &[u8], name: Vec<u8>) {
        let Some(id) = self.engine.lockspace_id(lockspace) else { return };
        let key: Key = (id, name.into_boxed_slice());
        if self.views.recovery.as_ref().is_some_and(|r| r.kept.is_none()) {
            let kept = self.kept_by_resource();
            if let Some(recovery) = self.views.recovery.as_mut() {
                recovery.kept = Some(kept);
            }
        }
        let Some(recovery) = self.views.recovery.as_mut() else { return };
        let kept = recovery.kept.as_ref().and_then(|kept| kept.get(&key)).cloned().unwrap_or_default();
        let mut refused = Vec::new();
        for (session, handle) in kept {
            if let Some(copy) = self.requester.get_mut(session, handle)
                && copy.master == Some(from)
                && copy.granted.is_some()
            {
                copy.master = None;
                refused.push((session, handle));
            }
        }
        let unsure = self.views.unsure_unlocks.contains_key(&key);
        if refused.is_empty() && !unsure {
            return;
        }
        self.stats.recovery_refused += 1;
        if let Some(recovery) = self.views.recovery.as_mut() {
            recovery.copies.entry(key.clone()).or_default().extend(refused);
        }
        self.look_up_in_recovery(now, key);
    }

    /// This node's granted copies whose master stayed, by resource, sorted:
    /// made at the first refusal (most recoveries have none).
    fn kept_by_resource(&self) -> HashMap<Key, Vec<(SessionId, LockHandle)>> {
        let mut kept: HashMap<Key, Vec<(SessionId, LockHandle)>> = HashMap::new();
        for ((session, handle), copy) in self.requester.iter() {
            if copy.granted.is_some() && copy.master.is_some_and(|m| self.stayed(m)) {
                kept.entry((copy.lockspace, copy.name.clone())).or_default().push((session, handle));
            }
        }
        kept.values_mut().for_each(|locks| locks.sort_unstable());
        kept
    }

    /// What this node says each member that stayed should hold for its
    /// clients: the granted copies naming it as master.
    fn digests_of_copies(&self) -> HashMap<NodeId, (u64, u128)> {
        let mut sums: HashMap<NodeId, (u64, u128)> = HashMap::new();
        let mut names: HashMap<LockspaceId, Vec<u8>> = HashMap::new();
        for ((session, handle), copy) in self.requester.iter() {
            let (Some(master), Some(mode), Some(token)) = (copy.master, copy.granted, copy.token) else { continue };
            if !self.stayed(master) {
                continue;
            }
            let lockspace = names.entry(copy.lockspace).or_insert_with(|| self.lockspace_name(copy.lockspace));
            let entry = LockEntry {
                lockspace,
                name: &copy.name,
                session,
                handle,
                mode: Some(mode),
                pending: false,
                token: token.0,
                persistent: copy.flags.contains(LockFlags::PERSISTENT),
            };
            let sum = sums.entry(master).or_default();
            sum.0 += 1;
            sum.1 ^= entry.hash();
        }
        sums
    }

    /// What this node holds for `node`'s clients (orphans aside: they are
    /// no session's).
    fn digest_of_node(&self, node: NodeId) -> (u64, u128) {
        let mut sum = (0, 0);
        for session in self.masters.remote_sessions_of(node) {
            self.engine.for_each_session_lock(session, |id, name, info| {
                let lockspace = self.engine.lockspace_name(id).unwrap_or_default();
                let entry = LockEntry {
                    lockspace,
                    name,
                    session,
                    handle: info.handle,
                    mode: info.granted,
                    pending: info.requested.is_some(),
                    token: info.token.map_or(0, |t| t.0),
                    persistent: info.flags.contains(LockFlags::PERSISTENT),
                };
                sum.0 += 1;
                sum.1 ^= entry.hash();
            });
        }
        sum
    }
}

/// One lock as the digest sees it.
struct LockEntry<'a> {
    lockspace: &'a [u8],
    name: &'a [u8],
    session: SessionId,
    handle: LockHandle,
    mode: Option<Mode>,
    pending: bool,
    token: u64,
    persistent: bool,
}

impl LockEntry<'_> {
    /// FNV-1a over 128 bits of the fields (names with their lengths), each
    /// half then mixed (SplitMix64's finaliser) so that entries differing in
    /// one byte differ in about half the bits.
    fn hash(&self) -> u128 {
        const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
        const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
        let mut h = OFFSET;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u128::from(b);
                h = h.wrapping_mul(PRIME);
            }
        };
        eat(&(self.lockspace.len() as u64).to_le_bytes());
        eat(self.lockspace);
        eat(&(self.name.len() as u64).to_le_bytes());
        eat(self.name);
        eat(&self.session.0.to_le_bytes());
        eat(&self.handle.0.to_le_bytes());
        eat(&[self.mode.map_or(0xff, |m| m.index() as u8), u8::from(self.pending), u8::from(self.persistent)]);
        eat(&self.token.to_le_bytes());
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let (high, low) = ((h >> 64) as u64, h as u64);
        (u128::from(mix(high ^ low.rotate_left(17))) << 64) | u128::from(mix(low ^ high.rotate_left(41)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &[u8], token: u64) -> u128 {
        LockEntry {
            lockspace: b"ls",
            name,
            session: SessionId(7),
            handle: LockHandle(1),
            mode: Some(Mode::Pr),
            pending: false,
            token,
            persistent: false,
        }
        .hash()
    }

    #[test]
    fn entries_that_differ_in_anything_hash_apart() {
        let base = entry(b"r", 5);
        assert_ne!(base, entry(b"s", 5));
        assert_ne!(base, entry(b"r", 6));
        // A name and a lockspace do not run into each other.
        let moved = LockEntry {
            lockspace: b"l",
            name: b"sr",
            session: SessionId(7),
            handle: LockHandle(1),
            mode: Some(Mode::Pr),
            pending: false,
            token: 5,
            persistent: false,
        };
        assert_ne!(entry(b"r", 5), moved.hash());
        // One byte of difference flips about half the bits.
        let flipped = (base ^ entry(b"r", 4)).count_ones();
        assert!((32..=96).contains(&flipped), "{flipped} bits");
    }
}
