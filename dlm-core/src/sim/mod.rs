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
//! Every seed has membership faults (three nodes on seeds 0 and 1 modulo 4,
//! five on 2 and 3), and client processes that pause while their nodes run
//! (see `clients`). Views come on seeds 0 and 3 modulo 4 from the real view agreement
//! ([`crate::cluster::agree`], as the agent runs it) over a model of
//! corosync (see `cpg`: the ring and its detection delay, agreed-order
//! multicast, votequorum, fencing with a grace, the membership lease), with
//! agents and nodes crashed, partitions into two sides of any size, a
//! corosync frozen under its running agent and whole nodes paused, either
//! briefly or past detection and the grace (a node that wakes into a newer
//! view). On seeds 1 and 2 modulo 4 a scripted membership layer with corosync's
//! guarantees hands out views instead (see `membership`): nodes crash (all state lost, their clients die with
//! them) and restart with a new incarnation, join, are cut off from the
//! others (the minority fences itself first, then the majority recovers
//! without it, and it rejoins when the cut heals), pause, and fail again
//! while the others recover. A departed node's locks are recovered only
//! after it is fenced: a crashed node is dead; a cut-off one has been handed
//! its view without quorum before the majority is handed its own.
//!
//! Clients also go away now and then (their session ends with whatever it
//! held or asked for) and come back with a new session, and they reuse lock
//! handles as soon as a lock is gone.
//!
//! What is checked, after every step:
//! - what clients believe they hold never conflicts: no two clients, on any
//!   nodes, are granted incompatible modes of one resource at once (a client
//!   of a crashed node holds nothing, but for the lock-delay after the crash
//!   nobody may be granted what conflicts with what it held; one of a node
//!   cut off holds its locks until its node fences itself and revokes them;
//!   a lock being converted holds what its granted and requested modes both
//!   keep out, unless CONVDEADLK lets its master demote it; a client of a
//!   node paused longer than the lock-delay is not counted while paused: it
//!   cannot act, and its agent revokes its locks before anything else when
//!   it wakes, so beyond the lock-delay only fencing tokens protect its
//!   writes). Each seed draws
//!   its lock-delay from the seed alone: off on one seed in four, else up to
//!   4 ms;
//! - a lock is revoked only by a node that fenced itself;
//! - once every node is done recovering, every lock a client believes it
//!   holds is in its master's queues in that mode under the token it was told;
//! - no resource is mastered by two nodes at once (a node paused past the
//!   lease's bound, or whose lapse is due, is not counted: its state is
//!   stale and dropped before it acts), and each master's queues
//!   hold only compatible granted modes (the engine's own invariant checks);
//! - fencing tokens of one resource only grow, across masters;
//! - a value block read as valid holds zeros or a value a client wrote to
//!   that resource, not one known to be overwritten before the request
//!   was made (see `value_blocks`); a value lost in recovery must be marked
//!   not valid;
//! - a client is never told of a grant, blocking callback or completion for
//!   a lock it does not have, nor two completions for one request;
//! - a deadlock victim is chosen only on a cycle whose waits all existed at
//!   once: when the coordinator found the cycle, every one of its edges was
//!   in its master's engine (the simulator sees every engine at that moment).
//!
//! `DLM_SIM_LOG=1` prints the run as it goes (requests, effects, grants,
//! views), `DLM_SIM_LOG=2` every envelope too.
//!
//! At the end, clients stop asking and release what they hold (dead nodes
//! start again and cuts heal first): every request must then complete
//! (granted, refused, timed out, cancelled, fenced or chosen as a deadlock
//! victim) within `drain_limit` of that heal (100 ms: every timer of the
//! model is a few milliseconds), every node must have no lock
//! left, and every mastership must be in its directory node's entries and
//! every entry name a node that masters its resource.

mod checks;
mod clients;
mod cpg;
mod membership;
mod network;
mod report;
mod value_blocks;

use report::Digest;
pub use report::{Faults, RecoveryPaths, SimReport};

use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use crate::cluster::{ClusterConfig, ClusterNode, Envelope, Member, Membership, NodeId, PeerMessage};
use crate::ids::{LockHandle, SessionId};
use crate::lockspace::LockspaceConfig;
use crate::mode::Mode;
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
    /// Crash, restart, partition and pause nodes now and then, with views
    /// from a simulated membership layer (see the module docs).
    pub membership_faults: bool,
    /// How long after the heal every request must have completed (and
    /// every lock gone): past it a request counts as hung. Every timer of
    /// the model is a few milliseconds; over seeds 0–999 (before client
    /// pauses, which add at most a few ms) the drain took 6 ms at the
    /// median and 21 ms at most.
    pub drain_limit: Duration,
    /// With membership faults: views come from the real agreement
    /// ([`crate::cluster::agree`]) over a model of corosync (see `cpg`),
    /// not from the scripted layer.
    pub cpg: bool,
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
            membership_faults: false,
            drain_limit: Duration::from_millis(100),
            cpg: false,
        }
    }
}

