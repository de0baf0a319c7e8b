//! A dump in pages of bounded work: each page gives at most so many
//! resources and locks and looks at most at [`SLOTS_PER_PAGE_MAX`]
//! resource slots, and ends with a [`DumpCursor`] to go on from. So a
//! resource with a million locks is dumped in slices, between which the
//! engine serves everything else, instead of in one stall.
//!
//! Pages are not a snapshot: what changes between two pages may be seen in
//! its new state or missed (as with the kernel DLM's debugfs files).
//! Resources come in slot order, not by name; a resource split over pages
//! comes again in the next page with [`ResourceInfo::continued`] set and
//! the rest of its queues.
//!
//! The cursor names the next lock to give. If that lock is still there, in
//! the same queue, the next page starts from it in constant time; if it has
//! gone, the page starts after as many locks of the queue as were given.

use super::{LockInfo, ResourceInfo, lock_info};
use crate::ids::{FencingToken, LockHandle, SessionId};
use crate::lock::LockState;
use crate::lockspace::Lockspace;
use crate::queue::Queue;
use crate::resource::Resource;
use crate::slab::NIL;

/// Resource slots one page looks at, at most (occupied or not): a
/// lockspace whose resources were mostly freed has long runs of free slots.
pub const SLOTS_PER_PAGE_MAX: u32 = 1 << 16;

/// Where the next page of a dump starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DumpCursor {
    /// The resource's slot.
    resource: u32,
    /// A hash of its name: a slot freed and taken by another resource
    /// between pages is not continued as if it were the same.
    name_hash: u64,
    /// The queue (0 granted, 1 converting, 2 waiting) and how many of its
    /// locks were given; (0, 0) starts the resource afresh.
    queue: u8,
    given: u32,
    /// The next lock to give, and whose it is.
    lock: u32,
    session: SessionId,
    handle: LockHandle,
}

const CURSOR_VERSION: u8 = 1;
const CURSOR_LEN: usize = 1 + 4 + 8 + 1 + 4 + 4 + 8 + 8;

impl DumpCursor {
    fn at_resource(resource: u32) -> DumpCursor {
        DumpCursor {
            resource,
            name_hash: 0,
            queue: 0,
            given: 0,
            lock: NIL,
            session: SessionId(0),
            handle: LockHandle(0),
        }
    }

    /// The cursor as opaque bytes, for a client to hand back.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(CURSOR_LEN);
        bytes.push(CURSOR_VERSION);
        bytes.extend_from_slice(&self.resource.to_le_bytes());
        bytes.extend_from_slice(&self.name_hash.to_le_bytes());
        bytes.push(self.queue);
        bytes.extend_from_slice(&self.given.to_le_bytes());
        bytes.extend_from_slice(&self.lock.to_le_bytes());
        bytes.extend_from_slice(&self.session.0.to_le_bytes());
        bytes.extend_from_slice(&self.handle.0.to_le_bytes());
        bytes
    }

    /// A cursor from [`DumpCursor::to_bytes`]; `None` for anything else.
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<DumpCursor> {
        if bytes.len() != CURSOR_LEN || bytes[0] != CURSOR_VERSION {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let queue = bytes[13];
        if queue > 2 {
            return None;
        }
        Some(DumpCursor {
            resource: u32_at(1),
            name_hash: u64_at(5),
            queue,
            given: u32_at(14),
            lock: u32_at(18),
            session: SessionId(u64_at(22)),
            handle: LockHandle(u64_at(30)),
        })
    }
}

/// One page of a dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpPage {
    /// The resources, or the part of them this page gives.
    pub resources: Vec<ResourceInfo>,
    /// Where the next page starts; `None` when this was the last.
    pub next: Option<DumpCursor>,
}

/// How much one page may give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageBounds {
    /// Resources (whole or in part), at least 1.
    pub resources: usize,
    /// Locks, at least 1.
    pub locks: usize,
}

/// FNV-1a: stable across processes, so a cursor means the same after a restart.
fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3))
}

const QUEUE_STATES: [LockState; 3] = [LockState::Granted, LockState::Converting, LockState::Waiting];

