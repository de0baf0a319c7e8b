//! Lock-delay (Chubby's and Consul's): a hold taken from its holder without
//! an unlock stays in the way of conflicting requests for the lockspace's
//! `lock_delay`, so that a holder that has not yet acted on being told it
//! lost the lock (or was never told: its node vanished) has that long to
//! stop before anyone else is granted.
//!
//! What is kept is not a lock but a *ghost*: a resource name, the strongest
//! mode taken from it, and when it ends. It has no session and no queue
//! place; [`Lockspace::grantable`](super::Lockspace) refuses any mode it
//! conflicts with, so requests wait (or fail with `NOQUEUE`) exactly as they
//! would behind the holder. At its end the resource settles again. A ghost
//! is kept by name, so it outlives its resource being freed and applies to
//! a resource made anew under that name.
//!
//! A cluster sets ghosts in recovery (see [`crate::cluster`]): on the
//! departed nodes' granted locks that a master purges, and, with mode EX, on
//! every resource a node becomes master of while a departure is younger
//! than the delay (the new master cannot know what the departed node held).
//! Fencing tokens stay the guarantee for a holder that pauses longer.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::mode::Mode;
use crate::time::Instant;

/// The ghosts of one lockspace.
#[derive(Default)]
pub(crate) struct Delays {
    by_name: HashMap<Arc<[u8]>, Ghost>,
    /// Names by the end they had when added. A ghost joined later to a later
    /// end stays listed under its old end too: an entry counts only if the
    /// ghost still ends then (a recovery adds thousands of ghosts with one
    /// end; keeping them apart by end alone, not sorted by name, is what
    /// makes that cheap, as is one copy of each name shared by both maps).
    by_end: BTreeMap<Instant, Vec<Arc<[u8]>>>,
}

#[derive(Clone, Copy)]
struct Ghost {
    mode: Mode,
    until: Instant,
}

impl Delays {
    /// Keeps `mode` in the way on `name` until `until`; joined with a ghost
    /// already there (the stronger mode, the later end).
    pub(crate) fn add(&mut self, name: &[u8], mode: Mode, until: Instant) {
        if mode == Mode::Nl {
            return;
        }
        let (name, ghost) = match self.by_name.get_key_value_mut(name) {
            Some((name, old)) => {
                let moved = until > old.until;
                *old = Ghost { mode: join(old.mode, mode), until: old.until.max(until) };
                if !moved {
                    return;
                }
                (Arc::clone(name), *old)
            }
            None => {
                let ghost = Ghost { mode, until };
                let name: Arc<[u8]> = name.into();
                self.by_name.insert(Arc::clone(&name), ghost);
                (name, ghost)
            }
        };
        self.by_end.entry(ghost.until).or_default().push(name);
    }

    /// Whether a ghost on `name` conflicts with `mode`.
    pub(crate) fn blocks(&self, name: &[u8], mode: Mode) -> bool {
        !self.by_name.is_empty() && self.by_name.get(name).is_some_and(|ghost| !ghost.mode.compatible(mode))
    }

    /// When the first ghost ends (or a little before: an entry left behind
    /// by a ghost that was made longer, which [`Delays::take_ended`] drops).
    pub(crate) fn next_end(&self) -> Option<Instant> {
        self.by_end.first_key_value().map(|(at, _)| *at)
    }

    /// Removes the ghosts ended at `now` and returns their names.
    pub(crate) fn take_ended(&mut self, now: Instant) -> Vec<Arc<[u8]>> {
        let mut ended = Vec::new();
        while let Some(entry) = self.by_end.first_entry() {
            if *entry.key() > now {
                break;
            }
            let (at, names) = entry.remove_entry();
            for name in names {
                if self.by_name.get(&name).is_some_and(|ghost| ghost.until == at) {
                    self.by_name.remove(&name);
                    ended.push(name);
                }
            }
        }
        ended
    }

    /// How many ghosts there are.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }
}

/// The weakest mode that conflicts with everything either mode conflicts
/// with. Modes held together are compatible, and among compatible modes the
/// higher one conflicts with all the lower one does; two incompatible modes
/// were not held together, so only EX covers both.
fn join(a: Mode, b: Mode) -> Mode {
    if !a.compatible(b) {
        return Mode::Ex;
    }
    if a.index() >= b.index() { a } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::ALL_MODES;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn a_ghost_blocks_what_its_mode_conflicts_with_until_it_ends() {
        let mut delays = Delays::default();
        delays.add(b"r", Mode::Pr, at(10));
        assert!(delays.blocks(b"r", Mode::Ex));
        assert!(delays.blocks(b"r", Mode::Cw));
        assert!(!delays.blocks(b"r", Mode::Pr));
        assert!(!delays.blocks(b"r", Mode::Cr));
        assert!(!delays.blocks(b"other", Mode::Ex));
        assert_eq!(delays.next_end(), Some(at(10)));
        assert!(delays.take_ended(at(9)).is_empty());
        assert_eq!(delays.take_ended(at(10)), vec![Arc::<[u8]>::from(&b"r"[..])]);
        assert!(!delays.blocks(b"r", Mode::Ex));
        assert_eq!(delays.len(), 0);
    }

    #[test]
    fn ghosts_on_one_name_join_to_the_stronger_mode_and_the_later_end() {
        let mut delays = Delays::default();
        delays.add(b"r", Mode::Cr, at(20));
        delays.add(b"r", Mode::Cw, at(10));
        assert!(delays.blocks(b"r", Mode::Pr), "CW is kept");
        assert!(delays.take_ended(at(10)).is_empty(), "the later end is kept");
        assert_eq!(delays.take_ended(at(20)).len(), 1);
    }

    #[test]
    fn the_join_conflicts_with_everything_either_mode_conflicts_with() {
        for a in ALL_MODES {
            for b in ALL_MODES {
                let joined = join(a, b);
                for m in ALL_MODES {
                    if !a.compatible(m) || !b.compatible(m) {
                        assert!(!joined.compatible(m), "join({a:?}, {b:?}) = {joined:?} lets {m:?} through");
                    }
                }
            }
        }
    }

    #[test]
    fn a_null_ghost_is_not_kept() {
        let mut delays = Delays::default();
        delays.add(b"r", Mode::Nl, at(10));
        assert_eq!(delays.len(), 0);
    }
}
