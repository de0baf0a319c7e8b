//! A harness for the roles' exact-effects tests: one node of a three-node
//! cluster, driven by hand (its peers are played by the test, which feeds
//! their messages in and reads what the node sends and tells its clients).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::{ClusterConfig, ClusterNode, Envelope, Member, Membership, NodeId, Outcome, PeerMessage};
use crate::effect::{Completion, Effect, Op, Status};
use crate::flags::{LockFlags, StatusFlags, UnlockFlags};
use crate::ids::{FencingToken, LockHandle, LockspaceId, SessionId};
use crate::lockspace::LockspaceConfig;
use crate::mode::Mode;
use crate::request::{ClientRequest, LockRequest, UnlockRequest};
use crate::time::Instant;

pub(super) const LOCKSPACE: &[u8] = b"ls";
pub(super) const RELEASE_DELAY: Duration = Duration::from_millis(10);

pub(super) struct Harness {
    pub(super) node: ClusterNode,
    pub(super) lockspace: LockspaceId,
    pub(super) now: Instant,
    /// The next sequence number each peer numbers its messages with.
    next_seq: BTreeMap<NodeId, u64>,
}

impl Harness {
    /// Node `me` of members 1, 2 and 3, with sessions 1 and 2 of its own open.
    pub(super) fn new(me: u16) -> Harness {
        let members = (1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect();
        let mut config = ClusterConfig::new(NodeId(me), Membership::new(members, 1).expect("members"));
        config.release_delay = RELEASE_DELAY;
        let mut node = ClusterNode::new(config).expect("node");
        let lockspace = node.create_lockspace(LOCKSPACE, LockspaceConfig::default()).expect("lockspace");
        for serial in 1..=2 {
            node.open_session(NodeId(me).session(serial)).expect("session");
        }
        Harness { node, lockspace, now: Instant::ZERO, next_seq: BTreeMap::new() }
    }

    /// This node's client session `serial`.
    pub(super) fn session(&self, serial: u64) -> SessionId {
        self.node.id().session(serial)
    }

    /// A resource name whose directory node is `directory`.
    pub(super) fn name_with_directory(&self, directory: u16) -> Vec<u8> {
        let membership = &self.node.config().membership;
        (0..)
            .map(|i| format!("r{i}").into_bytes())
            .find(|name| membership.directory(LOCKSPACE, name) == NodeId(directory))
            .expect("some name hashes to every member")
    }

    /// A new lock of one of this node's clients.
    pub(super) fn lock(&mut self, serial: u64, handle: u64, name: &[u8], mode: Mode) -> Outcome {
        let request = self.request(handle, name, mode);
        let session = self.session(serial);
        self.node.handle_client(self.now, session, ClientRequest::Lock(request)).expect("accepted")
    }

    /// A client's unlock.
    pub(super) fn unlock(&mut self, serial: u64, handle: u64) {
        let request = UnlockRequest { handle: LockHandle(handle), flags: UnlockFlags::EMPTY, lvb: None };
        let session = self.session(serial);
        let _ = self.node.handle_client(self.now, session, ClientRequest::Unlock(request)).expect("accepted");
    }

    /// A lock request as a client (of any node) would make it.
    pub(super) fn request(&self, handle: u64, name: &[u8], mode: Mode) -> LockRequest {
        LockRequest {
            handle: LockHandle(handle),
            lockspace: self.lockspace,
            name: name.to_vec(),
            mode,
            flags: LockFlags::EMPTY,
            timeout: None,
        }
    }

    /// A message from a peer, numbered as its link would number it.
    pub(super) fn deliver(&mut self, from: u16, message: PeerMessage) {
        let seq = self.next_seq.entry(NodeId(from)).or_insert(1);
        let envelope = Envelope { epoch: 1, seq: *seq, ack: 0, message: Some(message) };
        *seq += 1;
        self.node.handle_peer(self.now, NodeId(from), envelope).expect("a valid message");
    }

    /// The messages the node sent since the last call (bare acknowledgements left out).
    pub(super) fn sent(&mut self) -> Vec<(NodeId, PeerMessage)> {
        std::iter::from_fn(|| self.node.poll_transmit())
            .filter_map(|(to, envelope)| envelope.message.map(|message| (to, message)))
            .collect()
    }

    /// The effects for the node's clients since the last call.
    pub(super) fn effects(&mut self) -> Vec<Effect> {
        std::iter::from_fn(|| self.node.poll_effect()).collect()
    }

    /// Lets time pass to `at` and runs the timers then due.
    pub(super) fn advance_to(&mut self, at: Instant) {
        self.now = at;
        self.node.handle_timeout(at);
    }
}

/// The completion of a grant.
pub(super) fn granted(session: SessionId, handle: u64, op: Op, mode: Mode, token: u64) -> Completion {
    Completion {
        session,
        handle: LockHandle(handle),
        op,
        status: Status::Granted,
        mode: Some(mode),
        token: Some(FencingToken(token)),
        lvb: None,
        flags: StatusFlags::EMPTY,
    }
}

/// The completion of a request that ended without a grant.
pub(super) fn ended(session: SessionId, handle: u64, op: Op, status: Status) -> Completion {
    crate::cluster::ended(session, LockHandle(handle), op, status, None)
}

/// A peer's request for a new lock, as it travels.
pub(super) fn request_message(session: SessionId, handle: u64, name: &[u8], mode: Mode) -> PeerMessage {
    PeerMessage::Request {
        lockspace: LOCKSPACE.to_vec(),
        session,
        handle: LockHandle(handle),
        name: name.to_vec(),
        mode,
        flags: LockFlags::EMPTY,
        timeout: None,
    }
}

/// The directory's answer naming a master.
pub(super) fn lookup_reply(name: &[u8], master: u16, term: u64, token_floor: u64) -> PeerMessage {
    PeerMessage::LookupReply {
        lockspace: LOCKSPACE.to_vec(),
        name: name.to_vec(),
        master: Some(NodeId(master)),
        term,
        token_floor,
    }
}
