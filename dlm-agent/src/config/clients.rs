//! The agent's own bounds on clients (the lock engine's are
//! [`dlm_core::Limits`]): connections open in all and per client, sessions
//! per user, and how long a new connection may take to say what it speaks.
//! Together they keep one local user (or one remote address) from taking
//! every slot the others need.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, parse_duration};

/// Bounds on client connections and sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Client connections open at once, every listener and protocol
    /// together. By default the process's descriptor limit less 256
    /// (`DESCRIPTORS_KEPT`, so that `/healthz`, peers and files always have
    /// descriptors left) and less the two eventfds of each ring session
    /// `ring_sessions_max` allows.
    pub connections_max: usize,
    /// Framed sessions through shared-memory rings at once
    /// (`dlm_proto::framing`'s rings): each holds two eventfds besides its
    /// socket and 32 KiB of shared memory, so there are as many as the
    /// descriptors left beside `connections_max` allow, and at most
    /// `RING_SESSIONS_CAP` (1,024); past it a session is served on its socket.
    pub ring_sessions_max: usize,
    /// Connections one client may hold open: one uid on the Unix socket,
    /// one address on TCP. By default a quarter of `connections_max`.
    pub connections_per_client_max: usize,
    /// Sessions one uid may hold open (TCP clients, which have no uid,
    /// count only against `limits.sessions_max`). By default a quarter of
    /// `limits.sessions_max`.
    pub sessions_per_uid_max: u32,
    /// How long a new connection may take to send its first bytes (an
    /// HTTP/2 preface and SETTINGS frame, or a framed session's preface).
    pub handshake_timeout: Duration,
}

/// Descriptors the agent keeps for itself out of its limit: the listeners,
/// peer links, `/metrics` scrapes, eBPF maps and files.
pub const DESCRIPTORS_KEPT: usize = 256;

/// Descriptors a framed session through rings holds: its socket and two
/// eventfds.
const RING_SESSION_DESCRIPTORS: usize = 3;

/// The most framed sessions through rings: their shared memory (32 KiB
/// each, `dlm_proto::framing::ring::SESSION_SHARED_LEN`) stays under 33 MiB.
pub const RING_SESSIONS_CAP: usize = 1024;

/// The least `connections_max` may be.
const CONNECTIONS_MIN: usize = 16;

/// The handshake timeout's bounds: a client sends its preface at once, and
/// a long timeout is what lets silent connections pile up.
const HANDSHAKE_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);

/// The keys of [`ClientLimits`] in the file's `[limits]` section (all
/// optional) and its top-level `handshake_timeout`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileClients {
    pub connections_max: Option<usize>,
    pub connections_per_client_max: Option<usize>,
    pub sessions_per_uid_max: Option<u32>,
    pub handshake_timeout: Option<String>,
}

impl ClientLimits {
    /// The bounds from what the file says, the rest derived from the
    /// descriptor limit (`descriptors`) and `sessions_max`.
    ///
    /// # Errors
    /// A value out of range, or more connections than descriptors.
    pub(super) fn resolve(
        file: &FileClients,
        descriptors: Option<usize>,
        sessions_max: u32,
    ) -> Result<ClientLimits, ConfigError> {
        let available = descriptors.map(|d| d.saturating_sub(DESCRIPTORS_KEPT));
        let connections_max = match (file.connections_max, available) {
            (Some(n), Some(available)) if n > available => {
                return Err(invalid(
                    "limits.connections_max",
                    format!(
                        "{n} is more than the descriptor limit less {DESCRIPTORS_KEPT} kept for the agent \
                         ({available}); raise LimitNOFILE or lower it"
                    ),
                ));
            }
            (Some(n), _) => n,
            // What rings would take is kept aside: a third of the
            // descriptors at most, for at most `RING_SESSIONS_CAP` of them.
            (None, Some(available)) => {
                let rings = (available / RING_SESSION_DESCRIPTORS).min(RING_SESSIONS_CAP);
                (available - rings * (RING_SESSION_DESCRIPTORS - 1)).min(1 << 20)
            }
            (None, None) => 1024,
        };
        if connections_max < CONNECTIONS_MIN {
            return Err(invalid(
                "limits.connections_max",
                format!("{connections_max} is less than {CONNECTIONS_MIN} (is the descriptor limit that low?)"),
            ));
        }
        let connections_per_client_max = file.connections_per_client_max.unwrap_or((connections_max / 4).max(1));
        if connections_per_client_max == 0 || connections_per_client_max > connections_max {
            return Err(invalid("limits.connections_per_client_max", "must be from 1 to limits.connections_max"));
        }
        let sessions_per_uid_max = file.sessions_per_uid_max.unwrap_or((sessions_max / 4).max(1));
        if sessions_per_uid_max == 0 || sessions_per_uid_max > sessions_max {
            return Err(invalid("limits.sessions_per_uid_max", "must be from 1 to limits.sessions_max"));
        }
        let handshake_timeout = match &file.handshake_timeout {
            Some(text) => parse_duration(text).map_err(|m| invalid("handshake_timeout", m))?,
            None => Duration::from_secs(2),
        };
        if !HANDSHAKE_TIMEOUT_RANGE.contains(&handshake_timeout) {
            return Err(invalid("handshake_timeout", "must be from 100ms to 60s"));
        }
        // Unknown descriptor limit: no rings, whose descriptors could not be counted.
        let ring_sessions_max = available.map_or(0, |available| {
            (available.saturating_sub(connections_max) / (RING_SESSION_DESCRIPTORS - 1)).min(RING_SESSIONS_CAP)
        });
        Ok(ClientLimits {
            connections_max,
            ring_sessions_max,
            connections_per_client_max,
            sessions_per_uid_max,
            handshake_timeout,
        })
    }
}

