//! Named bounds on everything that grows. Exceeding one is a typed error
//! ([`crate::RequestError::LimitExceeded`]), never a panic or an unbounded allocation.

use std::time::Duration;

/// Longest lockspace name, in bytes (the Linux DLM's `DLM_LOCKSPACE_LEN`).
pub const LOCKSPACE_NAME_LEN_MAX: usize = 64;
/// Longest resource name, in bytes (the Linux DLM's `DLM_RESNAME_MAXLEN`); any bytes allowed.
pub const RESOURCE_NAME_LEN_MAX: usize = 64;
/// Default value block length of a lockspace, in bytes (the Linux DLM's user LVB length).
pub const LVB_LEN_DEFAULT: usize = 32;
/// Longest value block a lockspace may be configured with, in bytes.
pub const LVB_LEN_MAX: usize = 256;
/// Value block lengths are whole 64-bit words, as the Linux DLM requires.
pub const LVB_LEN_MULTIPLE: usize = 8;

const _: () = assert!(LVB_LEN_DEFAULT.is_multiple_of(LVB_LEN_MULTIPLE) && LVB_LEN_DEFAULT <= LVB_LEN_MAX);
const _: () = assert!(LVB_LEN_MAX.is_multiple_of(LVB_LEN_MULTIPLE));

/// Which bound a request ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// [`Limits::lockspaces_max`].
    Lockspaces,
    /// [`Limits::sessions_max`].
    Sessions,
    /// [`Limits::locks_per_session_max`].
    LocksPerSession,
    /// [`Limits::locks_per_lockspace_max`].
    LocksPerLockspace,
    /// [`Limits::locks_max`].
    Locks,
    /// [`Limits::resources_per_lockspace_max`].
    ResourcesPerLockspace,
    /// [`Limits::waiters_per_resource_max`].
    WaitersPerResource,
    /// [`Limits::request_timeout_max`].
    RequestTimeout,
}

impl Limit {
    /// The bound's name as in [`Limits`], for messages and metric labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Limit::Lockspaces => "lockspaces_max",
            Limit::Sessions => "sessions_max",
            Limit::LocksPerSession => "locks_per_session_max",
            Limit::LocksPerLockspace => "locks_per_lockspace_max",
            Limit::Locks => "locks_max",
            Limit::ResourcesPerLockspace => "resources_per_lockspace_max",
            Limit::WaitersPerResource => "waiters_per_resource_max",
            Limit::RequestTimeout => "request_timeout_max",
        }
    }
}

/// The bounds of one node. Every count is of live objects; memory use is
/// proportional to them (see the `memory` benchmark for bytes per lock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Lockspaces that exist at once.
    pub lockspaces_max: u32,
    /// Client sessions open at once.
    pub sessions_max: u32,
    /// Locks (granted or pending) one session owns.
    pub locks_per_session_max: u32,
    /// Locks in one lockspace, orphans included.
    pub locks_per_lockspace_max: u32,
    /// Locks in the whole node, every lockspace and orphans included: what
    /// bounds the node's memory (the agent derives it from the memory it
    /// may use).
    pub locks_max: u64,
    /// Resources in one lockspace.
    pub resources_per_lockspace_max: u32,
    /// Requests queued on one resource (converting plus waiting). Bounds the
    /// work of one grant pass and of the wait-for graph on that resource.
    pub waiters_per_resource_max: u32,
    /// Longest per-request timeout a client may ask for.
    pub request_timeout_max: Duration,
    /// Sessions the wait-for-graph search visits from one waiter before it
    /// gives up and leaves the rest to the periodic full scan.
    pub deadlock_search_sessions_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            lockspaces_max: 1024,
            sessions_max: 65_536,
            locks_per_session_max: 1 << 20,
            locks_per_lockspace_max: 1 << 24,
            locks_max: 1 << 24,
            resources_per_lockspace_max: 1 << 24,
            waiters_per_resource_max: 4096,
            request_timeout_max: Duration::from_secs(7 * 24 * 3600),
            deadlock_search_sessions_max: 4096,
        }
    }
}

impl Limits {
    /// Checks the relations between bounds; the driver calls it on configuration.
    ///
    /// # Errors
    /// A sentence saying which bound is out of range.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("lockspaces_max", self.lockspaces_max),
            ("sessions_max", self.sessions_max),
            ("locks_per_session_max", self.locks_per_session_max),
            ("locks_per_lockspace_max", self.locks_per_lockspace_max),
            ("resources_per_lockspace_max", self.resources_per_lockspace_max),
            ("waiters_per_resource_max", self.waiters_per_resource_max),
            ("deadlock_search_sessions_max", self.deadlock_search_sessions_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.locks_max == 0 {
            return Err("locks_max must be at least 1".into());
        }
        // Zero would refuse every request that has a timeout at all.
        if self.request_timeout_max.is_zero() {
            return Err("request_timeout_max must be more than 0".into());
        }
        // Slab indices are u32 with u32::MAX reserved as "none".
        if self.locks_per_lockspace_max == u32::MAX || self.resources_per_lockspace_max == u32::MAX {
            return Err("locks_per_lockspace_max and resources_per_lockspace_max must be below 4294967295".into());
        }
        if self.resources_per_lockspace_max > self.locks_per_lockspace_max {
            return Err("resources_per_lockspace_max cannot exceed locks_per_lockspace_max (a resource exists only while it has a lock)".into());
        }
        Ok(())
    }
}