const LOCKSPACE: &[u8] = b"sim";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    /// A new lock's request is out.
    Requested,
    Granted(Mode),
    /// A conversion to `to` (or, with `unlocking`, an unlock) is out; with
    /// `demotable` (CONVDEADLK) the master may take `held` down to NL.
    Busy {
        held: Mode,
        to: Mode,
        unlocking: bool,
        demotable: bool,
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
    /// While the client process is paused (see `clients`).
    pause: Option<clients::Pause>,
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
    /// Draws for client pauses alone (see `clients`).
    pause_rng: Rng,
    now: Instant,
    nodes: Vec<ClusterNode>,
    clients: Vec<Client>,
    network: BinaryHeap<InFlight>,
    order: u64,
    /// The largest token seen per resource, and its master (node, incarnation).
    last_token: HashMap<u32, (u64, (usize, u64))>,
    /// Each (resource, token) granted, and to which lock: a token is never handed out twice.
    seen_grants: HashMap<(u32, u64), (SessionId, LockHandle)>,
    /// (session, handle) → client and resource.
    owners: HashMap<(SessionId, LockHandle), (usize, u32)>,
    report: SimReport,
    draining: bool,
    /// Numbered messages already sent once: (node, peer, epoch, sequence number).
    transmitted: std::collections::HashSet<(usize, u16, u64, u64)>,
    /// The last session serial handed out (sessions restart now and then).
    next_session: u64,
    /// Node pairs (0-based, smaller first) cut off until the given time.
    cuts: Vec<(usize, usize, Instant)>,
    /// When the network is next looked at for faults to start or end.
    next_fault_tick: Instant,
    /// What the nodes produced so far (see [`SimReport::trace`]).
    trace: Digest,
    /// Whether each deadlock candidate (by coordinator and number) was a
    /// cycle of real waits when it was found.
    candidates: HashMap<(usize, u64), bool>,
    /// The simulated membership layer.
    members: membership::MembershipLayer,
    /// The model of corosync driving the real agreement, when the run uses it.
    cpg: Option<cpg::CpgLayer>,
    /// When the faults ended (cuts healed, the dead restarted, the frozen
    /// continued) and clients stopped asking: liveness counts from here.
    healed_at: Instant,
    /// Each node's settings, to start it again after a crash.
    configs: Vec<ClusterConfig>,
    /// The lockspace's settings on every node.
    lockspace: LockspaceConfig,
    /// What crashed nodes' clients held, by resource, with the end of the
    /// lock-delay from the crash: nobody may be granted a conflicting mode
    /// before then.
    ghosts: Vec<(u32, Belief, Instant)>,
    /// The token of each granted lock, as its client was told.
    tokens: HashMap<(SessionId, LockHandle), u64>,
    /// What clients wrote to value blocks and when they asked to read them.
    value_blocks: value_blocks::ValueBlocks,
    /// How much to print as the run goes (`DLM_SIM_LOG`: 1 the clients'
    /// requests, effects, grants and views; 2 also every envelope).
    verbosity: u8,
}

/// What a client may rely on while it has a lock: the modes it was granted
/// and asked for. While a conversion is out, its master may already have
/// granted `to` (its answer on the way), so a mode counts as in its way only
/// when it conflicts with both.
#[derive(Clone, Copy, Debug)]
struct Belief {
    held: Mode,
    to: Mode,
}

impl Belief {
    fn conflicts(self, other: Belief) -> bool {
        [self.held, self.to].iter().all(|&a| [other.held, other.to].iter().all(|&b| !a.compatible(b)))
    }
}

/// What a client in this state relies on: a granted lock, and one being
/// converted (unless CONVDEADLK lets its master demote it). An unlock that
/// is out is already let go of.
fn belief(slot: Slot) -> Option<Belief> {
    match slot {
        Slot::Granted(mode) => Some(Belief { held: mode, to: mode }),
        Slot::Busy { held, to, unlocking: false, demotable: false } => Some(Belief { held, to }),
        _ => None,
    }
}

