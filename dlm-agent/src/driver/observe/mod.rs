//! Observation: what the driver records about each lock and session, and
//! where it goes — Prometheus metrics ([`crate::metrics`], and
//! [`cluster_metrics`] in a cluster), one OpenTelemetry span per lock
//! request, USDT probe points ([`usdt`]) and the kernel evidence of each
//! lock's wait and hold ([`evidence`]). None of it changes what a client
//! gets: the driver calls in, nothing calls back.

mod cluster_metrics;
mod evidence;
mod pressure;
mod recovery;
mod usdt;

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use self::pressure::PressureMetrics;
use dlm_core::cluster::{ClusterNode, View};
use dlm_core::{Completion, LockHandle, LockRequest, Mode, Op, RevokeReason, SessionId, Status};
use dlm_ebpf_common::Attribution;
use tokio::time::Instant;

use self::cluster_metrics::ClusterMetrics;
use self::evidence::KernelEvidence;
pub(super) use self::evidence::to_wire as evidence_to_wire;
use self::recovery::RecoveryWatch;
pub(super) use self::usdt::ResourceName;
use super::LockspaceRef;
use crate::clock::Clock;
use crate::codes::{LinkReset, LockPhase, RejectCode, SessionEnd};
use crate::config::Config;
use crate::ebpf::AttributionMaps;
use crate::metrics::Metrics;

/// Adds an event to a lock's span, if it has one (`$span`: an `Option<&Span>`).
macro_rules! span_event {
    ($span:expr, $($event:tt)+) => {
        if let Some(span) = $span {
            tracing::info!(target: crate::telemetry::LOCK_TARGET, parent: span, $($event)+);
        }
    };
}

/// When something happened, as nanoseconds since the agent's clock started
/// (plus one, so that `Option<Stamp>` takes eight bytes): a lock's record
/// keeps two.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stamp(NonZeroU64);

impl Stamp {
    /// `at`, on `clock`.
    pub(super) fn at(clock: Clock, at: Instant) -> Stamp {
        Stamp(NonZeroU64::MIN.saturating_add(clock.to_engine(at).as_nanos()))
    }

    /// The time from this stamp to `now`.
    pub(super) fn until(self, clock: Clock, now: Instant) -> Duration {
        now.saturating_duration_since(clock.to_tokio(dlm_core::Instant::from_nanos(self.0.get() - 1)))
    }
}

/// What the agent remembers about one of a session's locks, for metrics,
/// spans, USDT probe points, kernel evidence and dumps. Kept small (72
/// bytes; the heavy parts boxed and present only when their feature is on)
/// because a node holds millions.
pub(super) struct LockRecord {
    /// Its lockspace's name (shared).
    lockspace: LockspaceRef,
    /// The resource name, for the USDT probe points.
    resource: ResourceName,
    /// Its span and kernel mark, when spans are exported or eBPF is on.
    extras: Option<Box<Extras>>,
    /// The fencing token of the grant.
    token: u64,
    /// When the pending request was made.
    requested_at: Option<Stamp>,
    /// When the lock was first granted.
    granted_at: Option<Stamp>,
    /// The mode of the pending request, or of the grant.
    mode: Mode,
}

const _: () = assert!(std::mem::size_of::<LockRecord>() <= 72, "a lock's record stays small");

/// What a lock's record keeps only when spans or eBPF are on.
#[derive(Default)]
struct Extras {
    /// The lock's span (queued, granted, blocking callbacks, released).
    span: Option<tracing::Span>,
    /// The client process's kernel counters at the start of the current
    /// phase (a queued request, or the first grant).
    mark: Option<Attribution>,
}

impl LockRecord {
    /// A lock just requested.
    pub(super) fn new(
        lockspace: LockspaceRef,
        resource: ResourceName,
        mode: Mode,
        now: Stamp,
        span: Option<tracing::Span>,
    ) -> LockRecord {
        LockRecord {
            lockspace,
            resource,
            extras: span.map(|span| Box::new(Extras { span: Some(span), mark: None })),
            token: 0,
            requested_at: Some(now),
            granted_at: None,
            mode,
        }
    }

