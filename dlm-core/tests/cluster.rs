//! The cluster protocol's races, each played out deterministically with the
//! messages delivered in the order that makes the race happen.

use std::time::Duration;

use dlm_core::cluster::{ClusterConfig, ClusterNode, Envelope, Member, Membership, NodeId, PeerMessage};
use dlm_core::{
    ClientRequest, Effect, Instant, LockFlags, LockHandle, LockRequest, LockspaceConfig, Mode, Status, UnlockFlags,
    UnlockRequest,
};

const RELEASE: Duration = Duration::from_millis(10);

struct Net {
    nodes: Vec<ClusterNode>,
    /// In flight: (from, to, envelope), in send order.
    wire: Vec<(NodeId, NodeId, Envelope)>,
    now: Instant,
    effects: Vec<(usize, Effect)>,
}

impl Net {
    fn new() -> Net {
        let membership =
            Membership::new((1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect(), 1).expect("members");
        let nodes = (1..=3)
            .map(|id| {
                let mut config = ClusterConfig::new(NodeId(id), membership.clone());
                config.release_delay = RELEASE;
                let mut node = ClusterNode::new(config).expect("node");
                node.create_lockspace(b"ls", LockspaceConfig::default()).expect("lockspace");
                node.open_session(NodeId(id).session(1)).expect("session");
                node
            })
            .collect();
        Net { nodes, wire: Vec::new(), now: Instant::ZERO, effects: Vec::new() }
    }

    /// A resource name whose directory is node `dir`.
    fn name_with_directory(&self, dir: u16) -> Vec<u8> {
        let membership = &self.nodes[0].config().membership;
        (0..)
            .map(|i| format!("r{i}").into_bytes())
            .find(|n| membership.directory(b"ls", n) == NodeId(dir))
            .expect("a name")
    }

    fn collect(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            while let Some((to, envelope)) = node.poll_transmit() {
                if envelope.message.is_some() {
                    self.wire.push((NodeId(i as u16 + 1), to, envelope));
                }
            }
            while let Some(effect) = node.poll_effect() {
                self.effects.push((i + 1, effect));
            }
        }
    }

    fn lock(&mut self, node: u16, handle: u64, name: &[u8], mode: Mode) {
        let n = &mut self.nodes[usize::from(node) - 1];
        let lockspace = n.lockspace_id(b"ls").expect("ls");
        let request = LockRequest {
            handle: LockHandle(handle),
            lockspace,
            name: name.to_vec(),
            mode,
            flags: LockFlags::EMPTY,
            timeout: None,
        };
        n.handle_client(self.now, NodeId(node).session(1), ClientRequest::Lock(request)).expect("accepted");
        self.collect();
    }

    fn unlock(&mut self, node: u16, handle: u64) {
        let request = UnlockRequest { handle: LockHandle(handle), flags: UnlockFlags::EMPTY, lvb: None };
        let n = &mut self.nodes[usize::from(node) - 1];
        n.handle_client(self.now, NodeId(node).session(1), ClientRequest::Unlock(request)).expect("accepted");
        self.collect();
    }

    /// Delivers the first message in flight that matches.
    fn deliver_first(&mut self, matches: impl Fn(NodeId, NodeId, &PeerMessage) -> bool) {
        let at = self
            .wire
            .iter()
            .position(|(from, to, e)| matches(*from, *to, e.message.as_ref().expect("numbered")))
            .expect("such a message is in flight");
        let (from, to, envelope) = self.wire.remove(at);
        self.nodes[usize::from(to.0) - 1].handle_peer(self.now, from, envelope).expect("valid");
        self.collect();
    }

