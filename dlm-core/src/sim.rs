//! A deterministic simulation of a cluster: several [`ClusterNode`]s over a
//! simulated network that delays, reorders and duplicates messages, with
//! clients making random requests, all driven from one seed. A failure
//! names its seed, so it replays exactly (`cargo xtask sim --seed N`).
//!
//! With link faults on (every other seed in the test command), pairs of
//! nodes are cut off from each other now and then for a few milliseconds:
//! either the nodes are told (as a reset connection tells them) or not (a
//! silent partition, found by the acknowledgement timeout); messages in
//! flight between them are lost; links come back after the cut and resend.
//! Requests that needed a cut-off node may then end as `Unavailable`.
//!
//! Clients also go away now and then (their session ends with whatever it
//! held or asked for) and come back with a new session, and they reuse lock
//! handles as soon as a lock is gone.
//!
//! What is checked, after every step:
//! - no resource is mastered by two nodes at once, and each master's queues
//!   hold only compatible granted modes (the engine's own invariant checks);
//! - fencing tokens of one resource only grow, across masters;
//! - a client is never told of a grant, blocking callback or completion for
//!   a lock it does not have, nor two completions for one request.
//!
//! At the end, clients stop asking and release what they hold: every request
//! must then complete (granted, refused, timed out, cancelled or chosen as a
//! deadlock victim) within a bounded simulated time, and every node must
//! have no lock left.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use crate::cluster::{ClusterConfig, ClusterNode, Envelope, Member, Membership, NodeId, PeerMessage};
use crate::effect::{Completion, Effect, Op, Status};
use crate::flags::{LockFlags, UnlockFlags};
use crate::ids::{LockHandle, SessionId};
use crate::lockspace::LockspaceConfig;
use crate::mode::{ALL_MODES, Mode};
use crate::request::{ClientRequest, ConvertRequest, LockRequest, UnlockRequest};
use crate::time::Instant;

/// A small, fast, seedable generator (SplitMix64): the simulation must not
/// depend on anything but its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    #[must_use]
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The shape of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Cluster members.
    pub nodes: u16,
    /// Client sessions per node.
    pub clients_per_node: u32,
    /// Distinct resource names.
    pub resources: u32,
    /// Requests the clients make in all, before the drain.
    pub requests: u32,
    /// Largest one-way network delay.
    pub max_delay: Duration,
    /// Percentage of messages delivered twice.
    pub duplicate_percent: u64,
    /// Cut links between nodes now and then (see the module docs).
    pub link_faults: bool,
    /// How long the drain may take before a request counts as hung.
    pub drain_limit: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 3,
            clients_per_node: 3,
            resources: 6,
            requests: 300,
            max_delay: Duration::from_micros(800),
            duplicate_percent: 5,
            link_faults: false,
            drain_limit: Duration::from_secs(120),
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Requests made.
    pub requests: u32,
    /// Grants seen by clients.
    pub grants: u32,
    /// Requests that ended as deadlock victims.
    pub deadlocks: u32,
    /// Requests that ended as unavailable (a node they needed was cut off).
    pub unavailable: u32,
    /// Messages lost to cut links.
    pub lost: u64,
    /// Messages delivered (duplicates included).
    pub messages: u64,
    /// Simulated time at the end.
    pub elapsed: Duration,
    /// A digest of everything the nodes produced, in order: every effect
    /// for a client and every envelope for the network. Two runs of one
    /// seed with the same digest behaved the same, step for step.
    pub trace: u64,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SimReport { requests, grants, deadlocks, unavailable, lost, messages, elapsed, trace } = self;
        write!(
            f,
            "requests {requests} grants {grants} deadlocks {deadlocks} unavailable {unavailable} lost {lost} \
             messages {messages} elapsed_ns {} trace {trace:016x}",
            elapsed.as_nanos()
        )
    }
}

/// FNV-1a over text: a digest that depends on nothing but the bytes fed to
/// it (not on a process's random hasher keys, nor on the Rust release).
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl std::fmt::Write for Digest {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        for byte in text.bytes() {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(())
    }
}

