//! Lock modes and the three decision tables that depend only on modes: which
//! modes may be granted together, which way the lock value block moves on a
//! grant, and which conversions may be queued with `QUECVT`.
//!
//! The tables are the VMS / Linux DLM's; `testdata/*.txt` holds them as text
//! fixtures that the tests compare against these functions.

use std::fmt;

/// A lock mode, from the weakest (`Nl`) to the strongest (`Ex`).
///
/// The numeric order is the one the DLM uses when it compares "higher" modes
/// (for blocking callbacks and the value block table); it is not a total order
/// of strength (`Cw` and `Pr` are incomparable), which is why compatibility is
/// a table and not a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Mode {
    /// Null: no access, only interest; keeps the resource and its value block alive.
    Nl = 0,
    /// Concurrent read: read, others may write.
    Cr = 1,
    /// Concurrent write: write, others may read and write.
    Cw = 2,
    /// Protected read: read, nobody writes.
    Pr = 3,
    /// Protected write: write, others may only read concurrently (`Cr`).
    Pw = 4,
    /// Exclusive: nobody else has access.
    Ex = 5,
}

/// Every mode, weakest first.
pub const ALL_MODES: [Mode; 6] = [Mode::Nl, Mode::Cr, Mode::Cw, Mode::Pr, Mode::Pw, Mode::Ex];

/// `COMPATIBLE[a][b]`: a lock granted in `a` lets another be granted in `b`.
const COMPATIBLE: [[bool; 6]; 6] = {
    const T: bool = true;
    const F: bool = false;
    [
        // NL CR CW PR PW EX
        [T, T, T, T, T, T], // NL
        [T, T, T, T, T, F], // CR
        [T, T, T, F, F, F], // CW
        [T, T, F, T, F, F], // PR
        [T, T, F, F, F, F], // PW
        [T, F, F, F, F, F], // EX
    ]
};

/// `QUECVT_ALLOWED[from][to]`: a conversion that may carry `QUECVT`. Only
/// conversions that can ever wait (up-conversions, and PR to CW which is
/// neither up nor down) may be forced into the queue.
const QUECVT_ALLOWED: [[bool; 6]; 6] = {
    const T: bool = true;
    const F: bool = false;
    [
        // NL CR CW PR PW EX
        [F, T, T, T, T, T], // NL
        [F, F, T, T, T, T], // CR
        [F, F, F, T, T, T], // CW
        [F, F, T, F, T, T], // PR
        [F, F, F, F, F, T], // PW
        [F, F, F, F, F, F], // EX
    ]
};

/// What a grant does with the resource's lock value block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LvbAction {
    /// The grant returns the resource's value block to the requester.
    Read,
    /// The requester's value block is written to the resource.
    Write,
    /// The value block is neither read nor written.
    None,
}

impl Mode {
    /// Every mode, weakest first.
    pub const ALL: [Mode; 6] = ALL_MODES;

    /// Whether a lock granted in `self` allows another lock to be granted in `other`.
    /// The relation is symmetric.
    #[must_use]
    pub const fn compatible(self, other: Mode) -> bool {
        COMPATIBLE[self as usize][other as usize]
    }

    /// Whether converting from `self` to `to` may carry `QUECVT`.
    #[must_use]
    pub const fn quecvt_allowed(self, to: Mode) -> bool {
        QUECVT_ALLOWED[self as usize][to as usize]
    }

    /// What granting `to` does to the value block for a lock that holds `from`
    /// (`None` for a new request). Holders of PW or EX write it when they go
    /// down (or re-grant EX); every other grant reads it.
    #[must_use]
    pub const fn lvb_action(from: Option<Mode>, to: Mode) -> LvbAction {
        match from {
            None => LvbAction::Read,
            Some(Mode::Pw) => match to {
                Mode::Ex => LvbAction::Read,
                _ => LvbAction::Write,
            },
            Some(Mode::Ex) => LvbAction::Write,
            // Below PW nobody may write: going up (or staying) reads, going
            // down leaves the value block alone.
            Some(from) => {
                if (to as u8) >= (from as u8) {
                    LvbAction::Read
                } else {
                    LvbAction::None
                }
            }
        }
    }

    /// Whether an unlock from this mode writes the value block: only holders
    /// that could have written (PW, EX) do.
    #[must_use]
    pub const fn unlock_writes_lvb(self) -> bool {
        matches!(self, Mode::Pw | Mode::Ex)
    }

