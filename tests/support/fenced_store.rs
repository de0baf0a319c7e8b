//! A store that honours fencing tokens, after Jepsen's lock tests: the
//! workload a lock protects, and the check that a lock kept it safe.
//!
//! Each register holds a number. A client that holds a resource in EX reads
//! its register and writes the number plus one, giving its fencing token
//! with each operation. The store refuses any operation whose token is below
//! the highest it has seen for that register (a read raises it too: a
//! holder whose lock was taken while it was paused must not write over
//! what its successor read). That is all a real store has to do for the
//! guarantee; what it cannot do is make up for a lock that handed two
//! clients the same or falling tokens, or granted while another held.
//!
//! The check: every accepted write read the value it replaced (else an
//! update was lost), and a register's value is its number of accepted
//! writes.

use std::sync::Mutex;

/// The store's answer to an operation with a token below the highest seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale {
    /// The highest token the register had seen.
    pub seen: u64,
}

#[derive(Default)]
struct Register {
    highest: u64,
    value: u64,
    writes: u64,
    rejected: u64,
}

/// Registers `0..n`, shared by every client.
pub struct FencedStore {
    registers: Mutex<Vec<Register>>,
    /// What went wrong, in words: lost updates.
    lost: Mutex<Vec<String>>,
}

/// What the store saw, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Writes accepted.
    pub writes: u64,
    /// Operations refused for a stale token.
    pub rejected: u64,
}

impl FencedStore {
    /// `n` registers at 0.
    #[must_use]
    pub fn new(n: usize) -> FencedStore {
        FencedStore { registers: Mutex::new((0..n).map(|_| Register::default()).collect()), lost: Mutex::default() }
    }

    /// Reads register `r` with `token`.
    ///
    /// # Errors
    /// [`Stale`] when a higher token was seen.
    pub fn read(&self, r: usize, token: u64) -> Result<u64, Stale> {
        let mut registers = self.registers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let reg = &mut registers[r];
        admit(reg, token)?;
        Ok(reg.value)
    }

    /// Writes `read + 1` to register `r` with `token`, `read` being what
    /// this holder read before. A write accepted over a value other than
    /// `read` is a lost update, recorded.
    ///
    /// # Errors
    /// [`Stale`] when a higher token was seen.
    pub fn increment(&self, r: usize, token: u64, read: u64) -> Result<(), Stale> {
        let mut registers = self.registers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let reg = &mut registers[r];
        admit(reg, token)?;
        if reg.value != read {
            self.lost.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(format!(
                "register {r}: token {token} wrote {} over {} (it had read {read}): an update was lost",
                read + 1,
                reg.value
            ));
        }
        reg.value = read + 1;
        reg.writes += 1;
        Ok(())
    }

    /// Lost updates, and registers whose value is not their number of
    /// accepted writes.
    #[must_use]
    pub fn check(&self) -> Vec<String> {
        let mut problems = self.lost.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let registers = self.registers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (r, reg) in registers.iter().enumerate() {
            if reg.value != reg.writes {
                problems.push(format!("register {r}: value {} after {} accepted writes", reg.value, reg.writes));
            }
        }
        problems
    }

    /// Writes accepted and operations refused, over every register.
    #[must_use]
    pub fn tally(&self) -> Tally {
        let registers = self.registers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        registers
            .iter()
            .fold(Tally::default(), |t, r| Tally { writes: t.writes + r.writes, rejected: t.rejected + r.rejected })
    }
}

/// Lets an operation with `token` through, or refuses it as stale.
fn admit(reg: &mut Register, token: u64) -> Result<(), Stale> {
    if token < reg.highest {
        reg.rejected += 1;
        return Err(Stale { seen: reg.highest });
    }
    reg.highest = token;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_holder_whose_successor_read_cannot_write_and_nothing_is_lost() {
        let store = FencedStore::new(1);
        let old = store.read(0, 5).expect("first holder reads");
        // Its lock is taken while it is paused; the next holder reads.
        let new = store.read(0, 9).expect("successor reads");
        assert_eq!(store.increment(0, 5, old), Err(Stale { seen: 9 }), "the paused holder's write is refused");
        store.increment(0, 9, new).expect("successor writes");
        assert!(store.check().is_empty());
        assert_eq!(store.tally(), Tally { writes: 1, rejected: 1 });
    }

    #[test]
    fn two_holders_at_once_with_growing_tokens_lose_an_update_and_the_check_says_so() {
        // What a lock that granted while another held does, even with
        // growing tokens: both read 0 before either writes.
        let store = FencedStore::new(1);
        let a = store.read(0, 5).expect("a reads");
        store.increment(0, 5, a).expect("a writes");
        let b_read_before = 0;
        store.increment(0, 9, b_read_before).expect("b's token is higher: accepted");
        let problems = store.check();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("lost"), "{problems:?}");
        assert!(problems[1].contains("value 1 after 2 accepted writes"), "{problems:?}");
    }

    #[test]
    fn the_same_token_twice_is_let_through_and_caught_as_a_lost_update() {
        let store = FencedStore::new(1);
        let a = store.read(0, 7).expect("a");
        let b = store.read(0, 7).expect("b: the same token is not below the highest");
        store.increment(0, 7, a).expect("a writes");
        store.increment(0, 7, b).expect("b writes");
        assert!(store.check().iter().any(|p| p.contains("lost")), "{:?}", store.check());
    }
}