const LOCKSPACE: &[u8] = b"sim";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    /// A new lock's request is out.
    Requested,
    Granted(Mode),
    /// A conversion (or, with `unlocking`, an unlock) is out.
    Busy {
        held: Mode,
        unlocking: bool,
    },
    /// A new lock's request is out and the client force-unlocked it: the
    /// request ends (however) and then the unlock.
    ForceUnlocking,
}

struct Client {
    node: usize,
    session: SessionId,
    slots: Vec<(Slot, u32)>,
    next_handle: u64,
    /// Handle → slot index.
    handles: HashMap<u64, usize>,
    next_action: Instant,
}

#[derive(PartialEq, Eq)]
struct InFlight {
    at: Instant,
    order: u64,
    from: NodeId,
    to: NodeId,
    envelope: Envelope,
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: earliest first.
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One simulation.
pub struct Sim {
    config: SimConfig,
    rng: Rng,
    now: Instant,
    nodes: Vec<ClusterNode>,
    clients: Vec<Client>,
    network: BinaryHeap<InFlight>,
    order: u64,
    /// The largest fencing token seen per resource, and the node that issued it.
    last_token: HashMap<u32, (u64, usize)>,
    /// Each (resource, token) granted, and to which lock: a token is never handed out twice.
    seen_grants: HashMap<(u32, u64), (SessionId, LockHandle)>,
    /// (session, handle) → client and resource.
    owners: HashMap<(SessionId, LockHandle), (usize, u32)>,
    report: SimReport,
    draining: bool,
    /// Numbered messages already sent once: (node, peer, sequence number).
    transmitted: std::collections::HashSet<(usize, u16, u64)>,
    /// The last session serial handed out (sessions restart now and then).
    next_session: u64,
    /// Node pairs (0-based, smaller first) cut off until the given time.
    cuts: Vec<(usize, usize, Instant)>,
    /// When the network is next looked at for faults to start or end.
    next_fault_tick: Instant,
    /// What the nodes produced so far (see [`SimReport::trace`]).
    trace: Digest,
}

/// How often the network is looked at for faults to start or heal.
const FAULT_TICK: Duration = Duration::from_micros(500);

impl Sim {
    /// A simulation from a seed.
    ///
    /// # Panics
    /// The configuration cannot make a cluster (no node).
    #[must_use]
    pub fn new(seed: u64, config: SimConfig) -> Sim {
        let mut rng = Rng::new(seed);
        let members: Vec<Member> =
            (1..=config.nodes).map(|id| Member { id: NodeId(id), weight: 1 + rng.below(2) as u8 }).collect();
        let membership = Membership::new(members, 1).expect("valid members");
        let mut nodes = Vec::new();
        let mut clients = Vec::new();
        for n in 0..config.nodes {
            let mut cluster = ClusterConfig::new(NodeId(n + 1), membership.clone());
            cluster.release_delay = Duration::from_micros(200 + rng.below(3000));
            cluster.deadlock_interval = Duration::from_millis(5);
            cluster.ack_delay = Duration::from_micros(300);
            cluster.ack_timeout = Duration::from_millis(5);
            cluster.heartbeat_interval = Duration::from_millis(2);
            cluster.master_cache_max = 4;
            let mut node = ClusterNode::new(cluster).expect("valid cluster");
            node.create_lockspace(LOCKSPACE, LockspaceConfig { lvb_len: 8 }).expect("lockspace");
            for c in 0..config.clients_per_node {
                let session = NodeId(n + 1).session(u64::from(c) + 1);
                node.open_session(session).expect("session");
                clients.push(Client {
                    node: usize::from(n),
                    session,
                    slots: vec![(Slot::Empty, 0); 2],
                    next_handle: 1,
                    handles: HashMap::new(),
                    next_action: Instant::from_nanos(rng.below(1_000_000)),
                });
            }
            nodes.push(node);
        }
        Sim {
            config,
            rng,
            now: Instant::ZERO,
            nodes,
            clients,
            network: BinaryHeap::new(),
            order: 0,
            last_token: HashMap::new(),
            seen_grants: HashMap::new(),
            owners: HashMap::new(),
            report: SimReport::default(),
            draining: false,
            cuts: Vec::new(),
            next_fault_tick: Instant::ZERO,
            next_session: 1000,
            transmitted: std::collections::HashSet::new(),
            trace: Digest::new(),
        }
    }

