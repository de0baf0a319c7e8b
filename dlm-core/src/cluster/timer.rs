//! The cluster node's timers: a closed set, and a fixed table of their
//! deadlines (in the manner of quinn-proto's connection timers).
//!
//! The table is not stored: [`crate::cluster::ClusterNode`] derives it from
//! its state whenever it is asked (each deadline is the earliest of what that
//! timer watches), so no deadline can be left behind when the state changes.
//! [`crate::cluster::ClusterNode::poll_timeout`] is the table's minimum, and
//! `handle_timeout` runs the timers that are due in [`Timer::ALL`]'s order.

use crate::time::Instant;

/// What a cluster node waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// The engine's own: request timeouts and a due deadlock scan.
    Engine,
    /// A mastership idle for the release delay is released.
    IdleRelease,
    /// A link that received something owes a bare acknowledgement.
    Ack,
    /// A link whose peer has left a message unacknowledged for the
    /// acknowledgement timeout goes down.
    Silence,
    /// A link with nothing sent for the heartbeat interval carries a heartbeat.
    Heartbeat,
    /// This node's wait-for edges are due at the deadlock coordinator.
    DeadlockReport,
}

impl Timer {
    /// Every timer, in the order `handle_timeout` runs them.
    pub const ALL: [Timer; 6] =
        [Timer::Engine, Timer::IdleRelease, Timer::Ack, Timer::Silence, Timer::Heartbeat, Timer::DeadlockReport];

    fn index(self) -> usize {
        self as usize
    }
}

/// A deadline for each timer (`None`: not armed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arms (or disarms, with `None`) a timer.
    pub fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.deadlines[timer.index()] = at;
    }

    /// A timer's deadline.
    #[must_use]
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer.index()]
    }

    /// The earliest deadline.
    #[must_use]
    pub fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Whether a timer is due at `now`.
    #[must_use]
    pub fn is_due(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timer_has_its_own_slot_in_the_order_of_all() {
        for (i, timer) in Timer::ALL.into_iter().enumerate() {
            assert_eq!(timer.index(), i);
        }
    }

    #[test]
    fn the_next_deadline_is_the_earliest_armed_one() {
        let mut table = TimerTable::default();
        assert_eq!(table.next(), None);
        table.set(Timer::Heartbeat, Some(Instant::from_nanos(30)));
        table.set(Timer::Ack, Some(Instant::from_nanos(20)));
        table.set(Timer::Engine, Some(Instant::from_nanos(40)));
        assert_eq!(table.next(), Some(Instant::from_nanos(20)));
        assert!(table.is_due(Timer::Ack, Instant::from_nanos(20)));
        assert!(!table.is_due(Timer::Heartbeat, Instant::from_nanos(20)));
        assert!(!table.is_due(Timer::Silence, Instant::from_nanos(1_000)));
        table.set(Timer::Ack, None);
        assert_eq!(table.next(), Some(Instant::from_nanos(30)));
    }
}
