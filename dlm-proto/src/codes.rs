//! Typed codes: every closed set of names that reaches the wire, a metric
//! label, the configuration file or a log line. Each is an enum with `ALL`
//! (every value, in a fixed order: metrics create their series from it at
//! zero) and `as_str()` (the label, stable and lower case: dashboards,
//! alerts and clients match on these strings, so a changed label is a
//! breaking change). A leaf: it imports nothing from the crate.

use dlm_core::RequestError;

/// Defines a code enum with `ALL`, `as_str()`, `parse()` and `Display`.
macro_rules! codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &[$name] = &[$($name::$variant),+];

            /// The label: stable and lower case.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// The value whose label is `label`, if any.
            #[must_use]
            pub fn parse(label: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|code| code.as_str() == label)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

codes! {
    /// Why a request (or a session) was refused: the `code` of a
    /// `Rejected` message and the `code` label of
    /// `dlm_lock_requests_rejected_total`.
    pub enum RejectCode {
        /// The session is not open.
        UnknownSession = "unknown_session",
        /// A session with that id is already open.
        SessionExists = "session_exists",
        /// No lockspace has that name.
        UnknownLockspace = "unknown_lockspace",
        /// A lockspace with that name exists already.
        LockspaceExists = "lockspace_exists",
        /// The lockspace still has locks (release it with `force`).
        LockspaceBusy = "lockspace_busy",
        /// The lockspace name is empty or too long.
        InvalidLockspaceName = "invalid_lockspace_name",
        /// The value block length is out of range.
        InvalidLvbLen = "invalid_lvb_len",
        /// The resource name is empty or too long.
        InvalidResourceName = "invalid_resource_name",
        /// The value block is longer than the lockspace's.
        LvbTooLong = "lvb_too_long",
        /// Unknown or contradictory flags.
        InvalidFlags = "invalid_flags",
        /// `QUECVT` on a conversion that may not queue.
        QuecvtNotAllowed = "quecvt_not_allowed",
        /// The session already has a lock with that handle.
        HandleInUse = "handle_in_use",
        /// The session has no lock with that handle.
        UnknownHandle = "unknown_handle",
        /// The lock has a request pending.
        Pending = "pending",
        /// The lock has no request pending (nothing to cancel).
        NotPending = "not_pending",
        /// A configured bound would be exceeded.
        LimitExceeded = "limit_exceeded",
        /// The mode is not one of NL CR CW PR PW EX.
        InvalidMode = "invalid_mode",
        /// The message carries no request.
        EmptyMessage = "empty_message",
        /// A new lock named handle 0, which a `Rejected` uses to mean that
        /// the session itself was refused.
        InvalidHandle = "invalid_handle",
        /// A dump's `page_token` is not one the agent gave. An admin call's
        /// refusal, not a request's: never counted in
        /// `dlm_lock_requests_rejected_total`.
        InvalidPageToken = "invalid_page_token",
        /// The client has not the right it needs in that lockspace
        /// ([`Right`]; the agent's access policy).
        PermissionDenied = "permission_denied",
        /// The agent is stopping: a framed session is refused with this
        /// (gRPC says `unavailable`). Not a request, so never counted in
        /// `dlm_lock_requests_rejected_total`.
        ShuttingDown = "shutting_down",
    }
}

impl RejectCode {
    /// The code of an error of the lock engine.
    #[must_use]
    pub fn of(error: &RequestError) -> RejectCode {
        match error {
            RequestError::UnknownSession => RejectCode::UnknownSession,
            RequestError::SessionExists => RejectCode::SessionExists,
            RequestError::UnknownLockspace => RejectCode::UnknownLockspace,
            RequestError::LockspaceExists => RejectCode::LockspaceExists,
            RequestError::LockspaceBusy { .. } => RejectCode::LockspaceBusy,
            RequestError::InvalidLockspaceName { .. } => RejectCode::InvalidLockspaceName,
            RequestError::InvalidLvbLen { .. } => RejectCode::InvalidLvbLen,
            RequestError::InvalidResourceName { .. } => RejectCode::InvalidResourceName,
            RequestError::LvbTooLong { .. } => RejectCode::LvbTooLong,
            RequestError::InvalidFlags(_) => RejectCode::InvalidFlags,
            RequestError::QuecvtNotAllowed { .. } => RejectCode::QuecvtNotAllowed,
            RequestError::HandleInUse => RejectCode::HandleInUse,
            RequestError::UnknownHandle => RejectCode::UnknownHandle,
            RequestError::Pending => RejectCode::Pending,
            RequestError::NotPending => RejectCode::NotPending,
            RequestError::LimitExceeded(_) => RejectCode::LimitExceeded,
        }
    }

