//! What a run reports: its counts, the membership faults it made, and a
//! digest of everything the nodes produced.

use std::time::Duration;

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Requests made.
    pub requests: u32,
    /// Grants seen by clients.
    pub grants: u32,
    /// Requests that ended as deadlock victims.
    pub deadlocks: u32,
    /// Requests that ended as unavailable (a node they needed was cut off).
    pub unavailable: u32,
    /// Messages lost to cut links.
    pub lost: u64,
    /// Membership faults and views (see [`Faults`]).
    pub faults: Faults,
    /// Messages delivered (duplicates included).
    pub messages: u64,
    /// Simulated time at the end.
    pub elapsed: Duration,
    /// A digest of everything the nodes produced, in order: every effect
    /// for a client and every envelope for the network. Two runs of one
    /// seed with the same digest behaved the same, step for step.
    pub trace: u64,
    /// Which ways recovery took (not part of the recorded line: how often
    /// each path ran, so that a reader can see the simulator reached them).
    pub paths: RecoveryPaths,
}

/// How often recovery took each of its ways, over every node of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryPaths {
    /// Locks sent to a master (or told to drop there).
    pub sent: u64,
    /// Locks kept at a master that stayed, its node's digest matching.
    pub kept: u64,
    /// Digests that did not match (the node's locks went, and came back).
    pub mismatches: u64,
    /// Copies sent straight to an old master that no longer masters them.
    pub refused: u64,
}

impl RecoveryPaths {
    /// Adds a node's counts.
    pub fn add(&mut self, stats: &crate::cluster::ClusterStats) {
        self.sent += stats.recovery_locks_sent;
        self.kept += stats.recovery_locks_kept;
        self.mismatches += stats.recovery_digest_mismatches;
        self.refused += stats.recovery_refused;
    }
}

impl std::ops::AddAssign for RecoveryPaths {
    fn add_assign(&mut self, other: RecoveryPaths) {
        self.sent += other.sent;
        self.kept += other.kept;
        self.mismatches += other.mismatches;
        self.refused += other.refused;
    }
}

impl std::fmt::Display for RecoveryPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let RecoveryPaths { sent, kept, mismatches, refused } = self;
        write!(f, "locks sent {sent}, kept by a digest {kept}, digests not matching {mismatches}, refused {refused}")
    }
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SimReport { requests, grants, deadlocks, unavailable, lost, faults, messages, elapsed, trace, paths: _ } =
            self;
        write!(
            f,
            "requests {requests} grants {grants} deadlocks {deadlocks} unavailable {unavailable} lost {lost} \
             {faults}messages {messages} elapsed_ns {} trace {trace:016x}",
            elapsed.as_nanos()
        )
    }
}

/// What the simulated membership layer did in a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Views handed to nodes (one per node per view).
    pub views: u32,
    /// Nodes that crashed (lost all state; their clients died with them).
    pub crashes: u32,
    /// Nodes that joined: restarts with a new incarnation, and first starts.
    pub joins: u32,
    /// Nodes cut off from all others (the minority fences itself, the
    /// majority recovers without it, it rejoins when the cut heals).
    pub partitions: u32,
    /// Nodes paused for a while (with the CPG model, agent and corosync
    /// together, shorter than the lease's bound or past detection).
    pub pauses: u32,
    /// Corosyncs frozen under their running agents (CPG model).
    pub freezes: u32,
    /// Client processes paused while their node runs (see `clients`).
    pub client_pauses: u32,
    /// Failures (crashes and partitions) while some node was recovering.
    pub during_recovery: u32,
    /// Nodes that fenced themselves (a view without quorum or without them).
    pub fenced: u32,
    /// Recoveries completed (per node).
    pub recoveries: u32,
}

impl std::ops::AddAssign for Faults {
    /// Totals over runs (saturating: a count is a count, not a wrap).
    fn add_assign(&mut self, other: Faults) {
        let Faults {
            views,
            crashes,
            joins,
            partitions,
            pauses,
            freezes,
            client_pauses,
            during_recovery,
            fenced,
            recoveries,
        } = other;
        self.client_pauses = self.client_pauses.saturating_add(client_pauses);
        self.views = self.views.saturating_add(views);
        self.crashes = self.crashes.saturating_add(crashes);
        self.joins = self.joins.saturating_add(joins);
        self.partitions = self.partitions.saturating_add(partitions);
        self.pauses = self.pauses.saturating_add(pauses);
        self.freezes = self.freezes.saturating_add(freezes);
        self.during_recovery = self.during_recovery.saturating_add(during_recovery);
        self.fenced = self.fenced.saturating_add(fenced);
        self.recoveries = self.recoveries.saturating_add(recoveries);
    }
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Faults::default() {
            return Ok(());
        }
        let Faults {
            views,
            crashes,
            joins,
            partitions,
            pauses,
            freezes,
            client_pauses,
            during_recovery,
            fenced,
            recoveries,
        } = self;
        write!(f, "views {views} crashes {crashes} joins {joins} partitions {partitions} pauses {pauses} ")?;
        // Only the CPG model freezes corosync: the scripted layer's reports read as before.
        if *freezes > 0 {
            write!(f, "freezes {freezes} ")?;
        }
        write!(f, "client_pauses {client_pauses} ")?;
        write!(f, "during_recovery {during_recovery} fenced {fenced} recoveries {recoveries} ")
    }
}

/// FNV-1a over text: a digest that depends on nothing but the bytes fed to
/// it (not on a process's random hasher keys, nor on the Rust release).
pub(super) struct Digest(pub(super) u64);

impl Digest {
    pub(super) fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl std::fmt::Write for Digest {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        for byte in text.bytes() {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(())
    }
}
