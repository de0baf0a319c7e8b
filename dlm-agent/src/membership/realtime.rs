//! Real-time priority for the membership's threads, when the agent may
//! have it (`[cluster] realtime_priority`).
//!
//! Why: under memory pressure a node's runnable tasks queue behind reclaim,
//! and a thread that wakes to ask corosync for the lease, to dispatch its
//! callbacks or to feed the watchdog may wait its turn for long enough that
//! the lease lapses or the watchdog fires on a healthy node (corosync's
//! issue #706: corosync itself went back to real-time priority because
//! normal priority caused false fencing). These threads sleep almost all
//! the time and allocate nothing once started (the lease asks through one
//! kept connection), so at real-time priority they take the CPU only for
//! the moment they need it, and never reclaim on the hot path.
//!
//! Which: the lease's asker (`dlm-lease`), corosync's dispatch threads
//! (`dlm-cpg`, `dlm-quorum`) and the watchdog's feeder (`dlm-watchdog`).
//! Not the async runtime's worker, which serves clients and peers: at
//! real-time priority a busy agent would keep everything else on its CPU
//! off it. `SCHED_RR` below corosync's own priority (99), with
//! `SCHED_RESET_ON_FORK`, so that a fencing command started from the agent
//! runs at normal priority.
//!
//! Setting it needs `CAP_SYS_NICE` (the systemd unit gives it) or an
//! `RLIMIT_RTPRIO` at least the priority. Without either the threads run at
//! normal priority, with one warning; `dlm_cluster_membership_realtime_threads`
//! says how many run at real-time priority.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::IntGauge;

#[cfg(test)]
use crate::bounds::REALTIME_PRIORITY_DEFAULT;

/// What each membership thread does first: take the configured priority.
#[derive(Clone, Debug)]
pub struct Realtime {
    priority: u8,
    /// Threads at real-time priority now.
    threads: IntGauge,
    /// Whether the warning about a refusal was logged (once per process).
    warned: Arc<AtomicBool>,
}

impl Realtime {
    /// Threads will take `priority` (0: they stay at normal priority),
    /// counted in `threads`.
    #[must_use]
    pub fn new(priority: u8, threads: IntGauge) -> Realtime {
        Realtime { priority, threads, warned: Arc::default() }
    }

    /// Gives the calling thread, named `thread`, the real-time priority if
    /// it is configured and permitted, for as long as it runs; the guard,
    /// kept by the thread, counts it meanwhile.
    #[must_use = "the guard counts the thread while it runs"]
    pub fn enter(&self, thread: &str) -> RealtimeGuard {
        if self.priority == 0 {
            return RealtimeGuard { threads: None };
        }
        let param = libc::sched_param { sched_priority: i32::from(self.priority) };
        // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
        let set = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, &raw const param) };
        if set != 0 {
            let error = std::io::Error::last_os_error();
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    %error,
                    priority = self.priority,
                    "the membership's threads run at normal priority: real-time priority needs CAP_SYS_NICE \
                     (the systemd unit gives it) or an RLIMIT_RTPRIO of at least the priority; under memory \
                     pressure a late lease or watchdog may then fence this node"
                );
            }
            return RealtimeGuard { threads: None };
        }
        tracing::debug!(thread, priority = self.priority, "at real-time priority (SCHED_RR)");
        self.threads.inc();
        RealtimeGuard { threads: Some(self.threads.clone()) }
    }
}

/// Counts a thread at real-time priority while it runs.
#[derive(Debug)]
pub struct RealtimeGuard {
    threads: Option<IntGauge>,
}

impl Drop for RealtimeGuard {
    fn drop(&mut self) {
        if let Some(threads) = &self.threads {
            threads.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of the calling thread.
    fn policy() -> i32 {
        // SAFETY: no arguments; reads the calling thread's policy.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn off_leaves_the_thread_alone() {
        let threads = IntGauge::new("t", "t").unwrap();
        let realtime = Realtime::new(0, threads.clone());
        std::thread::spawn(move || {
            let _guard = realtime.enter("test");
            assert_eq!(policy() & !libc::SCHED_RESET_ON_FORK, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
        assert_eq!(threads.get(), 0);
    }

    /// As root (CAP_SYS_NICE), the thread runs at SCHED_RR and is counted
    /// while it runs; without the capability it stays as it was, uncounted.
    #[test]
    fn a_thread_takes_the_priority_when_permitted_and_is_counted_while_it_runs() {
        let threads = IntGauge::new("t", "t").unwrap();
        let realtime = Realtime::new(REALTIME_PRIORITY_DEFAULT, threads.clone());
        let inside = threads.clone();
        let worker = std::thread::spawn(move || {
            let _guard = realtime.enter("test");
            (policy() & !libc::SCHED_RESET_ON_FORK, inside.get())
        });
        let (policy, seen) = worker.join().unwrap();
        let realtime_now = policy == libc::SCHED_RR;
        // SAFETY: no arguments.
        if unsafe { libc::geteuid() } == 0 {
            assert!(realtime_now, "root (CAP_SYS_NICE) may take real-time priority");
        }
        if realtime_now {
            assert_eq!(seen, 1, "counted while it ran");
        } else {
            assert_eq!(policy, libc::SCHED_OTHER);
        }
        assert_eq!(threads.get(), 0, "uncounted once it ended");
    }
}