    /// Whether `dlm_lock_requests_rejected_total` counts this code (and so
    /// creates its series): every code a refused request can carry.
    #[must_use]
    pub const fn counted(self) -> bool {
        !matches!(self, RejectCode::ShuttingDown | RejectCode::InvalidPageToken)
    }
}

codes! {
    /// A right of the access policy: the `right` label of
    /// `dlm_access_denied_total` and the keys of `[access]`.
    pub enum Right {
        /// Lock in a lockspace.
        Lock = "lock",
        /// See every client's locks in a lockspace (`Dump`).
        Dump = "dump",
        /// Create and release lockspaces, acknowledge fences.
        Admin = "admin",
    }
}

codes! {
    /// Why a client session ended: the `reason` label of
    /// `dlm_session_ended_total`.
    pub enum SessionEnd {
        /// The client closed its stream or connection (or went away).
        Closed = "closed",
        /// The client left more than `session_queue_max` messages unread.
        SlowReader = "slow_reader",
        /// The agent stopped.
        Shutdown = "shutdown",
    }
}

codes! {
    /// Why this node reset its link to a peer: the `reason` label of
    /// `dlm_cluster_link_resets_total`.
    pub enum LinkReset {
        /// The queue to the peer's dialer was full.
        QueueFull = "queue_full",
        /// The peer left messages unacknowledged past `peer_timeout`.
        Unacknowledged = "unacknowledged",
    }
}

codes! {
    /// Why an incoming peer connection was refused or dropped: the `reason`
    /// label of `dlm_cluster_peer_rejected_total`.
    pub enum PeerReject {
        /// No valid hello in time.
        BadHello = "bad_hello",
        /// The hello names another cluster.
        WrongCluster = "wrong_cluster",
        /// The hello has another protocol version.
        WrongVersion = "wrong_version",
        /// The hello names a node that is not a member (or this node).
        UnknownNode = "unknown_node",
        /// The hello carries another membership epoch.
        WrongEpoch = "wrong_epoch",
        /// The peer came back with a new incarnation (it lost its state).
        RestartedPeer = "restarted_peer",
        /// A frame that does not decode, or is too long.
        BadFrame = "bad_frame",
        /// An envelope the lock engine refused.
        Protocol = "protocol",
        /// The TLS handshake failed (no certificate, or one the cluster's
        /// CA did not sign, or not TLS at all).
        Tls = "tls",
        /// The certificate is valid but does not name the member the hello
        /// claims to be.
        WrongCertificate = "wrong_certificate",
        /// A newer connection from the same member (proven by its
        /// certificate) replaced this one: one live connection per member
        /// and direction.
        Replaced = "replaced",
    }
}

codes! {
    /// A phase of a lock whose kernel time is attributed: the `phase` label
    /// of `dlm_lock_kernel_attributed_seconds_total`.
    pub enum LockPhase {
        /// From a request that queued to its grant.
        Wait = "wait",
        /// From the first grant to the unlock.
        Hold = "hold",
    }
}

