//! Who is in the cluster, and which member is a resource's directory node.

use crate::cluster::message::NodeId;

/// A cluster member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its share of directory entries, relative to the others (1 to
    /// [`WEIGHT_MAX`]; the Linux DLM's `weight`). 0 would make a node hold no
    /// directory entries, which the hashing below does not allow.
    pub weight: u8,
}

/// The largest member weight.
pub const WEIGHT_MAX: u8 = 64;
/// The most members a cluster may have.
pub const MEMBERS_MAX: usize = 256;

/// The membership of one epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The members, sorted by id, no duplicates.
    members: Vec<Member>,
    /// The epoch number (agreed by consensus once membership changes; static for now).
    pub epoch: u64,
}

impl Membership {
    /// A membership from a list of members.
    ///
    /// # Errors
    /// No member, too many, a duplicate id, or a weight out of range.
    pub fn new(mut members: Vec<Member>, epoch: u64) -> Result<Membership, String> {
        if members.is_empty() || members.len() > MEMBERS_MAX {
            return Err(format!("a cluster has 1 to {MEMBERS_MAX} members, got {}", members.len()));
        }
        members.sort_by_key(|m| m.id);
        if let Some(pair) = members.windows(2).find(|pair| pair[0].id == pair[1].id) {
            return Err(format!("{} is listed twice", pair[0].id));
        }
        if let Some(m) = members.iter().find(|m| m.weight == 0 || m.weight > WEIGHT_MAX) {
            return Err(format!("{}: weight must be 1 to {WEIGHT_MAX}, got {}", m.id, m.weight));
        }
        Ok(Membership { members, epoch })
    }

    /// The members, by id.
    #[must_use]
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Whether `id` is a member.
    #[must_use]
    pub fn contains(&self, id: NodeId) -> bool {
        self.members.binary_search_by_key(&id, |m| m.id).is_ok()
    }

    /// The directory node of a resource: weighted rendezvous hashing over the
    /// members (each member draws `weight` tickets; the highest ticket wins),
    /// so that a member joining or leaving moves only the entries it gains or
    /// held. Integer-only, so that every node computes the same answer.
    #[must_use]
    pub fn directory(&self, lockspace: &[u8], name: &[u8]) -> NodeId {
        let key = fnv1a(fnv1a(FNV_OFFSET, lockspace) ^ 0xff, name);
        let mut best = (0u64, self.members[0].id);
        for member in &self.members {
            for ticket in 0..u64::from(member.weight) {
                let score = mix(key ^ mix(u64::from(member.id.0) << 8 | ticket));
                if score >= best.0 {
                    best = (score, member.id);
                }
            }
        }
        best.1
    }

    /// The member that collects wait-for edges to find deadlocks across
    /// nodes: the lowest id.
    #[must_use]
    pub fn coordinator(&self) -> NodeId {
        self.members[0].id
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// SplitMix64's finaliser: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u8]) -> Membership {
        let list = weights.iter().enumerate().map(|(i, &w)| Member { id: NodeId(i as u16 + 1), weight: w }).collect();
        Membership::new(list, 1).unwrap()
    }

    #[test]
    fn directory_spreads_by_weight_and_moves_little_when_a_member_leaves() {
        let three = members(&[1, 1, 2]);
        let mut counts = [0usize; 3];
        let names: Vec<Vec<u8>> = (0..20_000).map(|i| format!("res{i}").into_bytes()).collect();
        for name in &names {
            counts[usize::from(three.directory(b"ls", name).0 - 1)] += 1;
        }
        // Expected shares 1/4, 1/4, 1/2.
        assert!((4000..6000).contains(&counts[0]), "{counts:?}");
        assert!((4000..6000).contains(&counts[1]), "{counts:?}");
        assert!((9000..11000).contains(&counts[2]), "{counts:?}");
        let two = Membership::new(vec![three.members[0], three.members[2]], 2).unwrap();
        for name in &names {
            let before = three.directory(b"ls", name);
            if before != NodeId(2) {
                assert_eq!(two.directory(b"ls", name), before, "an entry moved without need");
            }
        }
    }

    #[test]
    fn bad_memberships_are_refused() {
        assert!(Membership::new(vec![], 1).is_err());
        let m = Member { id: NodeId(1), weight: 1 };
        assert!(Membership::new(vec![m, m], 1).is_err());
        assert!(Membership::new(vec![Member { id: NodeId(1), weight: 0 }], 1).is_err());
    }
}
