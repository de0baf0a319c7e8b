//! What the cluster tests' clients do: hold locks, wait for them in tasks
//! of their own and collect when each was granted, and a fencing command
//! written as a script.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dlm_agent::client::{LockError, LockGuard, LockOptions, Session};
use dlm_core::{LockFlags, Mode};

/// A waiter's answer: its fencing token, and when it came.
pub type Waiter = tokio::task::JoinHandle<(Result<u64, LockError>, SystemTime)>;

/// A try-lock: not granted at once, not granted.
#[must_use]
pub fn try_opts() -> LockOptions {
    LockOptions { flags: LockFlags::NOQUEUE, ..LockOptions::default() }
}

/// Takes EX on each of `names` from `session`.
///
/// # Panics
/// One is not granted.
pub async fn hold(session: &Session, names: &[String]) -> Vec<LockGuard> {
    let mut guards = Vec::new();
    for name in names {
        guards.push(session.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await.expect("granted"));
    }
    guards
}

/// Waits on node `session`'s side for EX on each of `names`, each in its own
/// task; each answer comes with the wall-clock time it came.
pub fn wait_for(session: &Arc<Session>, names: &[String]) -> Vec<Waiter> {
    names
        .iter()
        .map(|name| {
            let (session, name) = (session.clone(), name.clone());
            tokio::spawn(async move {
                let granted = session.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await;
                let token = granted.map(|guard| {
                    let token = guard.fencing_token();
                    std::mem::forget(guard);
                    token
                });
                (token, SystemTime::now())
            })
        })
        .collect()
}

/// The waiters' grants, in order: each token with when it came; fails the
/// test if one is not granted within `limit`.
///
/// # Panics
/// One is not granted in time.
pub async fn granted(waiters: Vec<Waiter>, limit: Duration) -> Vec<(u64, SystemTime)> {
    let mut grants = Vec::new();
    for waiter in waiters {
        let (token, at) = tokio::time::timeout(limit, waiter).await.expect("granted in time").expect("task");
        grants.push((token.expect("granted"), at));
    }
    grants
}

/// A fencing command for the agents: a shell script in `dir` running
/// `body` with the node's id and address as `$1` and `$2`.
///
/// # Panics
/// It cannot be written.
pub fn fence_script(dir: &Path, body: &str) -> std::path::PathBuf {
    let script = dir.join("fence.sh");
    std::fs::write(&script, format!("#!/bin/sh\n{body}")).expect("script");
    let _ = std::process::Command::new("chmod").arg("755").arg(&script).status();
    script
}

/// `n` resource names `prefix-0`, `prefix-1`, …
#[must_use]
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}