    /// A conversion of this lock was accepted.
    pub(super) fn convert_requested(&mut self, mode: Mode, now: Stamp, queued: bool) {
        self.mode = mode;
        self.requested_at = Some(now);
        span_event!(self.span(), mode = mode.name(), queued, "convert requested");
    }

    /// Its span, if it has one.
    fn span(&self) -> Option<&tracing::Span> {
        self.extras.as_ref().and_then(|e| e.span.as_ref())
    }

    /// The kernel counters at the start of its current phase, if marked.
    pub(super) fn mark(&self) -> Option<&Attribution> {
        self.extras.as_ref().and_then(|e| e.mark.as_ref())
    }

    fn take_mark(&mut self) -> Option<Attribution> {
        self.extras.as_mut().and_then(|e| e.mark.take())
    }

    fn set_mark(&mut self, mark: Option<Attribution>) {
        match (&mut self.extras, mark) {
            (Some(extras), mark) => extras.mark = mark,
            (None, Some(mark)) => self.extras = Some(Box::new(Extras { span: None, mark: Some(mark) })),
            (None, None) => {}
        }
    }

    /// When its current phase began: the first grant, or the pending request.
    pub(super) fn phase_start(&self, granted: bool) -> Option<Stamp> {
        if granted { self.granted_at } else { self.requested_at }
    }

    fn usdt_target(&self) -> usdt::Target<'_> {
        usdt::Target { lockspace: self.lockspace.c_string(), resource: &self.resource }
    }
}

/// Marks a lock's span as rejected.
pub(super) fn span_rejected(span: &Option<tracing::Span>, code: RejectCode) {
    span_event!(span.as_ref(), code = code.as_str(), "rejected");
}

/// Where observations go.
pub(super) struct Observer {
    pub(super) metrics: Arc<Metrics>,
    /// Present in a cluster.
    cluster: Option<ClusterMetrics>,
    /// The recovery running now (span, probes, metrics).
    recovery: RecoveryWatch,
    /// Kernel attribution of lock phases (a no-op without eBPF).
    pub(super) evidence: KernelEvidence,
    /// The agent's run delay, the peers' pressure, nodes lost under it.
    pub(super) pressure: PressureMetrics,
    clock: Clock,
}

