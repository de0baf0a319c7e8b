//! A vector of slots addressed by `u32` indices, with a free list, so that
//! locks and resources can point at each other with four-byte links instead
//! of pointers or hash lookups.

/// The index that means "no slot" in links.
pub(crate) const NIL: u32 = u32::MAX;

enum Slot<T> {
    Occupied(T),
    Vacant { next_free: u32 },
}

pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free_head: u32,
    len: u32,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Self {
        Slab { slots: Vec::new(), free_head: NIL, len: 0 }
    }

    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    /// Stores `value` and returns its index. The caller bounds the count
    /// (every slab's limit is below `NIL`), so the index always fits.
    pub(crate) fn insert(&mut self, value: T) -> u32 {
        self.len += 1;
        if self.free_head != NIL {
            let index = self.free_head;
            let slot = &mut self.slots[index as usize];
            let Slot::Vacant { next_free } = *slot else { unreachable!("free list points at an occupied slot") };
            self.free_head = next_free;
            *slot = Slot::Occupied(value);
            index
        } else {
            let index = u32::try_from(self.slots.len()).expect("slab limits keep indices below u32::MAX");
            assert!(index != NIL, "slab index space exhausted");
            self.slots.push(Slot::Occupied(value));
            index
        }
    }

    pub(crate) fn remove(&mut self, index: u32) -> T {
        let slot = std::mem::replace(&mut self.slots[index as usize], Slot::Vacant { next_free: self.free_head });
        let Slot::Occupied(value) = slot else { panic!("slab: removing vacant slot {index}") };
        self.free_head = index;
        self.len -= 1;
        value
    }

    pub(crate) fn get(&self, index: u32) -> Option<&T> {
        match self.slots.get(index as usize) {
            Some(Slot::Occupied(value)) => Some(value),
            _ => None,
        }
    }

    /// One past the highest index ever used: every occupied index is below it.
    pub(crate) fn capacity_used(&self) -> u32 {
        u32::try_from(self.slots.len()).expect("slab indices fit in u32")
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(index, slot)| match slot {
            Slot::Occupied(value) => Some((index as u32, value)),
            Slot::Vacant { .. } => None,
        })
    }
}

impl<T> std::ops::Index<u32> for Slab<T> {
    type Output = T;
    fn index(&self, index: u32) -> &T {
        match &self.slots[index as usize] {
            Slot::Occupied(value) => value,
            Slot::Vacant { .. } => panic!("slab: vacant slot {index}"),
        }
    }
}

impl<T> std::ops::IndexMut<u32> for Slab<T> {
    fn index_mut(&mut self, index: u32) -> &mut T {
        match &mut self.slots[index as usize] {
            Slot::Occupied(value) => value,
            Slot::Vacant { .. } => panic!("slab: vacant slot {index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_freed_slots() {
        let mut slab = Slab::new();
        let a = slab.insert("a");
        let b = slab.insert("b");
        assert_eq!(slab.remove(a), "a");
        let c = slab.insert("c");
        assert_eq!(c, a);
        assert_eq!(slab[b], "b");
        assert_eq!(slab.len(), 2);
        assert!(slab.get(7).is_none());
    }
}
