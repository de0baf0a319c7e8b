//! One resource: its name, value block, queues and a summary of held modes.

use crate::mode::ModeCounts;
use crate::queue::Queue;

pub(crate) struct Resource {
    pub(crate) name: Box<[u8]>,
    /// The value block; allocated on first write, zeros until then.
    pub(crate) lvb: Option<Box<[u8]>>,
    /// A PW/EX holder invalidated the value block or went away without writing it.
    pub(crate) lvb_invalid: bool,
    pub(crate) granted: Queue,
    pub(crate) converting: Queue,
    pub(crate) waiting: Queue,
    /// Requests on `converting` plus `waiting`, bounded by `waiters_per_resource_max`.
    pub(crate) queued: u32,
    /// The granted modes of every lock on `granted` and `converting`: a request
    /// is checked against them in constant time instead of walking the queues.
    pub(crate) held: ModeCounts,
    /// The fencing token of the latest grant on this resource.
    pub(crate) last_token: u64,
}

impl Resource {
    pub(crate) fn new(name: Box<[u8]>) -> Resource {
        Resource {
            name,
            lvb: None,
            lvb_invalid: false,
            granted: Queue::default(),
            converting: Queue::default(),
            waiting: Queue::default(),
            queued: 0,
            held: ModeCounts::default(),
            last_token: 0,
        }
    }

    pub(crate) fn is_unused(&self) -> bool {
        self.granted.is_empty() && self.converting.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With its name, index entry and one lock a resource must stay within
    /// 256 bytes (the memory benchmark checks the total).
    #[test]
    fn a_resource_stays_small() {
        assert!(std::mem::size_of::<Resource>() <= 96, "Resource is {} bytes", std::mem::size_of::<Resource>());
    }
}
