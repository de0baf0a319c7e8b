//! Blocking callbacks: telling holders that they are in a queued
//! request's way, once per blocking episode.

use crate::effect::Effect;
use crate::lock::LockState;
use crate::lockspace::Lockspace;
use crate::mode::{Mode, ModeCounts};
use crate::outbox::Outbox;

impl Lockspace {
    /// Tells every holder in the way of a queued request that it blocks
    /// someone, once per blocking episode: a holder hears again only of a
    /// stronger blocked mode, or after it is granted anew.
    pub(super) fn notify_blocking_holders(&mut self, out: &mut Outbox, r: u32) {
        let resource = &self.resources[r];
        let mut blocked = ModeCounts::default();
        for q in resource.converting.iter(&self.locks).chain(resource.waiting.iter(&self.locks)) {
            blocked.add(self.locks[q].requested);
        }
        let holders: Vec<u32> =
            resource.granted.iter(&self.locks).chain(resource.converting.iter(&self.locks)).collect();
        for h in holders {
            let lock = &self.locks[h];
            let held = lock.granted.expect("holders are granted");
            let own = (lock.state == LockState::Converting).then_some(lock.requested);
            let strongest = Mode::ALL.into_iter().rev().find(|&mode| {
                let count = blocked.get(mode) - u32::from(own == Some(mode));
                count > 0 && !held.compatible(mode)
            });
            if let Some(mode) = strongest {
                self.send_blocking(out, h, mode);
            }
        }
    }

    /// One-off blocking callbacks for a failed `NOQUEUE|NOQUEUEBAST` request.
    pub(super) fn notify_holders_of(&mut self, out: &mut Outbox, r: u32, mode: Mode, except: Option<u32>) {
        let resource = &self.resources[r];
        let holders: Vec<u32> =
            resource.granted.iter(&self.locks).chain(resource.converting.iter(&self.locks)).collect();
        for h in holders {
            if Some(h) != except && self.locks[h].granted.is_some_and(|held| !held.compatible(mode)) {
                self.send_blocking(out, h, mode);
            }
        }
    }

    pub(super) fn send_blocking(&mut self, out: &mut Outbox, h: u32, mode: Mode) {
        let lock = &mut self.locks[h];
        if lock.orphan || lock.bast_level.is_some_and(|level| level >= mode) {
            return;
        }
        lock.bast_level = Some(mode);
        out.effects.push_back(Effect::Blocking { session: lock.session, handle: lock.handle, mode });
    }
}
