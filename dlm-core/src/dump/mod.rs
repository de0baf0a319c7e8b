//! Read-only views of the engine's state, for `dump`/`ls` commands and tests
//! (like `dlm_tool lockdebug`); [`DumpPage`]s for dumps of any size.

use crate::flags::LockFlags;
use crate::ids::{FencingToken, LockHandle, LockspaceId, SessionId};
use crate::lock::{Lock, LockState};
use crate::lockspace::{Lockspace, LockspaceConfig};
use crate::mode::Mode;
use crate::queue::Queue;
use crate::slab::Slab;

mod page;

pub use page::{DumpCursor, DumpPage, PageBounds, SLOTS_PER_PAGE_MAX};

/// A lockspace and its counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockspaceInfo {
    /// Its id.
    pub id: LockspaceId,
    /// Its name.
    pub name: Vec<u8>,
    /// Its settings.
    pub config: LockspaceConfig,
    /// Resources that exist (each has at least one lock).
    pub resources: u32,
    /// Locks, orphans included.
    pub locks: u32,
    /// Locks with a request pending (waiting or converting).
    pub waiting: u32,
}

/// One resource with its three queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceInfo {
    /// The resource name.
    pub name: Vec<u8>,
    /// The value block, if one was ever written.
    pub lvb: Option<Vec<u8>>,
    /// Whether the value block is valid.
    pub lvb_valid: bool,
    /// The fencing token of the latest grant.
    pub last_token: FencingToken,
    /// Granted locks.
    pub granted: Vec<LockInfo>,
    /// Granted locks waiting to convert, in queue order.
    pub converting: Vec<LockInfo>,
    /// New requests waiting, in queue order.
    pub waiting: Vec<LockInfo>,
    /// In a paged dump: the previous page gave this resource's first locks,
    /// these are the rest (or the next part) of its queues.
    pub continued: bool,
}

/// One lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// The owning session (the former owner, for an orphan).
    pub session: SessionId,
    /// The owner's handle for it.
    pub handle: LockHandle,
    /// Whether its session ended and it lives on as an orphan.
    pub orphan: bool,
    /// The granted mode, if granted.
    pub granted: Option<Mode>,
    /// The mode of the pending request, if one is pending.
    pub requested: Option<Mode>,
    /// The token of its latest grant.
    pub token: Option<FencingToken>,
    /// The flags of its latest request.
    pub flags: LockFlags,
}

impl Lockspace {
    pub(crate) fn info(&self) -> LockspaceInfo {
        LockspaceInfo {
            id: self.id,
            name: self.name.to_vec(),
            config: self.config,
            resources: self.resources.len(),
            locks: self.locks.len(),
            waiting: u32::try_from(self.waiting_by_session.len()).unwrap_or(u32::MAX),
        }
    }

    pub(crate) fn dump(&self, name: Option<&[u8]>, max_resources: usize) -> Vec<ResourceInfo> {
        let mut selected: Vec<u32> = match name {
            Some(name) => self.find_resource(name).into_iter().collect(),
            None => self.resources.iter().map(|(r, _)| r).collect(),
        };
        selected.sort_unstable_by(|&a, &b| self.resources[a].name.cmp(&self.resources[b].name));
        selected.truncate(max_resources);
        selected
            .into_iter()
            .map(|r| {
                let resource = &self.resources[r];
                let queue = |queue: &Queue| queue.iter(&self.locks).map(|l| lock_info(&self.locks, l)).collect();
                ResourceInfo {
                    name: resource.name.to_vec(),
                    lvb: resource.lvb.as_ref().map(|lvb| lvb.to_vec()),
                    lvb_valid: !resource.lvb_invalid,
                    last_token: FencingToken(resource.last_token),
                    granted: queue(&resource.granted),
                    converting: queue(&resource.converting),
                    waiting: queue(&resource.waiting),
                    continued: false,
                }
            })
            .collect()
    }

    pub(crate) fn lock_info(&self, l: u32) -> Option<LockInfo> {
        self.locks.get(l).map(|_| lock_info(&self.locks, l))
    }
}

fn lock_info(locks: &Slab<Lock>, l: u32) -> LockInfo {
    let lock = &locks[l];
    LockInfo {
        session: lock.session,
        handle: lock.handle,
        orphan: lock.orphan,
        granted: lock.granted,
        requested: matches!(lock.state, LockState::Converting | LockState::Waiting).then_some(lock.requested),
        token: (lock.token > 0).then_some(FencingToken(lock.token)),
        flags: lock.flags,
    }
}