    /// Runs to the end.
    ///
    /// # Errors
    /// The first violation found, with the simulated time.
    pub fn run(mut self) -> Result<SimReport, String> {
        let mut stalled = 0u32;
        loop {
            if !self.draining && self.report.requests >= self.config.requests {
                self.draining = true;
            }
            if self.draining && self.quiescent() {
                break;
            }
            let next_net = self.network.peek().map(|m| m.at);
            let next_client = self.clients.iter().map(|c| c.next_action).min();
            let next_timer = self.nodes.iter().filter_map(ClusterNode::poll_timeout).min();
            let next_fault = self.config.link_faults.then_some(self.next_fault_tick);
            let Some(at) = [next_net, next_client, next_timer, next_fault].into_iter().flatten().min() else { break };
            if at <= self.now {
                stalled += 1;
                if stalled > 1_000_000 {
                    return Err(format!("at {:?}: no progress (a timer that never clears?)", self.elapsed()));
                }
            } else {
                stalled = 0;
            }
            self.now = self.now.max(at);
            if self.now.as_nanos() > self.config.drain_limit.as_nanos() as u64 {
                return Err(format!("requests still pending at {:?}: {}", self.elapsed(), self.pending_summary()));
            }
            if next_fault == Some(at) {
                self.fault_tick()?;
            } else if next_net == Some(at) {
                let m = self.network.pop().expect("peeked");
                let to = usize::from(m.to.0 - 1);
                if self.is_cut(usize::from(m.from.0 - 1), to) {
                    self.report.lost += 1;
                    continue;
                }
                self.report.messages += 1;
                self.nodes[to]
                    .handle_peer(self.now, m.from, m.envelope)
                    .map_err(|e| format!("at {:?}: peer error {e}", self.elapsed()))?;
                self.after(to)?;
            } else if next_client == Some(at) {
                let c = self.clients.iter().position(|c| c.next_action == at).expect("found above");
                self.client_step(c)?;
            } else {
                for n in 0..self.nodes.len() {
                    if self.nodes[n].poll_timeout().is_some_and(|t| t <= self.now) {
                        self.nodes[n].handle_timeout(self.now);
                        self.after(n)?;
                    }
                }
            }
            self.check_masters()?;
        }
        for (n, node) in self.nodes.iter().enumerate() {
            node.check_invariants().map_err(|e| format!("node {}: {e}", n + 1))?;
            let locks: u32 = node.lockspaces().iter().map(|ls| ls.locks).sum();
            if locks != 0 || node.remote_lock_count() != 0 {
                return Err(format!(
                    "node {} still has {locks} locks and {} remote copies",
                    n + 1,
                    node.remote_lock_count()
                ));
            }
        }
        self.report.elapsed = self.elapsed();
        self.report.trace = self.trace.0;
        Ok(self.report)
    }

    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now.as_nanos())
    }

    fn quiescent(&self) -> bool {
        let links_settled = self
            .nodes
            .iter()
            .all(|node| node.peers().all(|peer| node.link_state(peer).is_some_and(|(up, unacked)| up && unacked == 0)));
        self.clients.iter().all(|c| c.slots.iter().all(|(s, _)| *s == Slot::Empty))
            && self.network.is_empty()
            && self.cuts.is_empty()
            && links_settled
    }

    fn is_cut(&self, a: usize, b: usize) -> bool {
        let (a, b) = (a.min(b), a.max(b));
        self.cuts.iter().any(|&(x, y, _)| (x, y) == (a, b))
    }

    /// Heals cuts that are over, starts new ones (not while draining), and
    /// reconnects links that are down across no cut.
    fn fault_tick(&mut self) -> Result<(), String> {
        self.next_fault_tick = self.now.saturating_add(FAULT_TICK);
        let now = self.now;
        self.cuts.retain(|&(_, _, until)| until > now);
        let n = self.nodes.len();
        if !self.draining && self.rng.chance(2) {
            let a = self.rng.below(n as u64) as usize;
            let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
            if !self.is_cut(a, b) {
                let until = now.saturating_add(Duration::from_micros(500 + self.rng.below(15_000)));
                self.cuts.push((a.min(b), a.max(b), until));
                if self.rng.chance(50) {
                    // A reset connection: both ends hear of it at once.
                    for (x, y) in [(a, b), (b, a)] {
                        self.nodes[x].handle_link(now, NodeId(y as u16 + 1), false);
                        self.after(x)?;
                    }
                }
            }
        }
        for x in 0..n {
            for y in 0..n {
                if x == y || self.is_cut(x, y) {
                    continue;
                }
                let peer = NodeId(y as u16 + 1);
                if self.nodes[x].link_state(peer).is_some_and(|(up, _)| !up) {
                    self.nodes[x].handle_link(now, peer, true);
                    self.after(x)?;
                }
            }
        }
        Ok(())
    }

    fn pending_summary(&self) -> String {
        let mut out = Vec::new();
        for c in &self.clients {
            for (slot, resource) in &c.slots {
                if *slot != Slot::Empty {
                    out.push(format!("{} r{resource} {slot:?}", c.session.0 >> 48));
                }
            }
        }
        out.join(", ")
    }

    fn client_step(&mut self, c: usize) -> Result<(), String> {
        let delay = 20_000 + self.rng.below(400_000);
        self.clients[c].next_action = if self.draining && self.clients[c].slots.iter().all(|(s, _)| *s == Slot::Empty) {
            Instant::from_nanos(u64::MAX)
        } else {
            self.now.saturating_add(Duration::from_nanos(delay))
        };
        if !self.draining && self.rng.chance(2) {
            return self.restart_session(c);
        }
        let s = self.rng.below(self.clients[c].slots.len() as u64) as usize;
        let (slot, _) = self.clients[c].slots[s];
        let session = self.clients[c].session;
        let node = self.clients[c].node;
        let request = match slot {
            Slot::Empty if !self.draining => {
                let resource = self.rng.below(u64::from(self.config.resources)) as u32;
                // A session waiting for its own lock is no deadlock (it can
                // release it), but this client would not: one lock per resource.
                if self.clients[c].slots.iter().any(|&(slot, r)| slot != Slot::Empty && r == resource) {
                    return Ok(());
                }
                // Clients reuse handles as soon as their lock is gone, half
                // the time: answers about the old lock must not land on the new one.
                let reuse = (1..=4).find(|h| !self.clients[c].handles.contains_key(h));
                let handle = match reuse {
                    Some(h) if self.rng.chance(50) => h,
                    _ => {
                        self.clients[c].next_handle += 1;
                        self.clients[c].next_handle + 4
                    }
                };
                let mode = ALL_MODES[self.rng.below(6) as usize];
                let mut flags = LockFlags::EMPTY;
                if self.rng.chance(15) {
                    flags.insert(LockFlags::NOQUEUE);
                }
                if self.rng.chance(30) {
                    flags.insert(LockFlags::VALBLK);
                }
                let timeout = self.rng.chance(20).then(|| Duration::from_micros(100 + self.rng.below(5000)));
                self.clients[c].slots[s] = (Slot::Requested, resource);
                self.clients[c].handles.insert(handle, s);
                self.owners.insert((session, LockHandle(handle)), (c, resource));
                self.report.requests += 1;
                ClientRequest::Lock(LockRequest {
                    handle: LockHandle(handle),
                    lockspace: self.nodes[node].lockspace_id(LOCKSPACE).expect("lockspace"),
                    name: format!("r{resource}").into_bytes(),
                    mode,
                    flags,
                    timeout,
                })
            }
            // Like most applications, a client waiting for one lock does
            // not let go of the others: only deadlock detection (or a
            // timeout) gets it out of a cycle.
            Slot::Granted(_) if self.clients[c].slots.iter().any(|(s, _)| is_waiting(*s)) => return Ok(()),
            Slot::Granted(held) => {
                let handle = self.handle_of(c, s);
                if self.draining || self.rng.chance(60) {
                    self.clients[c].slots[s].0 = Slot::Busy { held, unlocking: true };
                    let writes = matches!(held, Mode::Pw | Mode::Ex);
                    let (flags, lvb) = if writes && self.rng.chance(50) {
                        (UnlockFlags::VALBLK, Some(self.rng.next_u64().to_le_bytes().to_vec()))
                    } else {
                        (UnlockFlags::EMPTY, None)
                    };
                    ClientRequest::Unlock(UnlockRequest { handle, flags, lvb })
                } else {
                    let mode = ALL_MODES[self.rng.below(6) as usize];
                    let mut flags = LockFlags::EMPTY;
                    if self.rng.chance(20) {
                        flags.insert(LockFlags::NOQUEUE);
                    } else if self.rng.chance(30) {
                        flags.insert(LockFlags::CONVDEADLK);
                    }
                    let timeout = self.rng.chance(20).then(|| Duration::from_micros(100 + self.rng.below(5000)));
                    self.clients[c].slots[s].0 = Slot::Busy { held, unlocking: false };
                    ClientRequest::Convert(ConvertRequest { handle, mode, flags, lvb: None, timeout })
                }
            }
            Slot::Requested if !self.draining && self.rng.chance(3) => {
                self.clients[c].slots[s].0 = Slot::ForceUnlocking;
                let handle = self.handle_of(c, s);
                ClientRequest::Unlock(UnlockRequest { handle, flags: UnlockFlags::FORCE, lvb: None })
            }
            Slot::Requested | Slot::Busy { unlocking: false, .. } if !self.draining && self.rng.chance(5) => {
                ClientRequest::Cancel { handle: self.handle_of(c, s) }
            }
            _ => return Ok(()),
        };
        let result = self.nodes[node].handle_client(self.now, session, request.clone());
        if let Err(error) = result {
            // A convert the engine refuses (flags that make no sense for
            // this conversion) changes nothing; anything else is a bug here.
            match request {
                ClientRequest::Convert(_) => self.clients[c].slots[s].0 = slot,
                ClientRequest::Cancel { .. } if error == crate::RequestError::NotPending => {}
                // A lock the client was told had failed (unavailable) keeps
                // its handle until its master's answer is undone: reusing
                // the handle meanwhile is refused, and changes nothing.
                ClientRequest::Lock(lock) if error == crate::RequestError::HandleInUse && self.config.link_faults => {
                    self.clients[c].slots[s] = (Slot::Empty, 0);
                    self.clients[c].handles.remove(&lock.handle.0);
                    self.owners.remove(&(session, lock.handle));
                    self.report.requests -= 1;
                }
                other => return Err(format!("at {:?}: {other:?} refused: {error}", self.elapsed())),
            }
        }
        self.after(node)
    }

    /// The client goes away (its session ends, with whatever it held or
    /// asked for) and comes back with a new session.
    fn restart_session(&mut self, c: usize) -> Result<(), String> {
        let node = self.clients[c].node;
        let old = self.clients[c].session;
        self.nodes[node].end_session(self.now, old).map_err(|e| format!("ending {old}: {e}"))?;
        self.owners.retain(|&(session, _), _| session != old);
        self.next_session += 1;
        let session = NodeId(node as u16 + 1).session(self.next_session);
        self.nodes[node].open_session(session).map_err(|e| format!("opening {session}: {e}"))?;
        let client = &mut self.clients[c];
        client.session = session;
        client.slots.iter_mut().for_each(|slot| *slot = (Slot::Empty, 0));
        client.handles.clear();
        self.after(node)
    }

    fn handle_of(&self, c: usize, s: usize) -> LockHandle {
        let handle = self.clients[c].handles.iter().find(|&(_, &slot)| slot == s).map(|(&h, _)| h);
        LockHandle(handle.expect("a busy slot has a handle"))
    }

    /// Carries out what node `n` produced: effects to its clients, envelopes to the network.
    fn after(&mut self, n: usize) -> Result<(), String> {
        // A node that asks for its connection to be re-made has marked the
        // link down; the fault tick reconnects it when no cut is in the way.
        while self.nodes[n].poll_reset().is_some() {}
        let mut grants: Vec<(u32, u64, SessionId, LockHandle)> = Vec::new();
        while let Some(effect) = self.nodes[n].poll_effect() {
            let _ = write!(self.trace, "{} {n} {effect:?};", self.now.as_nanos());
            if let Effect::Complete(c) = &effect
                && let (Some(token), Some(&(_, resource))) = (c.token, self.owners.get(&(c.session, c.handle)))
            {
                grants.push((resource, token.0, c.session, c.handle));
            }
            self.deliver(n, effect)?;
        }
        while let Some((to, envelope)) = self.nodes[n].poll_transmit() {
            let _ = write!(self.trace, "{} {n}>{to} {envelope:?};", self.now.as_nanos());
            // A message resent after a reconnection was seen the first time
            // (when its lock's handle could not have been reused yet).
            let first_time = envelope.seq != 0 && self.transmitted.insert((n, to.0, envelope.seq));
            if let Some(PeerMessage::Complete(c)) = &envelope.message
                && let (Some(token), Some(&(_, resource))) = (c.token, self.owners.get(&(c.session, c.handle)))
                && first_time
            {
                grants.push((resource, token.0, c.session, c.handle));
            }
            self.send(NodeId(n as u16 + 1), to, envelope);
        }
        let mut by_resource: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        // A remote grant is seen when its master sends it and again when
        // the client's node delivers it: count it once.
        let mut fresh = Vec::new();
        for (resource, token, session, handle) in grants {
            match self.seen_grants.insert((resource, token), (session, handle)) {
                None => fresh.push((resource, token)),
                Some(lock) if lock == (session, handle) => {}
                Some(other) => {
                    return Err(format!(
                        "at {:?}: r{resource} token {token} granted to {session} {handle} and to {} {}",
                        self.elapsed(),
                        other.0,
                        other.1
                    ));
                }
            }
        }
        for (resource, token) in fresh {
            by_resource.entry(resource).or_default().push(token);
        }
        // A grant is seen when its master sends it; one sent while the link
        // was down goes out later, after younger grants of the same master.
        // So: a token below the largest seen is wrong only from another node
        // (a new master must start above every token handed out before; the
        // old one cannot have let the resource go while a grant of it was
        // still undelivered).
        for (resource, tokens) in by_resource {
            let (last, issuer) = self.last_token.get(&resource).copied().unwrap_or((0, n));
            let min = tokens.iter().copied().min().expect("non-empty");
            if min <= last && issuer != n {
                return Err(format!(
                    "at {:?}: r{resource} granted token {min} by node {} after token {last} by node {}",
                    self.elapsed(),
                    n + 1,
                    issuer + 1
                ));
            }
            let max = tokens.into_iter().max().expect("non-empty");
            if max > last {
                self.last_token.insert(resource, (max, n));
            }
        }
        Ok(())
    }

    fn send(&mut self, from: NodeId, to: NodeId, envelope: Envelope) {
        let copies = if self.rng.chance(self.config.duplicate_percent) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.below(self.config.max_delay.as_nanos() as u64 + 1);
            self.order += 1;
            self.network.push(InFlight {
                at: self.now.saturating_add(Duration::from_nanos(delay)),
                order: self.order,
                from,
                to,
                envelope: envelope.clone(),
            });
        }
    }

    fn deliver(&mut self, n: usize, effect: Effect) -> Result<(), String> {
        let at = self.elapsed();
        match effect {
            Effect::Complete(completion) => self.complete(n, completion),
            Effect::Blocking { session, handle, .. } => {
                let known = self.owners.get(&(session, handle)).map(|&(c, _)| c);
                match known {
                    Some(c) if self.clients[c].node == n => {
                        // A blocked-on holder lets go soon.
                        self.clients[c].next_action = self.clients[c].next_action.min(self.now);
                        Ok(())
                    }
                    _ => Err(format!("at {at:?}: blocking callback for unknown lock {session} {handle}")),
                }
            }
            Effect::Revoked { session, handle, .. } => {
                Err(format!("at {at:?}: unexpected revocation {session} {handle}"))
            }
        }
    }

    fn complete(&mut self, n: usize, done: Completion) -> Result<(), String> {
        let at = self.elapsed();
        let Some(&(c, _)) = self.owners.get(&(done.session, done.handle)) else {
            return Err(format!("at {at:?}: completion for unknown lock: {done:?}"));
        };
        if self.clients[c].node != n {
            return Err(format!("at {at:?}: completion delivered on the wrong node: {done:?}"));
        }
        let s = *self.clients[c].handles.get(&done.handle.0).expect("owned handles are mapped");
        let (slot, resource) = self.clients[c].slots[s];
        if done.status == Status::Granted {
            self.report.grants += 1;
        }
        if done.status == Status::Deadlock {
            self.report.deadlocks += 1;
        }
        if done.status == Status::Unavailable {
            self.report.unavailable += 1;
        }
        let next = match (slot, done.op, done.mode) {
            (Slot::Requested, Op::Lock, Some(mode)) if done.status == Status::Granted => Slot::Granted(mode),
            (Slot::Requested, Op::Lock, None) => Slot::Empty,
            (Slot::Busy { unlocking: false, .. }, Op::Convert, Some(mode)) => Slot::Granted(mode),
            (Slot::Busy { unlocking: true, .. } | Slot::ForceUnlocking, Op::Unlock, None) => Slot::Empty,
            (Slot::ForceUnlocking, Op::Lock, _) => Slot::ForceUnlocking,
            _ => return Err(format!("at {at:?}: completion {done:?} for a lock in state {slot:?}")),
        };
        self.clients[c].slots[s] = (next, resource);
        if next == Slot::Empty {
            self.clients[c].handles.remove(&done.handle.0);
            self.owners.remove(&(done.session, done.handle));
        }
        let soon = self.now.saturating_add(Duration::from_micros(self.rng.below(200)));
        self.clients[c].next_action = self.clients[c].next_action.min(soon);
        Ok(())
    }

    /// No resource may have locks on two nodes' engines at once.
    fn check_masters(&self) -> Result<(), String> {
        for r in 0..self.config.resources {
            let name = format!("r{r}");
            let masters: Vec<usize> = (0..self.nodes.len())
                .filter(|&n| {
                    let node = &self.nodes[n];
                    node.lockspace_id(LOCKSPACE).is_some_and(|ls| node.engine().resource_exists(ls, name.as_bytes()))
                })
                .collect();
            if masters.len() > 1 {
                return Err(format!("at {:?}: r{r} has locks on nodes {masters:?}", self.elapsed()));
            }
        }
        Ok(())
    }
}

fn is_waiting(slot: Slot) -> bool {
    matches!(slot, Slot::Requested | Slot::Busy { unlocking: false, .. })
}

/// Runs one seed with the default shape; odd seeds with link faults.
///
/// # Errors
/// The violation found, naming the seed.
pub fn run_seed(seed: u64) -> Result<SimReport, String> {
    let config = SimConfig { link_faults: seed % 2 == 1, ..SimConfig::default() };
    Sim::new(seed, config).run().map_err(|e| format!("seed {seed}: {e}"))
}
