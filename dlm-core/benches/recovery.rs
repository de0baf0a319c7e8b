//! Recovery's cost: three nodes hold 100,000 locks between them (50,000
//! resources, each locked PR by two nodes, so half the locks are copies of
//! locks mastered on another node); node 3 fails and nodes 1 and 2 recover
//! from the view without it. The nodes run in one thread, messages handed
//! from one to the other in memory: what is measured is the CPU time of the
//! core's recovery (every `handle_view`, `handle_peer` and `poll_*` call of
//! the survivors), not a network.
//!
//! Criterion times the whole recovery (both survivors); a table before it
//! gives each survivor's own CPU time and the messages it sent, as medians
//! of several runs with their spread, and the same for a million locks.
//!
//! `DLM_RECOVERY_RUNS` sets the runs of the 100,000-lock table (default 5);
//! `DLM_RECOVERY_TABLES_ONLY=1` prints the tables and skips the million-lock
//! one and Criterion (for side-by-side runs of two builds).
//!
//! The survivors keep their locks on resources whose master survived (each
//! checks them with one digest per pair of members): what travels is the
//! directory, and the locks whose master was node 3.

use std::hint::black_box;
use std::time::{Duration, Instant as Clock};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use dlm_core::cluster::{ClusterConfig, ClusterNode, Envelope, Member, Membership, NodeId, View, ViewMember};
use dlm_core::{ClientRequest, Effect, Instant, LockFlags, LockHandle, LockRequest, LockspaceConfig, Mode};

const NODES: u16 = 3;
const RESOURCES: u64 = 50_000;
/// Each node's client sessions (the locks are spread over them).
const SESSIONS: u64 = 8;

struct Cluster {
    nodes: Vec<ClusterNode>,
    alive: Vec<bool>,
    wire: std::collections::VecDeque<(NodeId, NodeId, Envelope)>,
    /// Per node: CPU time in its calls, messages it sent, effects it gave.
    cpu: Vec<Duration>,
    sent: Vec<u64>,
    effects: Vec<u64>,
}

impl Cluster {
    /// Three nodes; resource `r{i}` is locked PR first by node `i % 3 + 1`
    /// (its master, as first locker) and then by the next node.
    fn with_locks(resources: u64) -> Cluster {
        let members = (1..=NODES).map(|id| Member { id: NodeId(id), weight: 1 }).collect();
        let membership = Membership::new(members, 1).expect("members");
        let nodes: Vec<ClusterNode> = (1..=NODES)
            .map(|id| {
                let mut node = ClusterNode::new(ClusterConfig::new(NodeId(id), membership.clone())).expect("node");
                node.create_lockspace(b"bench", LockspaceConfig::default()).expect("lockspace");
                for s in 1..=SESSIONS {
                    node.open_session(NodeId(id).session(s)).expect("session");
                }
                node
            })
            .collect();
        let n = usize::from(NODES);
        let mut cluster = Cluster {
            nodes,
            alive: vec![true; n],
            wire: Default::default(),
            cpu: vec![Duration::ZERO; n],
            sent: vec![0; n],
            effects: vec![0; n],
        };
        for i in 0..resources {
            let name = format!("r{i}").into_bytes();
            let first = (i % u64::from(NODES)) as u16 + 1;
            let second = first % NODES + 1;
            for (node, handle) in [(first, 2 * i + 1), (second, 2 * i + 2)] {
                cluster.lock(node, handle, &name);
            }
            // Deliver as we go now and then, as a network would.
            if i % 256 == 255 {
                cluster.run();
            }
        }
        cluster.run();
        let granted: u64 = cluster.effects.iter().sum();
        assert_eq!(granted, 2 * resources, "every lock granted");
        cluster.reset_counts();
        cluster
    }

    fn lock(&mut self, node: u16, handle: u64, name: &[u8]) {
        let n = &mut self.nodes[usize::from(node) - 1];
        let lockspace = n.lockspace_id(b"bench").expect("lockspace");
        let session = NodeId(node).session(handle % SESSIONS + 1);
        let request = LockRequest {
            handle: LockHandle(handle),
            lockspace,
            name: name.to_vec(),
            mode: Mode::Pr,
            flags: LockFlags::EMPTY,
            timeout: None,
        };
        n.handle_client(Instant::ZERO, session, ClientRequest::Lock(request)).expect("accepted");
        self.collect(usize::from(node) - 1);
    }

    fn reset_counts(&mut self) {
        self.cpu.iter_mut().for_each(|c| *c = Duration::ZERO);
        self.sent.iter_mut().for_each(|c| *c = 0);
        self.effects.iter_mut().for_each(|c| *c = 0);
    }

