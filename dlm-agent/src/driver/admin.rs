//! The admin commands: status, lockspaces (which also refresh the gauges),
//! dumps, lockspace creation and release, and the shutdown.

use dlm_core::cluster::NodeId;
use dlm_core::{DumpCursor, LockspaceConfig, PageBounds, SessionId};

use super::observe::evidence_to_wire;
use super::{Driver, LockspaceRef, SessionState};
use crate::bounds::{DUMP_LOCKS_MAX, DUMP_RESOURCES_DEFAULT, DUMP_RESOURCES_MAX};
use crate::codes::{RejectCode, SessionEnd};
use crate::command::Command;
use crate::convert::{self, Rejection};
use crate::proto;

impl Driver {
    /// The node answers every pending request (cancelled) and revokes every
    /// lock (see `ClusterNode::shutdown`); the clients hear why, then every
    /// session ends.
    pub(super) fn shutdown(&mut self, queued: &mut tokio::sync::mpsc::Receiver<Command>) {
        self.stopping = true;
        self.node.shutdown(self.clock.engine_now());
        self.route_effects();
        while let Ok(command) = queued.try_recv() {
            match command {
                Command::Client { session, message } => {
                    self.deliver(session, convert::shutting_down(convert::handle_of(&message)))
                }
                Command::Open { reply, .. } => {
                    let _ = reply.send(Err(Rejection::new(0, RejectCode::ShuttingDown, "the agent is shutting down")));
                }
                Command::Shutdown { reply } => {
                    let _ = reply.send(());
                }
                other => self.handle(other),
            }
        }
        self.route_effects();
        let mut sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        sessions.sort_unstable();
        for session in sessions {
            self.end_session(session, SessionEnd::Shutdown);
        }
        self.flush_sessions();
        // Other nodes' masters hear that these sessions ended.
        self.transmit();
    }

    pub(super) fn status(&self) -> proto::StatusReply {
        let lockspaces = self.node.lockspaces();
        let mut reply = proto::StatusReply {
            node: self.config.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: u64::try_from(self.clock.now().saturating_duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX),
            sessions: u32::try_from(self.node.session_count()).unwrap_or(u32::MAX),
            lockspaces: u32::try_from(lockspaces.len()).unwrap_or(u32::MAX),
            locks: lockspaces.iter().map(|ls| u64::from(ls.locks)).sum(),
            waiting: lockspaces.iter().map(|ls| u64::from(ls.waiting)).sum(),
            ebpf: self.observer.evidence.enabled(),
            cluster: self.config.cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            node_id: u32::from(self.node_id.0),
            peers: self
                .config
                .cluster
                .iter()
                .flat_map(|c| &c.members)
                .filter(|m| m.id != self.node_id.0)
                .map(|m| {
                    let (up, unacked) = self.node.link_state(NodeId(m.id)).unwrap_or((false, 0));
                    proto::PeerStatus {
                        node_id: u32::from(m.id),
                        address: m.address.to_string(),
                        up,
                        unacked: unacked as u64,
                        pressure: None,
                    }
                })
                .collect(),
            mastered: self.node.mastered_count() as u64,
            directory_entries: self.node.directory_count() as u64,
            remote_locks: self.node.remote_lock_count() as u64,
            ..proto::StatusReply::default()
        };
        self.membership_status(&mut reply);
        self.pressure_status(&mut reply);
        reply
    }

    pub(super) fn lockspaces(&mut self) -> proto::LockspacesReply {
        self.observer.update_cluster(&self.node);
        let metrics = &self.observer.metrics;
        let lockspaces = self
            .node
            .lockspaces()
            .into_iter()
            .map(|ls| {
                let name = String::from_utf8_lossy(&ls.name).into_owned();
                metrics.granted.with_label_values(&[&name]).set(i64::from(ls.locks - ls.waiting));
                metrics.waiting.with_label_values(&[&name]).set(i64::from(ls.waiting));
                metrics.resources.with_label_values(&[&name]).set(i64::from(ls.resources));
                proto::LockspaceInfo {
                    name,
                    lvb_len: u32::try_from(ls.config.lvb_len).unwrap_or(u32::MAX),
                    resources: ls.resources,
                    locks: ls.locks,
                    waiting: ls.waiting,
                }
            })
            .collect();
        proto::LockspacesReply { lockspaces }
    }

