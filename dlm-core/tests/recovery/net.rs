//! The harness of recovery's race tests: five nodes driven by hand, a
//! wire that the test delivers from, crashes, restarts and views.

use std::time::Duration;

use dlm_core::cluster::{
    ClusterConfig, ClusterNode, Envelope, Member, Membership, NodeId, PeerMessage, View, ViewMember,
};
use dlm_core::{
    ClientRequest, Completion, ConvertRequest, Effect, Instant, LockFlags, LockHandle, LockRequest, LockspaceConfig,
    Mode, Status, UnlockFlags, UnlockRequest,
};

pub const NODES: u16 = 5;
pub const LVB_LEN: usize = 8;

pub struct Net {
    pub nodes: Vec<ClusterNode>,
    pub alive: Vec<bool>,
    /// In flight: (from, to, envelope), in send order.
    pub wire: Vec<(NodeId, NodeId, Envelope)>,
    pub now: Instant,
    pub effects: Vec<(u16, Effect)>,
    pub epoch: u64,
    pub incarnations: Vec<u64>,
    pub lockspace: LockspaceConfig,
}

impl Net {
    /// Five nodes without lock-delay: the race tests look at what recovery
    /// rebuilds, and lock-delay (tested on its own) would only postpone grants.
    pub fn new() -> Net {
        Net::with_lock_delay(Duration::ZERO)
    }

    pub fn with_lock_delay(lock_delay: Duration) -> Net {
        let lockspace = LockspaceConfig { lvb_len: LVB_LEN, lock_delay };
        let members = (1..=NODES).map(|id| Member { id: NodeId(id), weight: 1 }).collect();
        let membership = Membership::new(members, 1).expect("members");
        let nodes = (1..=NODES)
            .map(|id| {
                let mut node = ClusterNode::new(ClusterConfig::new(NodeId(id), membership.clone())).expect("node");
                node.create_lockspace(b"ls", lockspace).expect("lockspace");
                node.open_session(NodeId(id).session(1)).expect("session");
                node
            })
            .collect();
        Net {
            nodes,
            alive: vec![true; usize::from(NODES)],
            wire: Vec::new(),
            now: Instant::ZERO,
            effects: Vec::new(),
            epoch: 1,
            incarnations: vec![1; usize::from(NODES)],
            lockspace,
        }
    }

    pub fn node(&mut self, id: u16) -> &mut ClusterNode {
        &mut self.nodes[usize::from(id) - 1]
    }

    /// A resource name whose directory (among all five) is `dir`.
    pub fn name_with_directory(&self, dir: u16) -> Vec<u8> {
        let membership = &self.nodes[0].config().membership;
        (0..)
            .map(|i| format!("r{i}").into_bytes())
            .find(|n| membership.directory(b"ls", n) == NodeId(dir))
            .expect("a name")
    }

