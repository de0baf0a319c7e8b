//! DLM attribution from the agent's side: which processes to account
//! (`DLM_PIDS`) and what was accounted for them (`DLM_ATTR`).
//!
//! The driver tells which client processes hold or wait for a lock; the
//! programs then add, for those processes only, the time spent on CPU,
//! runnable, blocked, in reclaim, and waiting for kernel locks and futexes.
//! The driver snapshots a process's counters when a request starts and when
//! it is granted, and the difference at the grant (wait) and release (hold)
//! is that lock's kernel evidence. Counters are per process: a process
//! holding two locks at once sees the same time on both.

use std::collections::HashMap as StdHashMap;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, PerCpuHashMap},
};
pub use dlm_ebpf_common::Attribution;
use dlm_ebpf_common::tracked_slots;

/// The two maps, taken out of the loaded object so the driver owns them.
pub struct AttributionMaps {
    pids: HashMap<aya::maps::MapData, u32, u32>,
    attribution: PerCpuHashMap<aya::maps::MapData, u32, Attribution>,
    /// How many processes are tracked: zero lets the programs skip lookups.
    tracked: Array<aya::maps::MapData, u32>,
    /// The filter in front of `pids` ([`tracked_slots`]).
    slots: Array<aya::maps::MapData, u32>,
    /// Locks held or waited for, by process; a process is in `DLM_PIDS`
    /// while this is non-zero.
    references: StdHashMap<u32, u32>,
}

impl AttributionMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Option<AttributionMaps> {
        let pids: Map = ebpf.take_map("DLM_PIDS")?;
        let attribution: Map = ebpf.take_map("DLM_ATTR")?;
        let tracked: Map = ebpf.take_map("DLM_TRACKED")?;
        let slots: Map = ebpf.take_map("TRACKED_SLOTS")?;
        Some(AttributionMaps {
            pids: HashMap::try_from(pids).ok()?,
            attribution: PerCpuHashMap::try_from(attribution).ok()?,
            tracked: Array::try_from(tracked).ok()?,
            slots: Array::try_from(slots).ok()?,
            references: StdHashMap::new(),
        })
    }

    /// Starts (or keeps) accounting `tgid`: one more lock held or waited for.
    pub fn track(&mut self, tgid: u32) {
        if tgid == 0 {
            return;
        }
        let count = self.references.entry(tgid).or_insert(0);
        *count += 1;
        if *count == 1 {
            // A full map only means this process goes unaccounted.
            // Mapped to itself: children the programs see it fork are mapped
            // to it too, and accounted under it.
            let _ = self.pids.insert(tgid, tgid, 0);
            self.update_slot(tgid, tracked_slots::claimed);
            self.publish_count();
        }
    }

    /// One lock fewer for `tgid`; at zero its accounting stops and its
    /// counters are dropped.
    pub fn untrack(&mut self, tgid: u32) {
        let Some(count) = self.references.get_mut(&tgid) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.references.remove(&tgid);
            let _ = self.pids.remove(&tgid);
            let _ = self.attribution.remove(&tgid);
            self.update_slot(tgid, tracked_slots::released);
            self.publish_count();
        }
    }

    /// Adds `tgid` to or removes it from the programs' filter. A program
    /// adding a child to the same slot at the same moment may lose its
    /// update: that child then goes unaccounted, nothing worse.
    fn update_slot(&mut self, tgid: u32, update: fn(u32, u32) -> u32) {
        let slot = tracked_slots::slot(tgid);
        if let Ok(current) = self.slots.get(&slot, 0) {
            let _ = self.slots.set(slot, update(current, tgid), 0);
        }
    }

    fn publish_count(&mut self) {
        let count = u32::try_from(self.references.len()).unwrap_or(u32::MAX);
        let _ = self.tracked.set(0, count, 0);
    }

    /// Processes accounted now.
    pub fn tracked(&self) -> usize {
        self.references.len()
    }

    /// The counters of `tgid` so far (zero when nothing was accounted yet).
    pub fn read(&self, tgid: u32) -> Attribution {
        self.attribution.get(&tgid, 0).map_or(Attribution::ZERO, |copies| {
            copies.iter().fold(Attribution::ZERO, |mut total, copy| {
                total.merge(copy);
                total
            })
        })
    }
}