    /// The mode's index in [`Mode::ALL`].
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The mode with this index, if any.
    #[must_use]
    pub const fn from_index(index: usize) -> Option<Mode> {
        if index < 6 { Some(ALL_MODES[index]) } else { None }
    }

    /// The short upper-case name the DLM tools use (`NL`, `CR`, …).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Nl => "NL",
            Mode::Cr => "CR",
            Mode::Cw => "CW",
            Mode::Pr => "PR",
            Mode::Pw => "PW",
            Mode::Ex => "EX",
        }
    }

    /// Parses a mode name, in any case.
    #[must_use]
    pub fn parse(name: &str) -> Option<Mode> {
        ALL_MODES.into_iter().find(|mode| mode.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of modes (one bit each, in [`Mode::index`] order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ModeSet(u8);

impl ModeSet {
    /// No mode.
    pub const EMPTY: ModeSet = ModeSet(0);

    /// The set of these modes.
    #[must_use]
    pub fn of(modes: &[Mode]) -> ModeSet {
        modes.iter().fold(ModeSet::EMPTY, |set, &m| set.with(m))
    }

    /// This set and `mode`.
    #[must_use]
    pub const fn with(self, mode: Mode) -> ModeSet {
        ModeSet(self.0 | 1 << mode as u8)
    }

    /// This set without `mode`.
    #[must_use]
    pub const fn without(self, mode: Mode) -> ModeSet {
        ModeSet(self.0 & !(1 << mode as u8))
    }

    /// Whether `mode` is in the set.
    #[must_use]
    pub const fn contains(self, mode: Mode) -> bool {
        self.0 & 1 << mode as u8 != 0
    }

    /// Whether the set is empty.
    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The modes in the set, strongest first.
    pub fn strongest_first(self) -> impl Iterator<Item = Mode> {
        ALL_MODES.into_iter().rev().filter(move |&m| self.contains(m))
    }

    /// Its bits (bit `i` for the mode of index `i`), for the wire.
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set of these bits, if each names a mode.
    #[must_use]
    pub const fn from_bits(bits: u8) -> Option<ModeSet> {
        if bits >> ALL_MODES.len() == 0 { Some(ModeSet(bits)) } else { None }
    }
}

/// A small set of modes, used to summarise which modes are granted or blocked on a resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeCounts([u32; 6]);

impl ModeCounts {
    /// Counts one more lock in `mode`.
    pub fn add(&mut self, mode: Mode) {
        self.0[mode.index()] += 1;
    }

    /// Counts one lock in `mode` fewer.
    pub fn remove(&mut self, mode: Mode) {
        debug_assert!(self.0[mode.index()] > 0, "mode count underflow");
        self.0[mode.index()] = self.0[mode.index()].saturating_sub(1);
    }

    /// How many locks are counted in `mode`.
    #[must_use]
    pub fn get(&self, mode: Mode) -> u32 {
        self.0[mode.index()]
    }

    /// Whether no lock is counted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&n| n == 0)
    }

    /// Whether `mode` is compatible with every counted mode, not counting one
    /// lock in `except` (the requester's own granted mode during a conversion).
    #[must_use]
    pub fn compatible_with(&self, mode: Mode, except: Option<Mode>) -> bool {
        ALL_MODES.iter().all(|&held| {
            let mut n = self.0[held.index()];
            if except == Some(held) {
                n -= 1;
            }
            n == 0 || held.compatible(mode)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_is_symmetric_and_nl_is_compatible_with_everything() {
        for a in ALL_MODES {
            assert!(Mode::Nl.compatible(a));
            for b in ALL_MODES {
                assert_eq!(a.compatible(b), b.compatible(a), "{a} {b}");
            }
        }
    }

    #[test]
    fn parse_round_trips_names() {
        for mode in ALL_MODES {
            assert_eq!(Mode::parse(&mode.name().to_lowercase()), Some(mode));
        }
        assert_eq!(Mode::parse("XX"), None);
    }

    #[test]
    fn counts_ignore_the_requesters_own_mode() {
        let mut counts = ModeCounts::default();
        counts.add(Mode::Pr);
        assert!(!counts.compatible_with(Mode::Ex, None));
        assert!(counts.compatible_with(Mode::Ex, Some(Mode::Pr)));
        counts.add(Mode::Pr);
        assert!(!counts.compatible_with(Mode::Ex, Some(Mode::Pr)));
    }
}