/// The most file descriptors this process may open (its soft
/// `RLIMIT_NOFILE`, read from `/proc/self/limits`), if known.
#[must_use]
pub fn descriptor_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(usize::MAX);
    }
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_limit_is_read() {
        let limit = descriptor_limit().expect("Linux has /proc/self/limits");
        assert!(limit >= 64, "{limit}");
    }

    #[test]
    fn defaults_follow_the_descriptor_limit_and_sessions_max() {
        let limits = ClientLimits::resolve(&FileClients::default(), Some(20_000), 65_536).expect("valid");
        let available = 20_000 - DESCRIPTORS_KEPT;
        assert_eq!(limits.ring_sessions_max, RING_SESSIONS_CAP, "capped");
        assert_eq!(limits.connections_max, available - 2 * RING_SESSIONS_CAP);
        assert_eq!(limits.connections_per_client_max, (available - 2 * RING_SESSIONS_CAP) / 4);
        let small = ClientLimits::resolve(&FileClients::default(), Some(1_024), 65_536).expect("valid");
        assert_eq!((small.connections_max, small.ring_sessions_max), (256, 256), "a third each");
        let configured = FileClients { connections_max: Some(available - 1000), ..FileClients::default() };
        let limits = ClientLimits::resolve(&configured, Some(20_000), 65_536).expect("valid");
        assert_eq!(limits.ring_sessions_max, 500, "rings take only the descriptors connections leave");
        let unknown = ClientLimits::resolve(&FileClients::default(), None, 65_536).expect("valid");
        assert_eq!(unknown.ring_sessions_max, 0);
        assert_eq!(limits.sessions_per_uid_max, 16_384);
        assert_eq!(limits.handshake_timeout, Duration::from_secs(2));
    }

    #[test]
    fn bounds_that_cannot_hold_are_refused_by_name() {
        let refused = |file: FileClients, descriptors| {
            ClientLimits::resolve(&file, descriptors, 100).expect_err("refused").to_string()
        };
        let error = refused(FileClients { connections_max: Some(5000), ..FileClients::default() }, Some(1024));
        assert!(error.contains("limits.connections_max") && error.contains("768"), "{error}");
        let error = refused(FileClients::default(), Some(200));
        assert!(error.contains("limits.connections_max"), "{error}");
        let error = refused(FileClients { connections_per_client_max: Some(0), ..FileClients::default() }, None);
        assert!(error.contains("connections_per_client_max"), "{error}");
        let error = refused(FileClients { sessions_per_uid_max: Some(101), ..FileClients::default() }, None);
        assert!(error.contains("sessions_per_uid_max"), "{error}");
        let error = refused(FileClients { handshake_timeout: Some("10m".into()), ..FileClients::default() }, None);
        assert!(error.contains("handshake_timeout"), "{error}");
    }
}
