//! The directory role: for the resources that hash to this node, which node
//! masters each one, under which term; and the largest fencing token
//! heard of per lockspace, handed to each new master so that tokens keep
//! growing across masters.
//!
//! [`Directory`] is the state and its rules, with no messages: one
//! [`Directory::claim`] gives an unmastered resource its master (the first
//! node to ask), [`Directory::lookup`] answers or holds a lookup, and
//! [`Directory::remove`] ends a mastership. The `ClusterNode` methods at the
//! bottom carry the messages.

use hashbrown::HashMap;

use crate::cluster::message::{NodeId, PeerMessage};
use crate::cluster::{ClusterNode, Key};
use crate::ids::LockspaceId;
use crate::time::Instant;

/// A mastership as the directory records it: the master and the
/// mastership's *term*, a number the directory hands out larger at each
/// claim, so that a message naming an older mastership of a resource is
/// told from one naming the current (not the agent's restart generation).
pub(super) type Mastership = (NodeId, u64);

#[derive(Default)]
struct Entry {
    master: Option<NodeId>,
    term: u64,
    /// Lookups held until the stale master's `Remove` arrives.
    held: Vec<NodeId>,
}

/// The answer to a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// This mastership (the asker's own if it was unmastered).
    Master(Mastership),
    /// The asker named the current mastership as stale: its `Remove` is on
    /// the way (links are ordered), and the lookup is answered then.
    Held,
}

#[derive(Default)]
pub(super) struct Directory {
    entries: HashMap<Key, Entry>,
    /// The largest fencing token heard of, per lockspace: handed with each
    /// lookup answer, so a new master starts above it (part 4 of
    /// [`crate::tokens`]).
    token_clock: HashMap<LockspaceId, u64>,
    /// The last mastership term handed out.
    last_term: u64,
}

impl Directory {
    /// The resource's mastership; an unmastered resource is claimed for
    /// `claimant`, with a new term.
    pub(super) fn claim(&mut self, key: Key, claimant: NodeId) -> Mastership {
        let entry = self.entries.entry(key).or_default();
        let master = *entry.master.get_or_insert_with(|| {
            self.last_term += 1;
            entry.term = self.last_term;
            claimant
        });
        (master, entry.term)
    }

    /// A lookup by `asker`, which may name a mastership it found stale. The
    /// directory node (`me`) never holds a lookup naming itself as stale.
    pub(super) fn lookup(&mut self, key: Key, asker: NodeId, stale: Option<Mastership>, me: NodeId) -> Answer {
        if let Some(entry) = self.entries.get_mut(&key)
            && let Some(master) = entry.master
            && stale == Some((master, entry.term))
            && master != me
        {
            entry.held.push(asker);
            return Answer::Held;
        }
        Answer::Master(self.claim(key, asker))
    }

    /// Ends `master`'s mastership of a resource if it is still the recorded
    /// one (term included); returns the lookups held for it, to be
    /// answered now.
    pub(super) fn remove(&mut self, key: &Key, master: NodeId, term: u64) -> Option<Vec<NodeId>> {
        let entry = self.entries.get(key)?;
        if entry.master != Some(master) || entry.term != term {
            return None;
        }
        self.entries.remove(key).map(|entry| entry.held)
    }

    /// Records a mastership a master reported while the directory is
    /// rebuilt (recovery). Terms handed out later are larger.
    pub(super) fn record(&mut self, key: Key, master: NodeId, term: u64) {
        self.last_term = self.last_term.max(term);
        self.entries.entry(key).or_insert(Entry { master: Some(master), term, held: Vec::new() });
    }

    /// Forgets every entry (recovery rebuilds them from the masters); the
    /// token clocks and the term counter stay.
    pub(super) fn clear_entries(&mut self) {
        self.entries.clear();
    }

    /// Raises the lockspace's token clock to a token handed out elsewhere.
    pub(super) fn raise_token_clock(&mut self, id: LockspaceId, token: u64) {
        let clock = self.token_clock.entry(id).or_default();
        *clock = (*clock).max(token);
    }

    /// The largest token heard of in a lockspace.
    pub(super) fn token_clock(&self, id: LockspaceId) -> u64 {
        self.token_clock.get(&id).copied().unwrap_or(0)
    }

    /// Every entry with a master, sorted.
    pub(super) fn entries(&self) -> Vec<(LockspaceId, Vec<u8>, NodeId)> {
        let mut all: Vec<(LockspaceId, Vec<u8>, NodeId)> =
            self.entries.iter().filter_map(|(k, e)| e.master.map(|m| (k.0, k.1.to_vec(), m))).collect();
        all.sort_unstable();
        all
    }

    /// Entries kept.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries kept in a lockspace.
    pub(super) fn count_in(&self, id: LockspaceId) -> usize {
        self.entries.keys().filter(|k| k.0 == id).count()
    }

    /// Forgets a released lockspace's entries and token clock (lockspace
    /// ids are never reused).
    pub(super) fn forget_lockspace(&mut self, id: LockspaceId) {
        self.entries.retain(|key, _| key.0 != id);
        self.token_clock.remove(&id);
    }
}