codes! {
    /// A group of eBPF programs attached together: a name in `[ebpf]
    /// families`, in `trace` commands' messages and in logs.
    pub enum Family {
        /// Kernel lock contention (`lock:contention_begin/end`).
        Locks = "locks",
        /// Futex waits (`syscalls:sys_enter/exit_futex`, `futex_waitv`).
        Futex = "futex",
        /// Off-CPU time and run-queue delay of every task on the node
        /// (`sched:sched_switch`): what `trace offcpu` shows. It does a little
        /// work on every context switch of the node, so the agent leaves it out
        /// unless configured.
        Sched = "sched",
        /// Where the time of DLM lock holders and waiters goes (on CPU, run
        /// queue, blocked), and the processes they fork: `sched_switch` and
        /// `sched_process_fork/exit`, doing nothing for other tasks.
        Holders = "holders",
        /// Reclaim, compaction, kswapd and OOM (`vmscan`, `compaction`, `oom`).
        Memory = "memory",
    }
}

impl Family {
    /// What the agent attaches unless configured otherwise: the families
    /// whose cost on a busy node is small. `futex` (its syscall tracepoints
    /// slow every system call of the node) and `sched` (work on every
    /// context switch) are for `trace` or an explicit `[ebpf] families`.
    pub const AGENT_DEFAULT: [Family; 3] = [Family::Locks, Family::Holders, Family::Memory];
}

impl From<dlm_core::cluster::HelloRefusal> for PeerReject {
    fn from(refusal: dlm_core::cluster::HelloRefusal) -> PeerReject {
        use dlm_core::cluster::HelloRefusal;
        match refusal {
            HelloRefusal::WrongVersion => PeerReject::WrongVersion,
            HelloRefusal::WrongCluster => PeerReject::WrongCluster,
            HelloRefusal::UnknownNode => PeerReject::UnknownNode,
            HelloRefusal::WrongEpoch => PeerReject::WrongEpoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every label of a code, in `ALL`'s order.
    fn labels<T: Copy>(all: &[T], as_str: fn(T) -> &'static str) -> Vec<&'static str> {
        all.iter().map(|code| as_str(*code)).collect()
    }

    /// The labels as dashboards, alerts and clients know them: a change
    /// here is a breaking change, not a refactoring.
    #[test]
    fn labels_are_the_published_ones() {
        assert_eq!(
            labels(RejectCode::ALL, RejectCode::as_str),
            [
                "unknown_session",
                "session_exists",
                "unknown_lockspace",
                "lockspace_exists",
                "lockspace_busy",
                "invalid_lockspace_name",
                "invalid_lvb_len",
                "invalid_resource_name",
                "lvb_too_long",
                "invalid_flags",
                "quecvt_not_allowed",
                "handle_in_use",
                "unknown_handle",
                "pending",
                "not_pending",
                "limit_exceeded",
                "invalid_mode",
                "empty_message",
                "invalid_handle",
                "invalid_page_token",
                "permission_denied",
                "shutting_down",
            ]
        );
        assert_eq!(labels(Right::ALL, Right::as_str), ["lock", "dump", "admin"]);
        assert_eq!(labels(SessionEnd::ALL, SessionEnd::as_str), ["closed", "slow_reader", "shutdown"]);
        assert_eq!(labels(LinkReset::ALL, LinkReset::as_str), ["queue_full", "unacknowledged"]);
        assert_eq!(
            labels(PeerReject::ALL, PeerReject::as_str),
            [
                "bad_hello",
                "wrong_cluster",
                "wrong_version",
                "unknown_node",
                "wrong_epoch",
                "restarted_peer",
                "bad_frame",
                "protocol",
                "tls",
                "wrong_certificate",
                "replaced",
            ]
        );
        assert_eq!(labels(LockPhase::ALL, LockPhase::as_str), ["wait", "hold"]);
        assert_eq!(labels(Family::ALL, Family::as_str), ["locks", "futex", "sched", "holders", "memory"]);
    }

    #[test]
    fn labels_parse_back() {
        for code in RejectCode::ALL {
            assert_eq!(RejectCode::parse(code.as_str()), Some(*code));
        }
        for family in Family::ALL {
            assert_eq!(Family::parse(family.as_str()), Some(*family));
        }
        assert_eq!(RejectCode::parse("no_such_code"), None);
        assert_eq!(RejectCode::ShuttingDown.to_string(), "shutting_down");
    }
}