impl Observer {
    pub(super) fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        attribution: Option<AttributionMaps>,
        clock: Clock,
    ) -> Observer {
        let cluster = config.cluster.as_ref().map(|c| {
            ClusterMetrics::new(&metrics, c.members.len(), c.membership == crate::config::MembershipSource::Corosync)
        });
        let pressure = PressureMetrics::new(&metrics, config.cluster.is_some());
        Observer {
            metrics,
            cluster,
            pressure,
            recovery: RecoveryWatch::default(),
            evidence: KernelEvidence::new(attribution),
            clock,
        }
    }

    pub(super) fn session_opened(&mut self, pid: Option<u32>) {
        self.evidence.session_opened(pid);
        self.metrics.sessions.inc();
        self.metrics.sessions_opened.inc();
    }

    /// A session refused by one of the session quotas.
    pub(super) fn session_refused(&mut self, limit: super::quota::SessionLimit) {
        self.metrics.refused.with_label_values(&[limit.key()]).inc();
    }

    pub(super) fn session_ended(&mut self, pid: Option<u32>, reason: SessionEnd) {
        self.evidence.session_ended(pid);
        self.metrics.sessions.dec();
        self.metrics.sessions_ended.with_label_values(&[reason.as_str()]).inc();
    }

    pub(super) fn rejected(&self, code: RejectCode) {
        self.metrics.rejected.with_label_values(&[code.as_str()]).inc();
    }

    pub(super) fn link_reset(&self, reason: LinkReset) {
        if let Some(cluster) = &self.cluster {
            cluster.link_resets.with_label_values(&[reason.as_str()]).inc();
        }
    }

    /// Brings the cluster metrics up to date with the node's counts.
    pub(super) fn update_cluster(&mut self, node: &ClusterNode) {
        if let Some(cluster) = &mut self.cluster {
            let counts = cluster_metrics::Counts {
                mastered: node.mastered_count(),
                directory: node.directory_count(),
                remote_locks: node.remote_lock_count(),
                lock_delayed: node.engine().delayed_resources(),
            };
            cluster.update(node.stats(), counts);
        }
    }

    /// Whether a recovery is running, as last seen.
    pub(super) fn recovering(&self) -> bool {
        self.recovery.running()
    }

    /// Brings the recovery metrics up to date: its phase, and its time when
    /// it has just finished.
    pub(super) fn update_recovery(&mut self, node: &ClusterNode) {
        self.recovery.update(node, self.cluster.as_ref(), self.clock);
    }

    /// The membership's word on lost nodes waiting for fencing and on a
    /// view being agreed.
    pub(super) fn membership(&self, status: &crate::command::MembershipStatus) {
        if let Some(cluster) = &self.cluster {
            let awaited = status.agreeing.as_ref().map_or(0, |(members, _)| members.len());
            cluster.membership(status.waiting_for_fencing.len(), awaited);
        }
    }

    /// A view was taken (`fenced`: this node fenced itself by it).
    pub(super) fn view_taken(&self, view: &View, fenced: bool) {
        if let Some(cluster) = &self.cluster {
            cluster.view_taken(view.epoch, view.members.len(), view.quorate, fenced);
        }
        tracing::info!(
            epoch = view.epoch,
            quorate = view.quorate,
            fenced,
            members = ?view.members.iter().map(|m| m.id.0).collect::<Vec<_>>(),
            "view taken"
        );
    }

    /// A new lock was accepted; `queued` when it has to wait.
    pub(super) fn lock_requested(
        &self,
        record: &mut LockRecord,
        pid: Option<u32>,
        session: SessionId,
        handle: u64,
        queued: bool,
    ) {
        if queued {
            span_event!(record.span(), "queued");
            record.set_mark(self.evidence.mark(pid));
        }
        usdt::request(record.usdt_target(), record.mode, session.0, handle, pid.map_or(0, u64::from));
    }

    /// The span of one lock request, joined to the client's trace when it
    /// passed a valid `traceparent`.
    pub(super) fn lock_span(
        &self,
        session: SessionId,
        pid: i32,
        lockspace: &str,
        lock: &LockRequest,
        traceparent: Option<&str>,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            target: crate::telemetry::LOCK_TARGET,
            "dlm.lock",
            otel.name = "dlm lock",
            otel.kind = "server",
            dlm.lockspace = lockspace,
            dlm.resource = %String::from_utf8_lossy(&lock.name),
            dlm.mode = lock.mode.name(),
            dlm.flags = %lock.flags,
            dlm.session = session.0,
            dlm.handle = lock.handle.0,
            dlm.pid = pid,
            dlm.outcome = tracing::field::Empty,
            dlm.fencing_token = tracing::field::Empty,
            dlm.kernel.wait.oncpu_ns = tracing::field::Empty,
            dlm.kernel.wait.runqueue_ns = tracing::field::Empty,
            dlm.kernel.wait.blocked_ns = tracing::field::Empty,
            dlm.kernel.wait.reclaim_ns = tracing::field::Empty,
            dlm.kernel.wait.kernel_lock_ns = tracing::field::Empty,
            dlm.kernel.wait.futex_ns = tracing::field::Empty,
            dlm.kernel.hold.oncpu_ns = tracing::field::Empty,
            dlm.kernel.hold.runqueue_ns = tracing::field::Empty,
            dlm.kernel.hold.blocked_ns = tracing::field::Empty,
            dlm.kernel.hold.reclaim_ns = tracing::field::Empty,
            dlm.kernel.hold.kernel_lock_ns = tracing::field::Empty,
            dlm.kernel.hold.futex_ns = tracing::field::Empty,
        );
        if let Some(context) = traceparent.and_then(crate::telemetry::parent_context) {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let _ = span.set_parent(context);
        }
        span
    }

    /// A request of a lock the agent keeps a record of completed: counted,
    /// on its span, and, when granted or released, timed and traced. The
    /// driver, which owns the records, drops the record when the lock ends
    /// (see `output.rs`).
    pub(super) fn completed(
        &self,
        now: Instant,
        node: &ClusterNode,
        pid: Option<u32>,
        record: &mut LockRecord,
        completion: &Completion,
    ) {
        let op = completion.op.name();
        let mode = completion.mode.unwrap_or(record.mode);
        record.lockspace.series().requests(completion.op, record.mode, completion.status).inc();
        if let Some(span) = record.span() {
            if completion.op == Op::Lock {
                span.record("dlm.outcome", completion.status.name());
            }
            if let Some(token) = completion.token {
                span.record("dlm.fencing_token", token.0);
            }
        }
        span_event!(
            record.span(),
            op,
            status = completion.status.name(),
            mode = mode.name(),
            fencing_token = completion.token.map_or(0, |t| t.0),
            "{}",
            match (completion.op, completion.status) {
                (Op::Unlock, _) => "released",
                (_, Status::Granted) => "granted",
                _ => "not granted",
            }
        );
        match completion.status {
            Status::Granted => self.granted(now, node, pid, record, completion, mode),
            Status::Unlocked => self.released(now, pid, record),
            // A conversion that failed: the lock keeps the mode it held.
            _ if completion.mode.is_some() => {
                record.requested_at = None;
                record.mode = mode;
            }
            // A new lock not granted: its record goes.
            _ => {}
        }
    }

    /// A grant: its wait timed (and, for a lock mastered elsewhere, as a
    /// remote wait), its USDT probe fired, its kernel evidence moved from
    /// the wait to the hold.
    fn granted(
        &self,
        now: Instant,
        node: &ClusterNode,
        pid: Option<u32>,
        record: &mut LockRecord,
        completion: &Completion,
        mode: Mode,
    ) {
        let mut wait_ns = 0;
        if let Some(at) = record.requested_at.take() {
            let wait = at.until(self.clock, now);
            wait_ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
            record.lockspace.series().grant_wait(mode).observe(wait.as_secs_f64());
            if let Some(cluster) = &self.cluster
                && node.remote_master(completion.session, completion.handle).is_some()
            {
                let labels = [record.lockspace.text(), mode.name()];
                cluster.remote_grant_wait.with_label_values(&labels).observe(wait.as_secs_f64());
            }
        }
        record.token = completion.token.map_or(record.token, |t| t.0);
        usdt::grant(record.usdt_target(), mode, wait_ns, record.token, pid.map_or(0, u64::from));
        if record.granted_at.is_none() {
            if let Some(mark) = record.take_mark() {
                self.evidence.finish(LockPhase::Wait, pid, &mark, &self.metrics, record.span());
            }
            record.set_mark(self.evidence.mark(pid));
        }
        record.granted_at.get_or_insert(Stamp::at(self.clock, now));
        record.mode = mode;
    }

    /// A release: the hold timed, its USDT probe fired, its kernel evidence closed.
    fn released(&self, now: Instant, pid: Option<u32>, record: &mut LockRecord) {
        if let Some(at) = record.granted_at {
            let held = at.until(self.clock, now);
            record.lockspace.series().hold(record.mode).observe(held.as_secs_f64());
            let held_ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
            usdt::release(record.usdt_target(), record.mode, held_ns, record.token, pid.map_or(0, u64::from));
        }
        if let Some(mark) = record.take_mark() {
            self.evidence.finish(LockPhase::Hold, pid, &mark, &self.metrics, record.span());
        }
    }

    /// A blocking callback sent to the holder of a lock.
    pub(super) fn blocking(
        &self,
        pid: Option<u32>,
        record: &LockRecord,
        session: SessionId,
        handle: LockHandle,
        mode: Mode,
    ) {
        usdt::blocking(record.usdt_target(), mode, session.0, handle.0, pid.map_or(0, u64::from));
        record.lockspace.series().blocking().inc();
        span_event!(record.span(), mode = mode.name(), "blocking callback sent");
    }

    /// A lock taken from its holder (forced release, fencing, a lost node).
    pub(super) fn revoked(&self, record: &LockRecord, reason: RevokeReason) {
        span_event!(record.span(), reason = ?reason, "revoked");
    }
}