impl ClusterNode {
    /// The directory node of a resource.
    pub(super) fn directory_of(&self, key: &Key) -> NodeId {
        let lockspace = self.engine.lockspace_name(key.0).unwrap_or_default();
        self.config.membership.directory(lockspace, &key.1)
    }

    /// The largest fencing token handed out in a lockspace, here or anywhere
    /// this node has heard of.
    pub(super) fn token_floor(&self, id: LockspaceId) -> u64 {
        let own = self.engine.last_token(id).unwrap_or(0);
        own.max(self.directory.token_clock(id))
    }

    pub(super) fn on_lookup(
        &mut self,
        now: Instant,
        from: NodeId,
        lockspace: Vec<u8>,
        name: Vec<u8>,
        stale: Option<Mastership>,
    ) {
        let Some(id) = self.peer_lockspace(&lockspace) else {
            self.send(now, from, PeerMessage::LookupReply { lockspace, name, master: None, term: 0, token_floor: 0 });
            return;
        };
        let key: Key = (id, name.into_boxed_slice());
        let floor = self.token_floor(id);
        let Answer::Master((master, term)) = self.directory.lookup(key.clone(), from, stale, self.config.node) else {
            return;
        };
        let name = key.1.into_vec();
        self.send(
            now,
            from,
            PeerMessage::LookupReply { lockspace, name, master: Some(master), term, token_floor: floor },
        );
    }

    pub(super) fn on_remove(
        &mut self,
        now: Instant,
        from: NodeId,
        lockspace: &[u8],
        name: Vec<u8>,
        term: u64,
        token_floor: u64,
    ) {
        let Some(id) = self.engine.lockspace_id(lockspace) else { return };
        self.directory.raise_token_clock(id, token_floor);
        let key: Key = (id, name.into_boxed_slice());
        if let Some(held) = self.directory.remove(&key, from, term) {
            self.answer_held(now, key, held);
        }
    }

    /// Answers lookups held for a stale master, once its entry is gone: the
    /// first asker becomes master.
    pub(super) fn answer_held(&mut self, now: Instant, key: Key, held: Vec<NodeId>) {
        let Some(&first) = held.first() else { return };
        let lockspace = self.lockspace_name(key.0);
        let floor = self.token_floor(key.0);
        let (master, term) = self.directory.claim(key.clone(), first);
        for asker in held {
            if asker == self.config.node {
                self.on_lookup_reply(now, lockspace.clone(), key.1.to_vec(), Some((master, term)), floor);
                continue;
            }
            let (lockspace, name) = (lockspace.clone(), key.1.to_vec());
            self.send(
                now,
                asker,
                PeerMessage::LookupReply { lockspace, name, master: Some(master), term, token_floor: floor },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: NodeId = NodeId(1);

    fn key(name: &str) -> Key {
        (LockspaceId(0), name.as_bytes().into())
    }

    #[test]
    fn the_first_to_claim_an_unmastered_resource_masters_it_with_a_new_term() {
        let mut directory = Directory::default();
        assert_eq!(directory.claim(key("a"), NodeId(2)), (NodeId(2), 1));
        assert_eq!(directory.claim(key("a"), NodeId(3)), (NodeId(2), 1), "mastered already");
        assert_eq!(directory.claim(key("b"), NodeId(3)), (NodeId(3), 2));
        assert_eq!(directory.len(), 2);
    }

    #[test]
    fn a_lookup_naming_the_current_mastership_stale_is_held_until_its_remove() {
        let mut directory = Directory::default();
        assert_eq!(directory.lookup(key("a"), NodeId(2), None, ME), Answer::Master((NodeId(2), 1)));
        assert_eq!(directory.lookup(key("a"), NodeId(3), Some((NodeId(2), 1)), ME), Answer::Held);
        assert_eq!(directory.lookup(key("a"), ME, Some((NodeId(2), 1)), ME), Answer::Held);
        // A stale mastership of another term is not the current one.
        assert_eq!(directory.lookup(key("a"), NodeId(3), Some((NodeId(2), 7)), ME), Answer::Master((NodeId(2), 1)));
        // Only the recorded master and term may remove it.
        assert_eq!(directory.remove(&key("a"), NodeId(3), 1), None);
        assert_eq!(directory.remove(&key("a"), NodeId(2), 2), None);
        assert_eq!(directory.remove(&key("a"), NodeId(2), 1), Some(vec![NodeId(3), ME]));
        assert_eq!(directory.len(), 0);
        // The first held asker is the next master.
        assert_eq!(directory.claim(key("a"), NodeId(3)), (NodeId(3), 2));
    }

    #[test]
    fn the_directory_node_never_holds_a_lookup_naming_itself_stale() {
        let mut directory = Directory::default();
        assert_eq!(directory.claim(key("a"), ME), (ME, 1));
        assert_eq!(directory.lookup(key("a"), NodeId(2), Some((ME, 1)), ME), Answer::Master((ME, 1)));
    }

    #[test]
    fn the_token_clock_only_grows_and_is_kept_per_lockspace() {
        let mut directory = Directory::default();
        directory.raise_token_clock(LockspaceId(1), 10);
        directory.raise_token_clock(LockspaceId(1), 4);
        assert_eq!(directory.token_clock(LockspaceId(1)), 10);
        assert_eq!(directory.token_clock(LockspaceId(2)), 0);
    }
}