    fn deliver_all(&mut self) {
        while !self.wire.is_empty() {
            let (from, to, envelope) = self.wire.remove(0);
            self.nodes[usize::from(to.0) - 1].handle_peer(self.now, from, envelope).expect("valid");
            self.collect();
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now.saturating_add(by);
        for node in &mut self.nodes {
            node.handle_timeout(self.now);
        }
        self.collect();
    }

    /// The completion of `handle` on `node`, taken out of the effects seen.
    fn completion(&mut self, node: usize, handle: u64) -> dlm_core::Completion {
        let at = self
            .effects
            .iter()
            .position(|(n, e)| *n == node && matches!(e, Effect::Complete(c) if c.handle == LockHandle(handle)))
            .unwrap_or_else(|| panic!("no completion of {handle} on node {node}: {:?}", self.effects));
        let (_, Effect::Complete(c)) = self.effects.remove(at) else { unreachable!() };
        c
    }

    fn masters(&self, name: &[u8]) -> Vec<usize> {
        (0..3)
            .filter(|&i| {
                let node = &self.nodes[i];
                node.engine().resource_exists(node.lockspace_id(b"ls").expect("ls"), name)
            })
            .map(|i| i + 1)
            .collect()
    }
}

/// Node 2 masters `name` (it locked it first); node 3 locks it through node
/// 2 and remembers node 2 as its master; then nobody holds it.
fn mastered_by_2_and_remembered_by_3(net: &mut Net, name: &[u8]) {
    net.lock(2, 1, name, Mode::Ex);
    net.deliver_all();
    net.lock(3, 1, name, Mode::Pr);
    net.deliver_all();
    net.unlock(2, 1);
    net.deliver_all();
    assert_eq!(net.completion(3, 1).status, Status::Granted);
    net.unlock(3, 1);
    net.deliver_all();
    assert_eq!(net.masters(name), Vec::<usize>::new());
}

fn is_lookup(m: &PeerMessage) -> bool {
    matches!(m, PeerMessage::Lookup { .. })
}

#[test]
fn two_nodes_looking_up_a_new_resource_at_once_get_one_master() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    net.lock(2, 1, &name, Mode::Ex);
    net.lock(3, 1, &name, Mode::Ex);
    // Both lookups reach the directory before either answer leaves.
    net.deliver_first(|_, to, m| to == NodeId(1) && is_lookup(m));
    net.deliver_first(|_, to, m| to == NodeId(1) && is_lookup(m));
    // Node 3's answer (master: node 2) and then its request reach node 2
    // before node 2 has heard that it is the master: node 2 holds the request.
    net.deliver_first(|_, to, _| to == NodeId(3));
    net.deliver_first(|from, to, m| from == NodeId(3) && to == NodeId(2) && matches!(m, PeerMessage::Request { .. }));
    net.deliver_all();
    assert_eq!(net.completion(2, 1).status, Status::Granted);
    assert_eq!(net.masters(&name), vec![2]);
    // Node 3 waits behind node 2's EX lock, on node 2.
    net.unlock(2, 1);
    net.deliver_all();
    let granted = net.completion(3, 1);
    assert_eq!(granted.status, Status::Granted);
    assert_eq!(net.masters(&name), vec![2]);
}

#[test]
fn a_stale_remembered_master_sends_the_request_back_to_the_directory() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    mastered_by_2_and_remembered_by_3(&mut net, &name);
    // Node 2 releases the idle resource and the directory forgets it; node 3
    // still remembers node 2 as its master.
    net.advance(RELEASE * 2);
    net.deliver_all();
    assert_eq!(net.nodes[0].directory_count(), 0);
    net.lock(3, 2, &name, Mode::Ex);
    net.deliver_all();
    assert_eq!(net.completion(3, 2).status, Status::Granted);
    assert_eq!(net.nodes[2].stats().stale_masters, 1, "the request went to the stale master first");
    assert_eq!(net.masters(&name), vec![3]);
}

#[test]
fn a_removal_crossing_a_new_request_is_waited_for_by_the_directory() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    mastered_by_2_and_remembered_by_3(&mut net, &name);
    // Node 2 lets the resource go: its Remove to the directory is in flight…
    net.advance(RELEASE * 2);
    assert!(net.wire.iter().any(|(_, _, e)| matches!(e.message, Some(PeerMessage::Remove { .. }))));
    // …when node 3 asks node 2 (remembered master), hears "not master", and
    // asks the directory, naming node 2's mastership as stale.
    net.lock(3, 2, &name, Mode::Ex);
    net.deliver_first(|_, to, m| to == NodeId(2) && matches!(m, PeerMessage::Request { .. }));
    net.deliver_first(|_, to, m| to == NodeId(3) && matches!(m, PeerMessage::NotMaster { .. }));
    // The directory gets the lookup before the removal: it must not answer
    // "node 2" again, nor make anyone master before the removal arrives.
    net.deliver_first(|_, to, m| to == NodeId(1) && matches!(m, PeerMessage::Lookup { stale: Some(_), .. }));
    assert!(!net.wire.iter().any(|(_, _, e)| matches!(e.message, Some(PeerMessage::LookupReply { .. }))));
    net.deliver_all();
    assert_eq!(net.completion(3, 2).status, Status::Granted);
    assert_eq!(net.masters(&name), vec![3]);
    // Tokens went on growing across the three masterships.
    assert!(net.nodes[2].engine().last_token(net.nodes[2].lockspace_id(b"ls").unwrap()).unwrap() >= 3);
}