    pub fn collect(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let id = i as u16 + 1;
            while let Some((to, envelope)) = node.poll_transmit() {
                if envelope.message.is_some() && self.alive[i] {
                    self.wire.push((NodeId(id), to, envelope));
                }
            }
            while let Some(effect) = node.poll_effect() {
                if self.alive[i] {
                    self.effects.push((id, effect));
                }
            }
        }
    }

    pub fn client(&mut self, node: u16, request: ClientRequest) {
        let now = self.now;
        self.node(node).handle_client(now, NodeId(node).session(1), request).expect("accepted");
        self.collect();
    }

    pub fn lock_with(&mut self, node: u16, handle: u64, name: &[u8], mode: Mode, flags: LockFlags) {
        let lockspace = self.node(node).lockspace_id(b"ls").expect("ls");
        let request =
            LockRequest { handle: LockHandle(handle), lockspace, name: name.to_vec(), mode, flags, timeout: None };
        self.client(node, ClientRequest::Lock(request));
    }

    pub fn lock(&mut self, node: u16, handle: u64, name: &[u8], mode: Mode) {
        self.lock_with(node, handle, name, mode, LockFlags::EMPTY);
    }

    pub fn convert(&mut self, node: u16, handle: u64, mode: Mode) {
        let request =
            ConvertRequest { handle: LockHandle(handle), mode, flags: LockFlags::EMPTY, timeout: None, lvb: None };
        self.client(node, ClientRequest::Convert(request));
    }

    pub fn unlock_with(&mut self, node: u16, handle: u64, lvb: Option<Vec<u8>>) {
        let flags = if lvb.is_some() { UnlockFlags::VALBLK } else { UnlockFlags::EMPTY };
        let request = UnlockRequest { handle: LockHandle(handle), flags, lvb };
        self.client(node, ClientRequest::Unlock(request));
    }

    pub fn unlock(&mut self, node: u16, handle: u64) {
        self.unlock_with(node, handle, None);
    }

    /// Delivers the first message in flight that matches.
    pub fn deliver_first(&mut self, matches: impl Fn(NodeId, NodeId, &PeerMessage) -> bool) {
        let at = self
            .wire
            .iter()
            .position(|(from, to, e)| matches(*from, *to, e.message.as_ref().expect("numbered")))
            .expect("such a message is in flight");
        let (from, to, envelope) = self.wire.remove(at);
        self.deliver(from, to, envelope);
    }

    pub fn deliver(&mut self, from: NodeId, to: NodeId, envelope: Envelope) {
        if self.alive[usize::from(to.0) - 1] {
            let now = self.now;
            self.node(to.0).handle_peer(now, from, envelope).expect("valid");
        }
        self.collect();
    }

    /// Delivers everything in flight, in order, until nothing is left.
    pub fn deliver_all(&mut self) {
        let mut steps = 0;
        while !self.wire.is_empty() {
            let (from, to, envelope) = self.wire.remove(0);
            self.deliver(from, to, envelope);
            steps += 1;
            assert!(steps < 100_000, "messages never stop");
        }
    }

    pub fn advance(&mut self, by: Duration) {
        self.now = self.now.saturating_add(by);
        for node in &mut self.nodes {
            node.handle_timeout(self.now);
        }
        self.collect();
    }

    /// Node `id` crashes: its state is gone and nothing it sent is delivered.
    pub fn crash(&mut self, id: u16) {
        self.alive[usize::from(id) - 1] = false;
        self.wire.retain(|(from, to, _)| from.0 != id && to.0 != id);
        self.effects.retain(|(n, _)| *n != id);
    }

    /// Node `id` starts again with no state (it joins in the next view).
    pub fn restart(&mut self, id: u16) {
        let members = (1..=NODES).map(|id| Member { id: NodeId(id), weight: 1 }).collect();
        let config = ClusterConfig::new(NodeId(id), Membership::new(members, 0).expect("members"));
        let mut node = ClusterNode::new(config).expect("node");
        node.create_lockspace(b"ls", self.lockspace).expect("lockspace");
        node.open_session(NodeId(id).session(1)).expect("session");
        self.nodes[usize::from(id) - 1] = node;
        self.alive[usize::from(id) - 1] = true;
        self.incarnations[usize::from(id) - 1] += 1;
    }

    /// The view of the nodes alive, handed to each of them.
    pub fn view(&mut self, quorate: bool) -> View {
        self.epoch += 1;
        let members = (1..=NODES)
            .filter(|&id| self.alive[usize::from(id) - 1])
            .map(|id| ViewMember { id: NodeId(id), weight: 1, incarnation: self.incarnations[usize::from(id) - 1] })
            .collect();
        View { epoch: self.epoch, members, quorate }
    }

    pub fn hand_view(&mut self, view: &View) {
        let now = self.now;
        for id in view.members.iter().map(|m| m.id.0).collect::<Vec<_>>() {
            self.node(id).handle_view(now, view, |_| true).expect("a later view");
        }
        self.collect();
    }

    /// A view without the crashed nodes, recovery run to the end.
    pub fn recover(&mut self) {
        let view = self.view(true);
        self.hand_view(&view);
        self.deliver_all();
        for id in view.members.iter().map(|m| m.id.0) {
            assert_eq!(self.node(id).recovery_status(), None, "node {id} is still recovering");
        }
    }

    /// The completions of `handle` on `node` seen so far, taken out.
    pub fn completions(&mut self, node: u16, handle: u64) -> Vec<Completion> {
        let mut found = Vec::new();
        self.effects.retain(|(n, e)| match e {
            Effect::Complete(c) if *n == node && c.handle == LockHandle(handle) => {
                found.push(c.clone());
                false
            }
            _ => true,
        });
        found
    }

    /// The one completion of `handle` on `node`.
    pub fn completion(&mut self, node: u16, handle: u64) -> Completion {
        let mut found = self.completions(node, handle);
        assert_eq!(found.len(), 1, "completions of {handle} on node {node}: {found:?}");
        found.remove(0)
    }

    /// The nodes whose engine holds `name`.
    pub fn masters(&mut self, name: &[u8]) -> Vec<u16> {
        (1..=NODES)
            .filter(|&id| {
                let alive = self.alive[usize::from(id) - 1];
                let node = self.node(id);
                alive && node.engine().resource_exists(node.lockspace_id(b"ls").expect("ls"), name)
            })
            .collect()
    }

    /// A granted lock's mode and token as its node's copy says.
    pub fn held(&mut self, node: u16, handle: u64) -> (Option<Mode>, Option<u64>) {
        let info = self.node(node).lock_info(NodeId(node).session(1), LockHandle(handle)).expect("the lock exists");
        (info.granted, info.token.map(|t| t.0))
    }
}

/// Node 2 masters `name` (its NL lock keeps the resource, and so its value
/// block), and node 3's client writes "old" to the value block under PW.
pub fn old_value_written(net: &mut Net, name: &[u8]) {
    net.lock_with(2, 1, name, Mode::Nl, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(2, 1);
    net.lock_with(3, 1, name, Mode::Pw, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(3, 1);
    net.unlock_with(3, 1, Some(b"old".to_vec()));
    net.deliver_all();
    net.completion(3, 1);
}

/// Delivers in order until node 3 sends its first word on its locks in
/// recovery (a `RecoverLock`, or the digest of the locks its masters keep),
/// which is then delivered (`deliver`) or lost with its epoch.
pub fn run_until_node_3_recovers_a_lock(net: &mut Net, deliver: bool) {
    loop {
        let (from, to, envelope) = net.wire.remove(0);
        let recovers = from.0 == 3
            && matches!(envelope.message, Some(PeerMessage::RecoverLock(_) | PeerMessage::RecoverDigest { .. }));
        if !recovers || deliver {
            net.deliver(from, to, envelope);
        }
        if recovers {
            return;
        }
    }
}

pub fn token(c: &Completion) -> u64 {
    c.token.expect("a grant has a token").0
}

pub fn is_grant(m: &PeerMessage) -> bool {
    matches!(m, PeerMessage::Complete(c) if c.status == Status::Granted)
}

/// Node 2 masters `name`: its client holds EX, under the token returned.
pub fn mastered_by_2(net: &mut Net, name: &[u8]) -> u64 {
    net.lock(2, 1, name, Mode::Ex);
    net.deliver_all();
    let c = net.completion(2, 1);
    assert_eq!(c.status, Status::Granted);
    assert_eq!(net.masters(name), vec![2]);
    token(&c)
}
