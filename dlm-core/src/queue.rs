//! A resource's granted, converting and waiting queues as intrusive doubly
//! linked lists threaded through the locks' `prev`/`next` links: O(1)
//! insertion at either end and removal from the middle, eight bytes per queue.

use crate::lock::Lock;
use crate::slab::{NIL, Slab};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Queue {
    pub(crate) head: u32,
    pub(crate) tail: u32,
}

impl Default for Queue {
    fn default() -> Self {
        Queue { head: NIL, tail: NIL }
    }
}

impl Queue {
    pub(crate) fn is_empty(&self) -> bool {
        self.head == NIL
    }

    pub(crate) fn push_back(&mut self, locks: &mut Slab<Lock>, index: u32) {
        locks[index].prev = self.tail;
        locks[index].next = NIL;
        if self.tail == NIL {
            self.head = index;
        } else {
            locks[self.tail].next = index;
        }
        self.tail = index;
    }

    pub(crate) fn push_front(&mut self, locks: &mut Slab<Lock>, index: u32) {
        locks[index].prev = NIL;
        locks[index].next = self.head;
        if self.head == NIL {
            self.tail = index;
        } else {
            locks[self.head].prev = index;
        }
        self.head = index;
    }

    /// Unlinks `index`, which must be on this queue.
    pub(crate) fn remove(&mut self, locks: &mut Slab<Lock>, index: u32) {
        let (prev, next) = (locks[index].prev, locks[index].next);
        if prev == NIL {
            self.head = next;
        } else {
            locks[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            locks[next].prev = prev;
        }
        locks[index].prev = NIL;
        locks[index].next = NIL;
    }

    /// The queue's lock indices, head first. Collected so the caller may
    /// change the queue while it walks the snapshot.
    pub(crate) fn snapshot(&self, locks: &Slab<Lock>) -> Vec<u32> {
        self.iter(locks).collect()
    }

    pub(crate) fn iter<'a>(&self, locks: &'a Slab<Lock>) -> QueueIter<'a> {
        QueueIter { locks, at: self.head }
    }
}

pub(crate) struct QueueIter<'a> {
    locks: &'a Slab<Lock>,
    at: u32,
}

impl Iterator for QueueIter<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.at == NIL {
            return None;
        }
        let index = self.at;
        self.at = self.locks[index].next;
        Some(index)
    }
}
