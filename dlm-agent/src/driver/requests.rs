//! A client's request: decoded from the wire, its lockspace resolved,
//! handed to the node, and either remembered (for observation) or
//! rejected with a code.

use dlm_core::cluster::Outcome;
use dlm_core::{ClientRequest, SessionId};

use super::observe::{self, LockRecord, ResourceName, Stamp};
use super::{Driver, admin};
use crate::codes::{RejectCode, Right};
use crate::convert::{self, Decoded, Rejection};
use crate::proto;

impl Driver {
    pub(super) fn client(&mut self, session: SessionId, message: proto::ClientMessage) {
        if !self.sessions.contains_key(&session) {
            return;
        }
        let decoded = match convert::decode(message) {
            Ok(decoded) => decoded,
            Err(rejection) => return self.reject(session, rejection),
        };
        let Decoded { handle, lockspace, mut request, traceparent } = decoded;
        let mut lockspace_name = None;
        if let (Some(name), ClientRequest::Lock(lock)) = (lockspace, &mut request) {
            let Some(id) = self.node.lockspace_id(name.as_bytes()) else {
                return self.reject(session, admin::unknown_lockspace(handle, &name));
            };
            let Some(state) = self.sessions.get(&session) else { return };
            if let Err(message) = self.access.check(&state.credentials.identity, Right::Lock, &name) {
                return self.reject(session, Rejection::new(handle, RejectCode::PermissionDenied, message));
            }
            lock.lockspace = id;
            lockspace_name = self.lockspaces.get(&id).cloned();
        }
        let now = self.clock.now();
        let span = match (&request, &lockspace_name) {
            (ClientRequest::Lock(lock), Some(lockspace)) if self.config.lock_spans => {
                let pid = self.sessions.get(&session).and_then(|s| s.credentials.pid).unwrap_or(0);
                Some(self.observer.lock_span(session, pid, lockspace.text(), lock, traceparent.as_deref()))
            }
            _ => None,
        };
        let resource = match &request {
            ClientRequest::Lock(lock) => ResourceName::new(&lock.name),
            _ => ResourceName::new(b""),
        };
        let mode = match &request {
            ClientRequest::Lock(lock) => Some(lock.mode),
            ClientRequest::Convert(convert) => Some(convert.mode),
            _ => None,
        };
        match self.node.handle_client(self.clock.to_engine(now), session, request) {
            Ok(outcome) => {
                let queued = outcome == Outcome::Queued;
                let Some(state) = self.sessions.get_mut(&session) else { return };
                match (lockspace_name, mode) {
                    (Some(lockspace), Some(mode)) => {
                        // A new lock; its completion may already be queued.
                        let mut record = LockRecord::new(lockspace, resource, mode, Stamp::at(self.clock, now), span);
                        self.observer.lock_requested(&mut record, state.pid(), session, handle, queued);
                        state.locks.insert(handle, record);
                    }
                    (None, Some(mode)) => {
                        if let Some(record) = state.locks.get_mut(&handle) {
                            record.convert_requested(mode, Stamp::at(self.clock, now), queued);
                        }
                    }
                    _ => {}
                }
            }
            Err(error) => {
                let rejection = Rejection::from_engine(handle, &error);
                observe::span_rejected(&span, rejection.code);
                self.reject(session, rejection);
            }
        }
    }

    pub(super) fn reject(&mut self, session: SessionId, rejection: Rejection) {
        self.observer.rejected(rejection.code);
        self.deliver(session, rejection.into_message());
    }
}