impl Lockspace {
    /// A page of the dump of every resource (or of the one named), from
    /// `from` (the start when `None`).
    pub(crate) fn dump_page(&self, name: Option<&[u8]>, from: Option<&DumpCursor>, bounds: PageBounds) -> DumpPage {
        let (mut slot, end) = match name {
            Some(name) => match self.find_resource(name) {
                Some(r) => (r, r + 1),
                None => return DumpPage::default(),
            },
            None => (from.map_or(0, |c| c.resource), self.resources.capacity_used()),
        };
        let (mut resources_left, mut locks_left) = (bounds.resources.max(1), bounds.locks.max(1));
        let mut page = DumpPage::default();
        let mut scanned = 0;
        while slot < end {
            if scanned == SLOTS_PER_PAGE_MAX {
                page.next = Some(DumpCursor::at_resource(slot));
                return page;
            }
            scanned += 1;
            let Some(resource) = self.resources.get(slot) else {
                slot += 1;
                continue;
            };
            if resources_left == 0 || locks_left == 0 {
                page.next = Some(DumpCursor::at_resource(slot));
                return page;
            }
            resources_left -= 1;
            let hash = name_hash(&resource.name);
            let resume =
                from.filter(|c| c.resource == slot && c.name_hash == hash && (c.queue, c.given) != (0, 0)).copied();
            let mut info = header(resource, resume.is_some());
            let queues = [&resource.granted, &resource.converting, &resource.waiting];
            for q in resume.map_or(0, |c| usize::from(c.queue))..3 {
                let (mut at, mut given) = match resume {
                    Some(c) if usize::from(c.queue) == q => (self.resume_at(queues[q], QUEUE_STATES[q], &c), c.given),
                    _ => (queues[q].head, 0),
                };
                while at != NIL {
                    if locks_left == 0 {
                        let lock = &self.locks[at];
                        page.next = Some(DumpCursor {
                            resource: slot,
                            name_hash: hash,
                            queue: u8::try_from(q).expect("three queues"),
                            given,
                            lock: at,
                            session: lock.session,
                            handle: lock.handle,
                        });
                        page.resources.push(info);
                        return page;
                    }
                    queue_of(&mut info, q).push(lock_info(&self.locks, at));
                    locks_left -= 1;
                    given += 1;
                    at = self.locks[at].next;
                }
            }
            page.resources.push(info);
            slot += 1;
        }
        page
    }

    /// Where to go on in `queue`: the cursor's lock if it is still there,
    /// else past as many locks as were given.
    fn resume_at(&self, queue: &Queue, state: LockState, cursor: &DumpCursor) -> u32 {
        let still_there = self.locks.get(cursor.lock).is_some_and(|lock| {
            lock.resource == cursor.resource
                && lock.state == state
                && lock.session == cursor.session
                && lock.handle == cursor.handle
        });
        if still_there {
            return cursor.lock;
        }
        queue.iter(&self.locks).nth(cursor.given as usize).unwrap_or(NIL)
    }
}

fn header(resource: &Resource, continued: bool) -> ResourceInfo {
    ResourceInfo {
        name: resource.name.to_vec(),
        lvb: resource.lvb.as_ref().map(|lvb| lvb.to_vec()),
        lvb_valid: !resource.lvb_invalid,
        last_token: FencingToken(resource.last_token),
        granted: Vec::new(),
        converting: Vec::new(),
        waiting: Vec::new(),
        continued,
    }
}

fn queue_of(info: &mut ResourceInfo, q: usize) -> &mut Vec<LockInfo> {
    match q {
        0 => &mut info.granted,
        1 => &mut info.converting,
        _ => &mut info.waiting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_survives_its_bytes_and_nothing_else_passes_for_one() {
        let cursor = DumpCursor {
            resource: 7,
            name_hash: name_hash(b"r"),
            queue: 2,
            given: 1_000_000,
            lock: 42,
            session: SessionId(9),
            handle: LockHandle(u64::MAX),
        };
        assert_eq!(DumpCursor::from_bytes(&cursor.to_bytes()), Some(cursor));
        let mut bad_queue = cursor.to_bytes();
        bad_queue[13] = 3;
        let mut bad_version = cursor.to_bytes();
        bad_version[0] = 0;
        for bytes in [bad_queue, bad_version, Vec::new(), vec![CURSOR_VERSION; 10], vec![0; CURSOR_LEN + 1]] {
            assert_eq!(DumpCursor::from_bytes(&bytes), None, "{bytes:?}");
        }
    }
}