/// The lock-delay of a seed's run: off on one seed in four (so runs without
/// it stay covered), else up to 4 ms, drawn from the seed alone so that no
/// other draw of the run changes with it.
fn lock_delay_of(seed: u64) -> Duration {
    let mut rng = Rng::new(seed ^ 0x6c6f_636b_6465_6c79);
    if rng.chance(25) { Duration::ZERO } else { Duration::from_micros(rng.below(4_000)) }
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
        let lockspace = LockspaceConfig { lvb_len: 8, lock_delay: lock_delay_of(seed) };
        let members: Vec<Member> =
            (1..=config.nodes).map(|id| Member { id: NodeId(id), weight: 1 + rng.below(2) as u8 }).collect();
        let weights: Vec<u8> = members.iter().map(|m| m.weight).collect();
        // With the model of corosync, nodes start as the agent's do: joining,
        // granting nothing before their first view.
        let first_epoch = u64::from(!(config.membership_faults && config.cpg));
        let membership = Membership::new(members, first_epoch).expect("valid members");
        let mut nodes = Vec::new();
        let mut clients = Vec::new();
        let mut configs = Vec::new();
        let node_count = usize::from(config.nodes);
        for n in 0..config.nodes {
            let mut cluster = ClusterConfig::new(NodeId(n + 1), membership.clone());
            cluster.release_delay = Duration::from_micros(200 + rng.below(3000));
            cluster.deadlock_interval = Duration::from_millis(5);
            cluster.ack_delay = Duration::from_micros(300);
            cluster.ack_timeout = Duration::from_millis(5);
            cluster.heartbeat_interval = Duration::from_millis(2);
            cluster.master_cache_max = 4;
            // Nodes handed views wait for them, as the agent's do with corosync.
            cluster.requests_wait_for_views = config.membership_faults;
            configs.push(cluster.clone());
            let mut node = ClusterNode::new(cluster).expect("valid cluster");
            node.create_lockspace(LOCKSPACE, lockspace).expect("lockspace");
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
                    pause: None,
                });
            }
            nodes.push(node);
        }
        let cpg = (config.membership_faults && config.cpg).then(|| cpg::CpgLayer::new(node_count, &weights));
        Sim {
            config,
            rng,
            pause_rng: Rng::new(seed ^ 0x7061_7573_6573),
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
            candidates: HashMap::new(),
            members: membership::MembershipLayer::new(node_count),
            cpg,
            healed_at: Instant::ZERO,
            configs,
            lockspace,
            ghosts: Vec::new(),
            tokens: HashMap::new(),
            value_blocks: value_blocks::ValueBlocks::default(),
            verbosity: std::env::var("DLM_SIM_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(0),
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
                self.healed_at = self.now;
                self.end_membership_faults()?;
            }
            if self.draining && self.quiescent() {
                break;
            }
            let next_net = self.network.peek().map(|m| m.at);
            let next_client = self.clients.iter().map(|c| c.next_action).min();
            let next_timer = (0..self.nodes.len()).filter_map(|n| self.timer_of(n)).min();
            let faults = self.config.link_faults || self.config.membership_faults;
            let next_fault = faults.then_some(self.next_fault_tick);
            let next_view = self.members.next_view_at();
            let next_cpg = self.cpg.as_ref().and_then(|c| c.next_at(&self.members.paused_until));
            let Some(at) =
                [next_net, next_client, next_timer, next_fault, next_view, next_cpg].into_iter().flatten().min()
            else {
                break;
            };
            if at <= self.now {
                stalled += 1;
                if stalled > 1_000_000 {
                    return Err(format!("at {:?}: no progress (a timer that never clears?)", self.elapsed()));
                }
            } else {
                stalled = 0;
            }
            self.now = self.now.max(at);
            if self.draining && self.now.saturating_duration_since(self.healed_at) > self.config.drain_limit {
                return Err(format!(
                    "requests still pending at {:?}, {:?} after the heal: {}",
                    self.elapsed(),
                    self.config.drain_limit,
                    self.pending_summary()
                ));
            }
            if next_fault == Some(at) {
                self.fault_tick()?;
            } else if next_view == Some(at) {
                self.deliver_views()?;
            } else if next_cpg == Some(at) {
                self.deliver_cpg()?;
            } else if next_net == Some(at) {
                let m = self.network.pop().expect("peeked");
                let to = usize::from(m.to.0 - 1);
                if self.is_cut(usize::from(m.from.0 - 1), to) || !self.members.alive[to] {
                    self.report.lost += 1;
                    continue;
                }
                if self.members.paused(to, self.now) {
                    // A paused process reads it when it runs again.
                    let at = self.members.paused_until[to];
                    self.order += 1;
                    self.network.push(InFlight { at, order: self.order, ..m });
                    continue;
                }
                self.report.messages += 1;
                self.check_lease(to)?;
                let epoch = m.envelope.epoch;
                self.nodes[to].handle_peer(self.now, m.from, m.envelope).map_err(|e| {
                    format!(
                        "at {:?}: node {} (epoch {}): peer error {e} (epoch {epoch})",
                        self.elapsed(),
                        to + 1,
                        self.nodes[to].epoch()
                    )
                })?;
                self.after(to)?;
            } else if next_client == Some(at) {
                let c = self.clients.iter().position(|c| c.next_action == at).expect("found above");
                self.client_step(c)?;
            } else {
                for n in 0..self.nodes.len() {
                    if self.timer_of(n).is_some_and(|t| t <= self.now) {
                        self.check_lease(n)?;
                        self.nodes[n].handle_timeout(self.now);
                        self.after(n)?;
                    }
                }
            }
            self.check_masters()?;
            self.check_beliefs()?;
            self.check_recovered_locks()?;
        }
        self.check_directories()?;
        for (n, node) in self.nodes.iter().enumerate() {
            if !self.members.alive[n] {
                continue;
            }
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
        for node in &self.nodes {
            self.report.paths.add(&node.stats());
        }
        Ok(self.report)
    }

    /// Prints a line of the run's log, if asked for (see `verbosity`).
    pub(super) fn log(&self, level: u8, line: impl FnOnce() -> String) {
        if self.verbosity >= level {
            eprintln!("{:?} {}", self.elapsed(), line());
        }
    }

    pub(super) fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now.as_nanos())
    }

    pub(super) fn quiescent(&self) -> bool {
        // Heartbeats (and their acknowledgements) never stop on a cluster of
        // more than a few nodes: what must be settled is everything else.
        let links_settled = self.nodes.iter().enumerate().filter(|&(n, _)| self.members.alive[n]).all(|(_, node)| {
            node.peers().all(|peer| node.link_state(peer).is_some_and(|(up, _)| up) && !node.link_busy(peer))
        });
        let idle_network =
            self.network.iter().all(|m| matches!(m.envelope.message, None | Some(PeerMessage::Heartbeat)));
        self.clients.iter().all(|c| c.slots.iter().all(|(s, _)| *s == Slot::Empty))
            && idle_network
            && self.cuts.is_empty()
            && links_settled
            && self.membership_settled()
    }
}