    /// One page of a dump: built within its bounds, so that a resource with
    /// a million locks holds the engine up for a page at a time.
    pub(super) fn dump(&self, request: &proto::DumpRequest) -> Result<proto::DumpReply, Rejection> {
        let id = self
            .node
            .lockspace_id(request.lockspace.as_bytes())
            .ok_or_else(|| unknown_lockspace(0, &request.lockspace))?;
        let from = match request.page_token.as_slice() {
            [] => None,
            token => Some(DumpCursor::from_bytes(token).ok_or_else(|| {
                Rejection::new(0, RejectCode::InvalidPageToken, "page_token is not one this agent gave")
            })?),
        };
        let bounds = PageBounds {
            resources: match request.max_resources {
                0 => DUMP_RESOURCES_DEFAULT,
                n => (n as usize).min(DUMP_RESOURCES_MAX),
            },
            locks: match request.max_locks {
                0 => DUMP_LOCKS_MAX,
                n => (n as usize).min(DUMP_LOCKS_MAX),
            },
        };
        let page = self
            .node
            .dump_page(id, request.name.as_deref(), from.as_ref(), bounds)
            .map_err(|e| Rejection::from_engine(0, &e))?;
        let now = self.clock.now();
        let evidence = &self.observer.evidence;
        let lock = |info: &dlm_core::LockInfo| {
            // An orphan's session is gone (its id may even be reused).
            let state = if info.orphan { None } else { self.sessions.get(&info.session) };
            let credentials = state.map(|s| s.credentials.clone()).unwrap_or_default();
            let known = state.and_then(|s| s.locks.get(&info.handle.0));
            let phase_start = known.and_then(|k| k.phase_start(info.granted.is_some()));
            let attribution =
                known.and_then(|k| k.mark()).and_then(|mark| evidence.since(state.and_then(SessionState::pid), mark));
            proto::LockInfo {
                session: info.session.0,
                handle: info.handle.0,
                pid: credentials.pid.unwrap_or(0),
                uid: credentials.uid(),
                orphan: info.orphan,
                granted: info.granted.map(convert::mode_to_wire),
                requested: info.requested.map(convert::mode_to_wire),
                fencing_token: info.token.map_or(0, |t| t.0),
                flags: info.flags.bits(),
                phase_ms: phase_start
                    .map_or(0, |at| u64::try_from(at.until(self.clock, now).as_millis()).unwrap_or(u64::MAX)),
                attribution: attribution.as_ref().map(evidence_to_wire),
            }
        };
        Ok(proto::DumpReply {
            next_page_token: page.next.map(|c| c.to_bytes()).unwrap_or_default(),
            resources: page
                .resources
                .iter()
                .map(|r| proto::ResourceInfo {
                    name: r.name.clone(),
                    lvb: r.lvb.clone(),
                    lvb_valid: r.lvb_valid,
                    last_token: r.last_token.0,
                    granted: r.granted.iter().map(lock).collect(),
                    converting: r.converting.iter().map(lock).collect(),
                    waiting: r.waiting.iter().map(lock).collect(),
                    continued: r.continued,
                })
                .collect(),
        })
    }

    pub(super) fn create_lockspace(&mut self, name: &str, mut config: LockspaceConfig) -> Result<(), Rejection> {
        if config.lvb_len == 0 {
            config.lvb_len = dlm_core::LVB_LEN_DEFAULT;
        }
        let id = match self.node.lockspace_id(name.as_bytes()) {
            // Made when a peer asked this node about it (as its resources'
            // directory or master): this node's clients make it theirs now.
            Some(id) if !self.lockspaces.contains_key(&id) => id,
            _ => self.node.create_lockspace(name.as_bytes(), config).map_err(|e| Rejection::from_engine(0, &e))?,
        };
        let series = self.observer.metrics.add_lockspace(name);
        self.lockspaces.insert(id, LockspaceRef::new(name, series));
        Ok(())
    }

    pub(super) fn release_lockspace(&mut self, name: &str, force: bool) -> Result<(), Rejection> {
        let id = self.node.lockspace_id(name.as_bytes()).ok_or_else(|| unknown_lockspace(0, name))?;
        self.node.release_lockspace(self.clock.engine_now(), id, force).map_err(|e| Rejection::from_engine(0, &e))?;
        self.lockspaces.remove(&id);
        self.observer.metrics.remove_lockspace(name);
        Ok(())
    }
}

/// The refusal of a request (`handle`, 0 for none) that names no lockspace.
pub(super) fn unknown_lockspace(handle: u64, name: &str) -> Rejection {
    Rejection::new(handle, RejectCode::UnknownLockspace, format!("no lockspace named {name:?}"))
}
