//! The session quotas a new session must pass: its uid's share
//! (`limits.sessions_per_uid_max`) and the engine's total
//! (`limits.sessions_max`). A session over either is refused at once with
//! `limit_exceeded` and a message that names the limit and how to raise it;
//! the refusal is counted (`dlm_client_refused_total`), and logged once per
//! episode: the first refusal of a uid (or of everyone) is a warning, the
//! next ones are not logged again until its count has fallen below the
//! limit. A client that retries in a loop cannot fill the log.

use std::collections::{HashMap, HashSet};

use crate::codes::RejectCode;
use crate::convert::Rejection;

/// Which quota refused a session, named as its configuration key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SessionLimit {
    PerUid,
    Total,
}

impl SessionLimit {
    /// The configuration key, also the metric's `limit` label.
    pub(super) fn key(self) -> &'static str {
        match self {
            SessionLimit::PerUid => "sessions_per_uid_max",
            SessionLimit::Total => "sessions_max",
        }
    }
}

/// Sessions open per uid, and which refusals were already logged.
#[derive(Debug)]
pub(super) struct SessionQuota {
    per_uid_max: u32,
    /// Sessions open per uid (Unix socket clients; TCP clients have no uid).
    open: HashMap<u32, u32>,
    /// Uids refused since they last had room: not logged again.
    told: HashSet<u32>,
    /// Every session was taken and a refusal was logged.
    told_full: bool,
}

impl SessionQuota {
    pub(super) fn new(per_uid_max: u32) -> SessionQuota {
        SessionQuota { per_uid_max, open: HashMap::new(), told: HashSet::new(), told_full: false }
    }

    /// Whether `uid` may open one more session.
    ///
    /// # Errors
    /// Its share is taken: the refusal to send.
    pub(super) fn check(&mut self, uid: Option<u32>) -> Result<(), Rejection> {
        let Some(uid) = uid else { return Ok(()) };
        let open = self.open.get(&uid).copied().unwrap_or(0);
        if open < self.per_uid_max {
            return Ok(());
        }
        let message = format!(
            "uid {uid} has {open} sessions open, its limit (limits.sessions_per_uid_max = {}); close sessions, \
             or raise sessions_per_uid_max in the [limits] section of the agent's configuration",
            self.per_uid_max
        );
        if self.told.insert(uid) {
            tracing::warn!(uid, limit = self.per_uid_max, "refusing new sessions of a uid at its session limit");
        }
        Err(Rejection::new(0, RejectCode::LimitExceeded, message))
    }

    /// The refusal of a session because the engine holds `sessions_max`.
    pub(super) fn full(&mut self, sessions_max: u32) -> Rejection {
        if !self.told_full {
            self.told_full = true;
            tracing::warn!(limit = sessions_max, "refusing new sessions: every session of the agent is taken");
        }
        Rejection::new(
            0,
            RejectCode::LimitExceeded,
            format!(
                "the agent has {sessions_max} sessions open, its limit (limits.sessions_max); close sessions, or \
                 raise sessions_max in the [limits] section of the agent's configuration"
            ),
        )
    }

    pub(super) fn opened(&mut self, uid: Option<u32>) {
        if let Some(uid) = uid {
            *self.open.entry(uid).or_insert(0) += 1;
        }
    }

    /// A session of `uid` ended, leaving `total` open.
    pub(super) fn closed(&mut self, uid: Option<u32>, total: usize, sessions_max: u32) {
        if total < sessions_max as usize {
            self.told_full = false;
        }
        let Some(uid) = uid else { return };
        if let std::collections::hash_map::Entry::Occupied(mut open) = self.open.entry(uid) {
            *open.get_mut() -= 1;
            if *open.get() < self.per_uid_max {
                self.told.remove(&uid);
            }
            if *open.get() == 0 {
                open.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_gets_its_share_then_a_refusal_that_names_the_limit_and_has_room_again_once_one_closes() {
        let mut quota = SessionQuota::new(2);
        for _ in 0..2 {
            quota.check(Some(7)).expect("within the share");
            quota.opened(Some(7));
        }
        let refusal = quota.check(Some(7)).expect_err("over the share");
        assert_eq!(refusal.code, RejectCode::LimitExceeded);
        assert!(refusal.message.contains("limits.sessions_per_uid_max = 2"), "{}", refusal.message);
        assert!(refusal.message.contains("[limits]"), "says where to raise it: {}", refusal.message);
        assert!(quota.told.contains(&7), "logged once");
        quota.check(Some(8)).expect("another uid has its own share");
        quota.check(None).expect("a client without a uid counts only against the total");
        quota.closed(Some(7), 1, 10);
        assert!(!quota.told.contains(&7), "a new episode is logged again");
        quota.check(Some(7)).expect("room again");
        quota.closed(Some(7), 0, 10);
        assert!(quota.open.is_empty(), "no entry outlives a uid's last session");
    }

    #[test]
    fn the_total_is_logged_once_until_a_session_ends() {
        let mut quota = SessionQuota::new(2);
        let refusal = quota.full(5);
        assert!(refusal.message.contains("limits.sessions_max"), "{}", refusal.message);
        assert!(quota.told_full);
        quota.closed(None, 4, 5);
        assert!(!quota.told_full);
    }
}
