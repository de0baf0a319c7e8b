//! What a recovery shows while it runs: one span per recovery (epoch,
//! departed nodes, time) with an event at each barrier passed, the USDT
//! probe points `dlm:recovery__start`, `dlm:recovery__phase` and
//! `dlm:recovery__done`, and the recovery metrics.
//!
//! | probe | arg0 | arg1 | arg2 |
//! |---|---|---|---|
//! | `recovery__start` | epoch | members | departed nodes |
//! | `recovery__phase` | epoch | phase (1 stop, 2 directory, 3 locks, 4 done) | ns since start |
//! | `recovery__done` | epoch | ns since start | departed nodes |

// The probe macro emits the SDT note with inline assembly (see `usdt.rs`).
#![allow(unsafe_code)]

use dlm_core::cluster::{ClusterNode, RecoveryPhase};

use super::cluster_metrics::ClusterMetrics;
use crate::clock::Clock;

/// The recovery running now, as last seen.
struct Running {
    epoch: u64,
    phase: RecoveryPhase,
    started: dlm_core::Instant,
    departed: u64,
    span: tracing::Span,
}

/// Watches the node's recovery from one driver pass to the next.
#[derive(Default)]
pub struct RecoveryWatch {
    running: Option<Running>,
}

fn phase_number(phase: RecoveryPhase) -> u64 {
    u64::from(phase.index()) + 1
}

impl Running {
    /// Reports each barrier reached after the last one seen, up to `to`, in
    /// order (several may pass between two looks).
    fn advance(&mut self, to: RecoveryPhase, elapsed_ns: u64) {
        let from = self.phase;
        for phase in RecoveryPhase::ALL.into_iter().filter(|p| *p > from && *p <= to) {
            probe::probe!(dlm, recovery__phase, self.epoch, phase_number(phase), elapsed_ns);
            self.span.in_scope(|| tracing::info!(phase = phase.name(), "barrier reached"));
            self.phase = phase;
        }
    }
}

impl RecoveryWatch {
    /// Whether a recovery was running when last looked at.
    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Looks at the node's recovery: a new one starts its span, a barrier
    /// passed is an event, an end closes the span and is timed.
    pub fn update(&mut self, node: &ClusterNode, metrics: Option<&ClusterMetrics>, clock: Clock) {
        let status = node.recovery_status();
        let now = clock.engine_now();
        let nanos = |since: dlm_core::Instant| {
            u64::try_from(now.saturating_duration_since(since).as_nanos()).unwrap_or(u64::MAX)
        };
        let same = matches!((&self.running, &status), (Some(r), Some(s)) if r.epoch == s.epoch);
        if !same {
            if let Some(mut done) = self.running.take() {
                if status.is_none() {
                    // Finished (not replaced by a newer view's): every barrier
                    // was passed, some maybe within the pass that finished it.
                    done.advance(RecoveryPhase::Done, nanos(done.started));
                }
                let took = now.saturating_duration_since(done.started);
                probe::probe!(dlm, recovery__done, done.epoch, nanos(done.started), done.departed);
                done.span.in_scope(|| {
                    tracing::info!(epoch = done.epoch, took_ms = took.as_millis() as u64, "recovery done")
                });
                if let Some(metrics) = metrics {
                    metrics.recovery(None, Some(took));
                }
            }
            if let Some(s) = &status {
                let departed = s.departed.len() as u64;
                let members = node.config().membership.members().len() as u64;
                probe::probe!(dlm, recovery__start, s.epoch, members, departed);
                let span = tracing::info_span!(
                    "dlm.recovery",
                    epoch = s.epoch,
                    departed = ?s.departed.iter().map(|n| n.0).collect::<Vec<_>>(),
                    members
                );
                span.in_scope(|| tracing::info!("recovery started"));
                self.running =
                    Some(Running { epoch: s.epoch, phase: RecoveryPhase::Stop, started: s.started, departed, span });
            }
        }
        if let (Some(running), Some(s)) = (self.running.as_mut(), &status) {
            running.advance(s.phase, nanos(running.started));
            if let Some(metrics) = metrics {
                metrics.recovery(Some(s.phase), None);
            }
        }
    }
}