    /// Takes what node `i` has to send and to tell its clients.
    fn collect(&mut self, i: usize) {
        let start = Clock::now();
        let node = &mut self.nodes[i];
        while let Some((to, envelope)) = node.poll_transmit() {
            if envelope.message.is_some() {
                self.sent[i] += 1;
            }
            if self.alive[i] {
                self.wire.push_back((NodeId(i as u16 + 1), to, envelope));
            }
        }
        while let Some(effect) = node.poll_effect() {
            if matches!(effect, Effect::Complete(_)) {
                self.effects[i] += 1;
            }
            black_box(effect);
        }
        self.cpu[i] += start.elapsed();
    }

    /// Delivers until nothing is in flight.
    fn run(&mut self) {
        while let Some((from, to, envelope)) = self.wire.pop_front() {
            let t = usize::from(to.0) - 1;
            if !self.alive[t] {
                continue;
            }
            let start = Clock::now();
            self.nodes[t].handle_peer(Instant::ZERO, from, envelope).expect("valid");
            self.cpu[t] += start.elapsed();
            self.collect(t);
        }
    }

    /// Node 3 fails; the survivors recover from the view without it.
    fn fail_and_recover(&mut self) {
        let gone = usize::from(NODES) - 1;
        self.alive[gone] = false;
        self.wire.retain(|(from, to, _)| usize::from(from.0) - 1 != gone && usize::from(to.0) - 1 != gone);
        let members = (1..NODES).map(|id| ViewMember { id: NodeId(id), weight: 1, incarnation: 1 }).collect();
        let view = View { epoch: 2, members, quorate: true };
        for i in 0..gone {
            let start = Clock::now();
            self.nodes[i].handle_view(Instant::ZERO, &view, |_| true).expect("view");
            self.cpu[i] += start.elapsed();
            self.collect(i);
        }
        self.run();
        for node in &self.nodes[..gone] {
            assert!(node.recovery_status().is_none(), "recovery did not finish");
        }
    }
}

fn median_and_spread(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

/// Each survivor's CPU time and messages over several runs, printed.
fn table(resources: u64, runs: usize) {
    let mut per_node: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut sent = [0; 2];
    let mut mastered = [0; 2];
    let mut stats = [dlm_core::cluster::ClusterStats::default(); 2];
    for _ in 0..runs {
        let mut cluster = Cluster::with_locks(resources);
        let before: Vec<_> = cluster.nodes.iter().map(ClusterNode::stats).collect();
        cluster.fail_and_recover();
        for i in 0..2 {
            per_node[i].push(cluster.cpu[i].as_secs_f64() * 1e3);
            sent[i] = cluster.sent[i];
            mastered[i] = cluster.nodes[i].mastered_count();
            let after = cluster.nodes[i].stats();
            stats[i] = dlm_core::cluster::ClusterStats {
                recovery_locks_sent: after.recovery_locks_sent - before[i].recovery_locks_sent,
                recovery_locks_kept: after.recovery_locks_kept - before[i].recovery_locks_kept,
                recovery_digest_mismatches: after.recovery_digest_mismatches - before[i].recovery_digest_mismatches,
                lookups: after.lookups - before[i].lookups,
                ..after
            };
        }
    }
    // The locks that outlive node 3: its own clients' go.
    let surviving = 2 * resources - (2 * resources).div_ceil(u64::from(NODES));
    println!(
        "recovery of {} locks on {resources} resources, node 3 of 3 failed ({surviving} locks of the survivors' \
         clients stay); {runs} runs, one thread",
        2 * resources
    );
    for i in 0..2 {
        let (median, low, high) = median_and_spread(std::mem::take(&mut per_node[i]));
        let s = &stats[i];
        println!(
            "  node {}: CPU {median:.1} ms median (spread {low:.1} to {high:.1}), {} messages sent ({} locks sent, \
             {} lookups), {} locks of the other survivor kept by its digest, {} digests not matching, {} resources \
             mastered after",
            i + 1,
            sent[i],
            s.recovery_locks_sent,
            s.lookups,
            s.recovery_locks_kept,
            s.recovery_digest_mismatches,
            mastered[i]
        );
    }
    #[allow(clippy::cast_precision_loss)]
    let per_lock = (sent[0] + sent[1]) as f64 / surviving as f64;
    println!("  messages per surviving lock (both survivors): {per_lock:.3}");
}

fn recovery(c: &mut Criterion) {
    // Under `cargo test --all-targets` (no `--bench`) it runs once, smaller.
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let resources = if test_mode { RESOURCES / 10 } else { RESOURCES };
    let runs = std::env::var("DLM_RECOVERY_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    table(resources, if test_mode { 1 } else { runs });
    if std::env::var("DLM_RECOVERY_TABLES_ONLY").is_ok_and(|v| v == "1") {
        return;
    }
    if !test_mode {
        // A million locks, for how the cost grows (fewer runs: each takes
        // a while to set up).
        table(RESOURCES * 10, 3);
    }
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.bench_function(format!("{}_locks_3_nodes_one_fails", 2 * resources), |b| {
        b.iter_batched(
            || Cluster::with_locks(resources),
            |mut cluster| {
                cluster.fail_and_recover();
                cluster
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, recovery);
criterion_main!(benches);
