//! The membership lease: this node grants only while its corosync answers.
//!
//! Why: corosync's callbacks are the agent's only news of the cluster. A
//! corosync that stops (SIGSTOP, a daemon stuck in reclaim: corosync
//! #520, #692) sends none, so an agent that waits for callbacks goes on
//! granting in its old epoch while the other nodes declare the node lost,
//! fence it by the grace and grant its locks again. A whole node paused (a
//! VM) wakes with the same stale state. So the agent asks its corosync on a
//! thread of its own (`dlm-lease`, in `membership::ask`), every [`Timing::ask_every`], whether it is
//! quorate, and counts any answer as a **confirmation** as of the moment the
//! question was asked. When the youngest confirmation is older than the
//! lease's bound, the lease has **lapsed**: the node fences itself exactly
//! as on quorum loss (every lock revoked, requests failing, a new
//! incarnation), and comes back only through a new round of the agreement.
//!
//! A lapse is noticed by every reader, whichever runs first after a pause:
//! the lease is stale (`now` past the bound), or the asker saw a gap
//! larger than the bound between two confirmations (counted in
//! [`Lease::lapses`], so a lapse healed before anyone looked is not lost).
//!
//! **Timing.** corosync removes a silent node after its token timeout plus
//! consensus (`removal`); the lease's bound is half that, and the asker
//! runs four times per bound, so a node whose corosync froze stops granting
//! within 0.625 × `removal` of its last confirmation, before the others can
//! even remove it. The survivors' grace (`self_fence_grace`) must cover
//! `removal` plus that detection (see [`Timing::grace_floor`]). As every
//! lease, this assumes the nodes' clocks run at about the same rate (they
//! measure intervals on CLOCK_MONOTONIC; the rates of real clocks differ by
//! parts per million).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// corosync's timeouts as it runs them, and what the agent derives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// `runtime.config.totem.token`: a silent node is suspected after it.
    pub token: Duration,
    /// `runtime.config.totem.consensus`: the new membership is agreed after it.
    pub consensus: Duration,
}

impl Timing {
    /// How long corosync takes to remove a node that fell silent.
    #[must_use]
    pub fn removal(self) -> Duration {
        self.token + self.consensus
    }

    /// The lease's bound: a node grants nothing on a confirmation older
    /// than this.
    #[must_use]
    pub fn bound(self) -> Duration {
        self.removal() / 2
    }

    /// How often corosync is asked.
    #[must_use]
    pub fn ask_every(self) -> Duration {
        ask_every_for(self.bound())
    }

    /// The longest a node whose corosync stopped answering may go on
    /// granting: the bound, plus the asking interval in which the lapse is
    /// noticed.
    #[must_use]
    pub fn detection(self) -> Duration {
        self.bound() + self.ask_every()
    }

    /// The shortest self-fencing grace that is safe: survivors recover a
    /// lost node's locks only after corosync removed it and the node has
    /// stopped granting, however it was lost.
    #[must_use]
    pub fn grace_floor(self) -> Duration {
        self.removal() + self.detection()
    }
}

/// How often corosync is asked for a lease of `bound`: four times per
/// bound, so one slow answer does not lapse it.
fn ask_every_for(bound: Duration) -> Duration {
    bound / 4
}

/// The lease, shared by its asker, the membership task and the driver.
#[derive(Debug)]
pub struct Lease {
    /// When the lease started counting; times below are milliseconds since.
    start: Instant,
    /// The bound in milliseconds; 0 until corosync's timing is known (a
    /// lease without a bound never lapses: nothing is granted before the
    /// first quorate view anyway).
    bound_ms: AtomicU64,
    /// The youngest confirmation: when its question was asked.
    confirmed_ms: AtomicU64,
    /// Gaps larger than the bound the asker saw between confirmations.
    lapses: AtomicU64,
}