fn is_waiting(slot: Slot) -> bool {
    matches!(slot, Slot::Requested | Slot::Busy { unlocking: false, .. })
}

/// The shape of a seed's run: membership faults (crashes, restarts,
/// partitions, pauses, joins) on every seed, link faults on odd seeds. Seeds
/// 0 and 1 modulo 4 have three nodes, 2 and 3 five (a cluster that lost two
/// still has quorum); seeds 0 and 3 modulo 4 run the real agreement over the
/// model of corosync (frozen corosyncs too), 1 and 2 the scripted views.
#[must_use]
pub fn seed_config(seed: u64) -> SimConfig {
    let cpg = matches!(seed % 4, 0 | 3);
    let mut config = SimConfig { link_faults: seed % 2 == 1, membership_faults: true, cpg, ..SimConfig::default() };
    if seed % 4 >= 2 {
        config.nodes = 5;
        config.clients_per_node = 2;
        config.requests = 2000;
    } else {
        config.requests = 1000;
    }
    config
}

/// Runs one seed with the shape [`seed_config`] gives it.
///
/// # Errors
/// The violation found, naming the seed.
pub fn run_seed(seed: u64) -> Result<SimReport, String> {
    Sim::new(seed, seed_config(seed)).run().map_err(|e| format!("seed {seed}: {e}"))
}

/// The shape of a seed's run with static membership (the agent's default:
/// no views, so a request that needs a cut-off peer fails `Unavailable`
/// rather than waiting for a view): three nodes, links cut on every seed.
#[must_use]
pub fn static_seed_config(_seed: u64) -> SimConfig {
    SimConfig { link_faults: true, ..SimConfig::default() }
}

/// Runs one seed with static membership ([`static_seed_config`]).
///
/// # Errors
/// The violation found, naming the seed.
pub fn run_static_seed(seed: u64) -> Result<SimReport, String> {
    Sim::new(seed, static_seed_config(seed)).run().map_err(|e| format!("static seed {seed}: {e}"))
}
