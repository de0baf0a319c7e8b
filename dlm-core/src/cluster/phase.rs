//! The steps of recovery as members name them to each other: each ends at a
//! barrier ([`crate::cluster::PeerMessage::Barrier`]). Apart from
//! `recovery`, which runs them, so that the messages can name a step
//! without importing recovery.

/// The steps of recovery, in order; each ends at a barrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecoveryPhase {
    /// Waiting for every member to stop.
    Stop,
    /// Waiting for every member to have sent its masterships to the directory.
    Directory,
    /// Waiting for every member to have sent its locks to their masters.
    Locks,
    /// Waiting for every member to have settled its resources.
    Done,
}

impl RecoveryPhase {
    /// Every phase, in order.
    pub const ALL: [RecoveryPhase; 4] =
        [RecoveryPhase::Stop, RecoveryPhase::Directory, RecoveryPhase::Locks, RecoveryPhase::Done];

    /// Its number on the wire.
    #[must_use]
    pub const fn index(self) -> u8 {
        self as u8
    }

    /// The phase with this number.
    #[must_use]
    pub fn from_index(index: u8) -> Option<RecoveryPhase> {
        Self::ALL.get(usize::from(index)).copied()
    }

    /// Its lower-case name, for status and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            RecoveryPhase::Stop => "stop",
            RecoveryPhase::Directory => "directory",
            RecoveryPhase::Locks => "locks",
            RecoveryPhase::Done => "done",
        }
    }
}
