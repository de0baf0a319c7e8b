//! Session output: the node's effects routed to the sessions they are for,
//! everything a pass has for a framed session written at once (on one CPU
//! the ring sessions' bells rung after all of it), and the sessions whose
//! clients do not read ended as slow readers.

use dlm_core::{Effect, SessionId, Status};
use tokio::sync::mpsc;

use super::Driver;
use crate::codes::SessionEnd;
use crate::command::SessionOutput;
use crate::convert;
use crate::proto;

impl Driver {
    /// Queues a message for a session; a full queue marks the session slow.
    pub(super) fn deliver(&mut self, session: SessionId, message: proto::ServerMessage) {
        let Some(state) = self.sessions.get(&session) else { return };
        match &state.events {
            SessionOutput::Stream(queue) => {
                if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(Ok(message)) {
                    self.slow.push(session);
                }
            }
            SessionOutput::Framed(sink) => {
                // A broken connection is its reader's to notice.
                let Ok(pushed) = sink.push_message(&message) else { return };
                if pushed.needs_flush || pushed.frames > self.config.session_queue_max {
                    self.unflushed.push((session, sink.clone()));
                }
            }
        }
    }

    /// Writes what this pass appended to framed sessions, one write per
    /// session however many messages it got; a session whose client leaves
    /// more than `session_queue_max` frames unread after that is slow.
    /// On one CPU, ring sessions' bells are rung after every write (see
    /// [`dlm_proto::framing::ring::bells_after`]): a bell rung at once
    /// lets its client preempt the agent before the other sessions'
    /// answers are out. On more, at once: the client runs beside the rest
    /// of the pass (side by side, deferring there cost the contended row).
    pub(super) fn flush_sessions(&mut self) {
        let unflushed = std::mem::take(&mut self.unflushed);
        let slow = &mut self.slow;
        let queue_max = self.config.session_queue_max;
        let flush = || {
            for (session, sink) in unflushed {
                sink.flush();
                if sink.frames_waiting() > queue_max {
                    slow.push(session);
                }
            }
        };
        if crate::spin::many_cpus() { flush() } else { dlm_proto::framing::ring::bells_after(flush) }
    }

    /// Sends what the node has for peers and sessions, then ends the
    /// sessions found slow meanwhile.
    pub(super) fn route_effects(&mut self) {
        self.transmit();
        // One clock read for the pass's effects, taken at the first.
        let clock = self.clock;
        let mut now = None;
        while let Some(effect) = self.node.poll_effect() {
            self.observe(&effect, *now.get_or_insert_with(|| clock.now()));
            let session = match &effect {
                Effect::Complete(completion) => completion.session,
                Effect::Blocking { session, .. } | Effect::Revoked { session, .. } => *session,
            };
            self.deliver(session, convert::effect_to_wire(effect));
        }
        self.flush_sessions();
        if self.stopping {
            // Every session ends next, after hearing why; none as slow.
            self.slow.clear();
        }
        for session in std::mem::take(&mut self.slow) {
            if self.sessions.contains_key(&session) {
                tracing::warn!(session = session.0, "client does not read its stream; ending its session");
                self.end_session(session, SessionEnd::SlowReader);
            }
        }
        self.transmit();
    }

    /// Shows an effect to the observer with the record of its lock, and
    /// drops the record when the lock ends (released, revoked, or a new
    /// lock not granted); `now` is the time of the pass that routes it.
    fn observe(&mut self, effect: &Effect, now: tokio::time::Instant) {
        match effect {
            Effect::Complete(completion) => {
                let Some(state) = self.sessions.get_mut(&completion.session) else { return };
                let pid = state.pid();
                let handle = completion.handle.0;
                let Some(record) = state.locks.get_mut(&handle) else { return };
                self.observer.completed(now, &self.node, pid, record, completion);
                let ends = completion.status == Status::Unlocked
                    || (completion.status != Status::Granted && completion.mode.is_none());
                if ends {
                    state.locks.remove(&handle);
                }
            }
            Effect::Blocking { session, handle, mode } => {
                let Some(state) = self.sessions.get(session) else { return };
                if let Some(record) = state.locks.get(&handle.0) {
                    self.observer.blocking(state.pid(), record, *session, *handle, *mode);
                }
            }
            Effect::Revoked { session, handle, reason } => {
                if let Some(record) = self.sessions.get_mut(session).and_then(|s| s.locks.remove(&handle.0)) {
                    self.observer.revoked(&record, *reason);
                }
            }
        }
    }

    pub(super) fn end_session(&mut self, session: SessionId, reason: SessionEnd) {
        let Some(state) = self.sessions.remove(&session) else {
            return;
        };
        let _ = self.node.end_session(self.clock.engine_now(), session);
        self.quota.closed(state.credentials.uid(), self.sessions.len(), self.config.limits.sessions_max);
        self.observer.session_ended(state.pid(), reason);
    }
}