impl Lease {
    #[must_use]
    pub fn new() -> Arc<Lease> {
        Arc::new(Lease {
            start: Instant::now(),
            bound_ms: AtomicU64::new(0),
            confirmed_ms: AtomicU64::new(0),
            lapses: AtomicU64::new(0),
        })
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    /// Starts the lease at `bound`, as confirmed now.
    pub fn arm(&self, bound: Duration, now: Instant) {
        self.confirmed_ms.store(self.millis(now), Ordering::Release);
        self.bound_ms.store(u64::try_from(bound.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Release);
    }

    /// Takes a new bound (corosync's timeouts changed while it ran).
    pub fn set_bound(&self, bound: Duration) {
        self.bound_ms.store(u64::try_from(bound.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Release);
    }

    /// How often its asker asks corosync now (the bound may change while
    /// the agent runs; before it is armed, every 100 ms).
    #[must_use]
    pub fn ask_every(&self) -> Duration {
        match self.bound_ms.load(Ordering::Acquire) {
            0 => Duration::from_millis(100),
            ms => ask_every_for(Duration::from_millis(ms)),
        }
    }

    /// corosync answered a question asked at `asked`.
    pub fn confirm(&self, asked: Instant) {
        let bound = self.bound_ms.load(Ordering::Acquire);
        let asked = self.millis(asked);
        // The gap is counted before the lease is fresh again, so that a
        // reader never sees it fresh without the count (one asker writes).
        let previous = self.confirmed_ms.load(Ordering::Acquire);
        if bound > 0 && asked.saturating_sub(previous) > bound {
            self.lapses.fetch_add(1, Ordering::AcqRel);
        }
        self.confirmed_ms.fetch_max(asked, Ordering::AcqRel);
    }

    /// The gaps counted so far, for readers to tell a new one.
    #[must_use]
    pub fn lapses(&self) -> u64 {
        self.lapses.load(Ordering::Acquire)
    }

    /// Whether the youngest confirmation is older than the bound at `now`.
    #[must_use]
    pub fn is_stale(&self, now: Instant) -> bool {
        let bound = self.bound_ms.load(Ordering::Acquire);
        bound > 0 && self.millis(now).saturating_sub(self.confirmed_ms.load(Ordering::Acquire)) > bound
    }

    /// The age of the youngest confirmation at `now`.
    #[must_use]
    pub fn age(&self, now: Instant) -> Duration {
        Duration::from_millis(self.millis(now).saturating_sub(self.confirmed_ms.load(Ordering::Acquire)))
    }
}

/// One reader's view of the lease: it acts once per lapse.
#[derive(Debug, Default)]
pub struct LapseWatch {
    seen: u64,
    stale: bool,
}

impl LapseWatch {
    /// Whether a lapse this reader has not acted on happened by `now`: the
    /// lease is stale now (reported once until it is fresh again), or the
    /// asker counted a gap since the last look.
    pub fn lapsed(&mut self, lease: &Lease, now: Instant) -> bool {
        let lapses = lease.lapses();
        let stale = lease.is_stale(now);
        let new_gap = lapses > self.seen;
        let newly_stale = stale && !self.stale;
        self.seen = lapses;
        self.stale = stale;
        new_gap || newly_stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(token: u64, consensus: u64) -> Timing {
        Timing { token: Duration::from_millis(token), consensus: Duration::from_millis(consensus) }
    }

    #[test]
    fn the_lease_lapses_before_corosync_can_remove_the_node() {
        // corosync's defaults (3 nodes): token 3000, consensus 3600.
        let t = timing(3000, 3600);
        assert_eq!(t.removal(), Duration::from_millis(6600));
        assert_eq!(t.bound(), Duration::from_millis(3300));
        assert_eq!(t.ask_every(), Duration::from_millis(825));
        assert!(t.detection() < t.removal());
        assert_eq!(t.grace_floor(), Duration::from_millis(6600 + 4125));
    }

    #[test]
    fn a_lease_without_a_bound_never_lapses() {
        let lease = Lease::new();
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(!lease.is_stale(later));
        lease.confirm(later);
        assert_eq!(lease.lapses(), 0);
    }

    #[test]
    fn a_stale_lease_is_reported_once_and_again_after_it_was_fresh() {
        let lease = Lease::new();
        let t0 = lease.start;
        lease.arm(Duration::from_millis(100), t0);
        let mut watch = LapseWatch::default();
        assert!(!watch.lapsed(&lease, t0 + Duration::from_millis(50)));
        assert!(watch.lapsed(&lease, t0 + Duration::from_millis(150)), "stale past the bound");
        assert!(!watch.lapsed(&lease, t0 + Duration::from_millis(160)), "the same lapse once");
        // The asker's next answer is a gap larger than the bound: counted,
        // but this reader acted on this lapse already while it was stale.
        lease.confirm(t0 + Duration::from_millis(170));
        assert_eq!(lease.lapses(), 1);
        assert!(watch.lapsed(&lease, t0 + Duration::from_millis(180)), "the gap is news to a count-based look");
        assert!(!watch.lapsed(&lease, t0 + Duration::from_millis(190)));
    }

    #[test]
    fn a_lapse_healed_before_anyone_looked_is_still_seen() {
        // A whole node paused: its asker may run first after the wake and
        // confirm again before the driver or the membership look.
        let lease = Lease::new();
        let t0 = lease.start;
        lease.arm(Duration::from_millis(100), t0);
        let mut watch = LapseWatch::default();
        assert!(!watch.lapsed(&lease, t0 + Duration::from_millis(10)));
        lease.confirm(t0 + Duration::from_millis(5000));
        assert!(!lease.is_stale(t0 + Duration::from_millis(5001)));
        assert!(watch.lapsed(&lease, t0 + Duration::from_millis(5001)));
    }

    #[test]
    fn an_answer_to_an_old_question_does_not_move_the_lease_back() {
        let lease = Lease::new();
        let t0 = lease.start;
        lease.arm(Duration::from_millis(100), t0 + Duration::from_millis(50));
        lease.confirm(t0 + Duration::from_millis(10));
        assert_eq!(lease.age(t0 + Duration::from_millis(60)), Duration::from_millis(10));
        assert_eq!(lease.lapses(), 0);
    }
}
