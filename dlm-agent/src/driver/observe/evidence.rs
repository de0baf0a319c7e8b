//! Kernel evidence, the driver's side of DLM attribution: which client
//! processes the eBPF programs account, and turning their counters into
//! each lock's kernel evidence — span attributes and events, and metrics.
//!
//! A client process is accounted while it has a session (one map update at
//! session open and end, not per lock). A lock's wait phase runs from a
//! request that queued to its grant; its hold phase from the first grant to
//! the unlock. The counters are per process, so a process with several
//! locks in the same phase sees the same time on each.

use dlm_ebpf_common::Attribution;

use crate::codes::LockPhase;
use crate::ebpf::AttributionMaps;
use crate::metrics::{ATTRIBUTION_STATES, Metrics};
use crate::proto;

/// Present only when the eBPF programs are loaded.
pub struct KernelEvidence {
    maps: Option<AttributionMaps>,
}

impl KernelEvidence {
    /// Evidence from these maps (`None`: eBPF is off, everything is a no-op).
    pub fn new(maps: Option<AttributionMaps>) -> KernelEvidence {
        KernelEvidence { maps }
    }

    /// Whether the programs are there to account anything.
    pub fn enabled(&self) -> bool {
        self.maps.is_some()
    }

    /// A client process opened a session.
    pub fn session_opened(&mut self, pid: Option<u32>) {
        if let (Some(maps), Some(pid)) = (self.maps.as_mut(), pid) {
            maps.track(pid);
        }
    }

    /// A client process's session ended.
    pub fn session_ended(&mut self, pid: Option<u32>) {
        if let (Some(maps), Some(pid)) = (self.maps.as_mut(), pid) {
            maps.untrack(pid);
        }
    }

    /// The counters of `pid` now, to measure a phase from.
    pub fn mark(&self, pid: Option<u32>) -> Option<Attribution> {
        Some(self.maps.as_ref()?.read(pid?))
    }

    /// The time since `mark`.
    pub fn since(&self, pid: Option<u32>, mark: &Attribution) -> Option<Attribution> {
        Some(self.mark(pid)?.since(mark))
    }

    /// Ends a phase: counts it in the metrics and puts it on the span.
    pub fn finish(
        &self,
        phase: LockPhase,
        pid: Option<u32>,
        mark: &Attribution,
        metrics: &Metrics,
        span: Option<&tracing::Span>,
    ) {
        let Some(spent) = self.since(pid, mark) else { return };
        for (state, ns) in ATTRIBUTION_STATES.iter().zip(values(&spent)) {
            if ns > 0 {
                metrics.attributed.with_label_values(&[phase.as_str(), state]).inc_by(ns as f64 / 1e9);
            }
        }
        if let Some(span) = span {
            record_on_span(span, phase, &spent);
        }
    }
}

/// The values in the order of [`ATTRIBUTION_STATES`].
fn values(a: &Attribution) -> [u64; 6] {
    [a.oncpu_ns, a.runq_ns, a.blocked_ns, a.reclaim_ns, a.klock_ns, a.futex_ns]
}

fn record_on_span(span: &tracing::Span, phase: LockPhase, a: &Attribution) {
    let prefix = match phase {
        LockPhase::Wait => "dlm.kernel.wait",
        LockPhase::Hold => "dlm.kernel.hold",
    };
    for (state, ns) in ATTRIBUTION_STATES.iter().zip(values(a)) {
        span.record(format!("{prefix}.{state}_ns").as_str(), ns);
    }
    tracing::info!(
        target: crate::telemetry::LOCK_TARGET,
        parent: span,
        phase = phase.as_str(),
        oncpu_ns = a.oncpu_ns,
        runqueue_ns = a.runq_ns,
        blocked_ns = a.blocked_ns,
        reclaim_ns = a.reclaim_ns,
        kernel_lock_ns = a.klock_ns,
        futex_ns = a.futex_ns,
        "kernel attribution"
    );
}

/// The wire form.
pub fn to_wire(a: &Attribution) -> proto::KernelAttribution {
    proto::KernelAttribution {
        oncpu_ns: a.oncpu_ns,
        runqueue_ns: a.runq_ns,
        blocked_ns: a.blocked_ns,
        reclaim_ns: a.reclaim_ns,
        kernel_lock_ns: a.klock_ns,
        futex_ns: a.futex_ns,
    }
}