#[test]
fn a_lookup_answer_is_not_taken_by_a_reused_handle() {
    let mut net = Net::new();
    let a = net.name_with_directory(1);
    let b = net.name_with_directory(2);
    // Node 2 masters b and keeps it.
    net.lock(2, 1, &b, Mode::Ex);
    net.deliver_all();
    net.completion(2, 1);
    // Node 3 asks for a; before the directory answers, the client cancels
    // and reuses the handle for b (mastered on node 2).
    net.lock(3, 1, &a, Mode::Ex);
    let n3 = &mut net.nodes[2];
    n3.handle_client(net.now, NodeId(3).session(1), ClientRequest::Cancel { handle: LockHandle(1) }).expect("cancel");
    net.collect();
    assert_eq!(net.completion(3, 1).status, Status::Cancelled);
    net.lock(3, 1, &b, Mode::Pr);
    // The answer for a (node 3 is its master now) must not run b's request here.
    net.deliver_first(|_, to, m| to == NodeId(1) && is_lookup(m));
    net.deliver_first(|from, to, m| {
        from == NodeId(1) && to == NodeId(3) && matches!(m, PeerMessage::LookupReply { .. })
    });
    assert_eq!(net.masters(&b), vec![2], "b must stay mastered on node 2 only");
    net.unlock(2, 1);
    net.deliver_all();
    assert_eq!(net.completion(3, 1).status, Status::Granted);
    assert_eq!(net.masters(&b), vec![2]);
}

/// A lockspace made only on the members whose clients use it (as libdlm's
/// `dlm_new_lockspace` makes one): node 2, never asked to make it, is the
/// directory of a resource in it and makes it when asked; nodes 1 and 3
/// coordinate through it as in any lockspace.
#[test]
fn a_lockspace_made_on_some_members_works_when_its_directory_is_another() {
    let mut net = Net::new();
    for node in [0, 2] {
        net.nodes[node].create_lockspace(b"vg", LockspaceConfig::default()).expect("vg");
    }
    assert!(net.nodes[1].lockspace_id(b"vg").is_none(), "node 2 never made it");
    let membership = net.nodes[0].config().membership.clone();
    let name = (0..)
        .map(|i| format!("lv{i}").into_bytes())
        .find(|n| membership.directory(b"vg", n) == NodeId(2))
        .expect("a name");
    let lock = |net: &mut Net, node: u16, handle: u64, mode: Mode| {
        let n = &mut net.nodes[usize::from(node) - 1];
        let lockspace = n.lockspace_id(b"vg").expect("vg");
        let request = LockRequest {
            handle: LockHandle(handle),
            lockspace,
            name: name.clone(),
            mode,
            flags: LockFlags::EMPTY,
            timeout: None,
        };
        n.handle_client(net.now, NodeId(node).session(1), ClientRequest::Lock(request)).expect("accepted");
        net.collect();
    };
    lock(&mut net, 1, 10, Mode::Ex);
    net.deliver_all();
    assert_eq!(net.completion(1, 10).status, Status::Granted);
    assert!(net.nodes[1].lockspace_id(b"vg").is_some(), "node 2 made it when asked as the directory");
    lock(&mut net, 3, 30, Mode::Pr);
    net.deliver_all();
    assert!(
        !net.effects.iter().any(|(n, e)| *n == 3 && matches!(e, Effect::Complete(_))),
        "node 3 waits for node 1's EX: {:?}",
        net.effects
    );
    net.unlock(1, 10);
    net.deliver_all();
    assert_eq!(net.completion(3, 30).status, Status::Granted);
}
