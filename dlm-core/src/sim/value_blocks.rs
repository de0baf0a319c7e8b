//! The value-block check: a grant that reads a valid value block reads the
//! last value written, as far as the clients can know it.
//!
//! The simulated clients write random 64-bit values (so each names its
//! write) when they unlock a PW or EX lock. What a reader may see, without
//! `VALNOTVALID`:
//! - zeros (nothing written yet, or the resource was freed when its last
//!   lock went, which loses the value block);
//! - a value some client wrote to this resource, whose unlock was made
//!   before the grant was seen;
//! - but not a value known to be overwritten: if the write of that value
//!   completed before another write was made, and that other write
//!   completed before the reader's request was made, the master had applied
//!   the later write before it could grant the reader.
//!
//! Recovery may lose a write (an unlock in flight counts as done); the
//! value block must then be marked not valid, which this check enforces.
//! So must the death of a PW or EX holder (it may have changed what the
//! value describes without writing it): a read in a mode that conflicts
//! with the dead holder's, granted after its node crashed, may not see an
//! older value as valid.

use std::collections::HashMap;

use crate::ids::{LockHandle, SessionId};
use crate::mode::Mode;
use crate::time::Instant;

/// One write of a value block, by an unlock.
struct Write {
    value: u64,
    made: Instant,
    completed: Option<Instant>,
}

#[derive(Default)]
pub(super) struct ValueBlocks {
    /// Each resource's writes, in the order they were made.
    writes: HashMap<u32, Vec<Write>>,
    /// Writes whose unlock has not completed: the lock → (resource, index).
    unfinished: HashMap<(SessionId, LockHandle), (u32, usize)>,
    /// When each lock's latest lock or convert request was made.
    requested: HashMap<(SessionId, LockHandle), Instant>,
    /// When a PW or EX holder of each resource last died with its node.
    writer_died: HashMap<u32, Instant>,
}

impl ValueBlocks {
    /// A client asked for a lock or a conversion.
    pub(super) fn requested(&mut self, session: SessionId, handle: LockHandle, now: Instant) {
        self.requested.insert((session, handle), now);
    }

    /// A client unlocks, writing `value`.
    pub(super) fn write_made(
        &mut self,
        resource: u32,
        session: SessionId,
        handle: LockHandle,
        value: u64,
        now: Instant,
    ) {
        let writes = self.writes.entry(resource).or_default();
        writes.push(Write { value, made: now, completed: None });
        self.unfinished.insert((session, handle), (resource, writes.len() - 1));
    }

    /// A client's unlock completed.
    pub(super) fn unlocked(&mut self, session: SessionId, handle: LockHandle, now: Instant) {
        self.requested.remove(&(session, handle));
        if let Some((resource, i)) = self.unfinished.remove(&(session, handle))
            && let Some(write) = self.writes.get_mut(&resource).and_then(|w| w.get_mut(i))
        {
            write.completed = Some(now);
        }
    }

    /// A PW or EX holder of `resource` died with its node.
    pub(super) fn writer_died(&mut self, resource: u32, now: Instant) {
        self.writer_died.insert(resource, now);
    }

    /// A client's lock is gone (its handle may be used again).
    pub(super) fn forget(&mut self, session: SessionId, handle: LockHandle) {
        self.unfinished.remove(&(session, handle));
        self.requested.remove(&(session, handle));
    }

    /// A grant read `lvb` (not marked invalid): checks it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_read(
        &self,
        resource: u32,
        mode: Mode,
        session: SessionId,
        handle: LockHandle,
        lvb: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        let Some(bytes) = lvb.get(..8) else { return Err(format!("r{resource}: value block of {} bytes", lvb.len())) };
        let value = u64::from_le_bytes(bytes.try_into().expect("eight bytes"));
        if value == 0 {
            return Ok(());
        }
        let writes = self.writes.get(&resource).map_or(&[][..], Vec::as_slice);
        let Some(write) = writes.iter().find(|w| w.value == value && w.made <= now) else {
            return Err(format!("r{resource}: {session} {handle} read {value:#x}, which no client wrote there"));
        };
        let asked = self.requested.get(&(session, handle)).copied().unwrap_or(now);
        if let Some(&died) = self.writer_died.get(&resource)
            && asked > died
            && write.made < died
            && !mode.compatible(Mode::Pw)
        {
            return Err(format!(
                "r{resource}: {session} {handle} read {value:#x} as valid in {mode:?} after a PW or EX holder \
                 died at {died:?}"
            ));
        }
        if let Some(done) = write.completed
            && let Some(later) = writes.iter().find(|w| w.made > done && w.completed.is_some_and(|c| c < asked))
        {
            return Err(format!(
                "r{resource}: {session} {handle} (asked at {asked:?}) read {value:#x}, overwritten by {:#x} \
                 (written at {:?}, done at {:?}) before it asked",
                later.value, later.made, later.completed
            ));
        }
        Ok(())
    }
}
