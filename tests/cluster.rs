//! Three real agent processes on loopback forming one cluster: locks taken
//! through different nodes coordinate through each resource's master.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dlm_agent::client::{LockError, LockOptions, SessionEvent};
use dlm_agent::proto;
use dlm_core::cluster::wire::{self, Hello};
use dlm_core::cluster::{Member, Membership, NodeId};
use dlm_core::{LockFlags, Mode};
use support::{Cluster, metric_value};

const TIMINGS: &str = "deadlock_interval = \"50ms\"\nrelease_delay = \"300ms\"";

fn opts(flags: LockFlags) -> LockOptions {
    LockOptions { flags, ..LockOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_locks_from_two_nodes_wait_and_the_holder_gets_a_blocking_callback() {
    let cluster = Cluster::start("conflict", 3, TIMINGS);
    let holder = cluster.agents[0].client().await.session().await.expect("session");
    let waiter = cluster.agents[1].client().await.session().await.expect("session");
    let mut events = holder.events();
    let held = holder.lock("default", "shared", Mode::Ex, LockOptions::default()).await.expect("granted");
    let first_token = held.fencing_token();
    let waiting = tokio::spawn(async move {
        let guard = waiter.lock("default", "shared", Mode::Pr, LockOptions::default()).await;
        (waiter, guard)
    });
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("a callback").expect("event");
    assert_eq!(event, SessionEvent::Blocking { handle: held.handle(), mode: Mode::Pr });
    assert!(!waiting.is_finished(), "the waiter was granted while an EX lock was held on another node");
    held.unlock().await.expect("unlock");
    let (_waiter, granted) =
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("granted in time").expect("task");
    let granted = granted.expect("granted after the holder let go");
    assert!(granted.fencing_token() > first_token, "fencing tokens must grow across nodes");
    assert!(cluster.metric_sum("dlm_cluster_remote_requests_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_block_written_on_node_1_is_read_on_node_3() {
    let cluster = Cluster::start("lvb", 3, TIMINGS);
    let writer = cluster.agents[0].client().await.session().await.expect("session");
    let reader = cluster.agents[2].client().await.session().await.expect("session");
    // A reader on node 3 keeps the resource (and its value block) alive.
    let keeper = reader.lock("default", "config", Mode::Nl, opts(LockFlags::VALBLK)).await.expect("nl");
    let guard = writer.lock("default", "config", Mode::Ex, opts(LockFlags::VALBLK)).await.expect("ex");
    let value = b"written-on-node-1-".to_vec();
    guard.unlock_with_lvb(value.clone()).await.expect("unlock with value block");
    let read = reader.lock("default", "config", Mode::Pr, opts(LockFlags::VALBLK)).await.expect("pr");
    assert_eq!(&read.lvb().expect("a value block")[..value.len()], &value[..]);
    drop(keeper);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_waits_for_a_holder_on_another_node() {
    let cluster = Cluster::start("convert", 3, TIMINGS);
    let a = cluster.agents[1].client().await.session().await.expect("session");
    let b = cluster.agents[2].client().await.session().await.expect("session");
    let mut b_events = b.events();
    let mut upgrading = a.lock("default", "doc", Mode::Pr, LockOptions::default()).await.expect("pr on node 2");
    let reader = b.lock("default", "doc", Mode::Pr, LockOptions::default()).await.expect("pr on node 3");
    let convert = tokio::spawn(async move {
        let result = upgrading.convert(Mode::Ex, LockOptions::default(), None).await;
        (upgrading, result)
    });
    let event = tokio::time::timeout(Duration::from_secs(5), b_events.recv()).await.expect("callback").expect("event");
    assert_eq!(event, SessionEvent::Blocking { handle: reader.handle(), mode: Mode::Ex });
    assert!(!convert.is_finished());
    reader.unlock().await.expect("unlock");
    let (upgraded, result) =
        tokio::time::timeout(Duration::from_secs(5), convert).await.expect("in time").expect("task");
    result.expect("converted");
    assert_eq!(upgraded.mode(), Mode::Ex);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_across_two_nodes_fails_one_victim() {
    let cluster = Cluster::start("deadlock", 3, TIMINGS);
    let started = Instant::now();
    assert_one_victim_of_a_deadlock_between_nodes_1_and_2(&cluster, "r1", "r2").await;
    eprintln!("deadlock across nodes broken in {:?}", started.elapsed());
    assert!(cluster.metric_sum("dlm_cluster_deadlock_victims_total") >= 1.0);
}

/// A client of node 1 holds `first` (mastered there: first lockers master)
/// and one of node 2 holds `second`; each then asks for the other's lock.
/// Exactly one of them is failed as the deadlock's victim; it gives up its
/// own lock, as an application would, so the other then gets through.
async fn assert_one_victim_of_a_deadlock_between_nodes_1_and_2(
    cluster: &Cluster,
    first: &'static str,
    second: &'static str,
) {
    let a = cluster.agents[0].client().await.session().await.expect("session");
    let b = cluster.agents[1].client().await.session().await.expect("session");
    let a1 = a.lock("default", first, Mode::Ex, LockOptions::default()).await.expect("first");
    let b2 = b.lock("default", second, Mode::Ex, LockOptions::default()).await.expect("second");
    let side = |session: &dlm_agent::client::Session, held: dlm_agent::client::LockGuard, want: &'static str| {
        let session = session.clone();
        async move {
            let result = session.lock("default", want, Mode::Ex, LockOptions::default()).await;
            drop(held);
            result.map(|guard| guard.fencing_token())
        }
    };
    let (ra, rb) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(side(&a, a1, second), side(&b, b2, first))
    })
    .await
    .expect("the deadlock is broken within 10 s");
    let victims =
        [&ra, &rb].iter().filter(|r| matches!(r, Err(LockError::NotGranted(proto::Status::Deadlock)))).count();
    assert_eq!(victims, 1, "{ra:?} {rb:?}");
    assert!(ra.is_ok() || rb.is_ok(), "the survivor is granted: {ra:?} {rb:?}");
}

/// One grant as a client saw it: when it had the lock, in which mode.
#[derive(Clone, Debug)]
struct Held {
    resource: usize,
    mode: Mode,
    token: u64,
    from: Instant,
    until: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_on_three_nodes_never_overlap_and_all_complete() {
    // A short release delay makes masters come and go during the run: new
    // lookups race each other and removals cross new requests.
    let cluster = Cluster::start("hammer", 3, "deadlock_interval = \"50ms\"\nrelease_delay = \"20ms\"");
    const CLIENTS_PER_NODE: usize = 6;
    const ROUNDS: usize = 40;
    const RESOURCES: usize = 3;
    let journal: Arc<Mutex<Vec<Held>>> = Arc::default();
    let mut tasks = Vec::new();
    for (n, agent) in cluster.agents.iter().enumerate() {
        for c in 0..CLIENTS_PER_NODE {
            let session = agent.client().await.session().await.expect("session");
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    let pick = n * 31 + c * 7 + round * 13;
                    let resource = pick % RESOURCES;
                    let mode = if pick % 3 == 0 { Mode::Pr } else { Mode::Ex };
                    let guard = session
                        .lock("default", format!("hot{resource}"), mode, LockOptions::default())
                        .await
                        .unwrap_or_else(|e| panic!("node {} client {c} round {round}: {e}", n + 1));
                    let from = Instant::now();
                    tokio::time::sleep(Duration::from_micros(200 + (pick % 5) as u64 * 100)).await;
                    let until = Instant::now();
                    let token = guard.fencing_token();
                    guard.unlock().await.expect("unlock");
                    journal.lock().expect("journal").push(Held { resource, mode, token, from, until });
                    if round % 10 == 9 {
                        // Let the resources go idle now and then, so that
                        // their masters release them.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                }
            }));
        }
    }
    let all = async {
        for task in tasks {
            task.await.expect("client task");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all).await.expect("every request completed");
    let mut journal = journal.lock().expect("journal").clone();
    assert_eq!(journal.len(), 3 * CLIENTS_PER_NODE * ROUNDS);
    journal.sort_by_key(|h| (h.resource, h.token));
    for pair in journal.windows(2) {
        if pair[0].resource == pair[1].resource {
            assert!(pair[0].token < pair[1].token, "a fencing token was handed out twice: {pair:?}");
        }
    }
    for (i, a) in journal.iter().enumerate() {
        for b in &journal[i + 1..] {
            if a.resource != b.resource || a.mode.compatible(b.mode) {
                continue;
            }
            let overlap = a.from < b.until && b.from < a.until;
            assert!(!overlap, "incompatible grants overlapped: {a:?} {b:?}");
        }
    }
    assert!(cluster.metric_sum("dlm_cluster_masters_released_total") >= 1.0, "no master was ever released");
    assert!(cluster.metric_sum("dlm_cluster_served_requests_total") >= 1.0);
}

fn hello(cluster: &str, node: u16, version: u16, incarnation: u64) -> Vec<u8> {
    let cluster = cluster.as_bytes().to_vec();
    wire::encode_hello(&Hello { version, cluster, node: NodeId(node), epoch: 1, incarnation })
}

/// Sends `bytes` to a peer port; true if the agent then closed the connection.
fn dropped_after(address: &str, bytes: &[u8]) -> bool {
    let mut stream = TcpStream::connect(address).expect("connect to the peer port");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = stream.write_all(bytes);
    let mut buffer = [0u8; 256];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return true,
            // The agent's own hello, when ours was acceptable.
            Ok(_) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_input_is_refused_and_the_node_keeps_serving() {
    // Node 1 of three, alone: the test plays the other two, badly, on plain
    // TCP (`insecure = true`): the checks below TLS's, which a member with
    // a valid certificate could still fail (tests/peer_tls.rs has TLS's).
    let peers: Vec<String> = support::free_ports(3).into_iter().map(|port| format!("127.0.0.1:{port}")).collect();
    let members = support::members_section(&peers);
    let config = format!("[tls]\ninsecure = true\n[cluster]\nname = \"badpeer\"\nnode_id = 1\n{members}");
    let agent = support::Agent::start("badpeer", &config);
    // Insecure, and loud about it: a warning at start, and a metric.
    assert!(agent.log().contains("insecure = true"), "{}", agent.log());
    assert_eq!(metric_value(&agent.metrics(), "dlm_tls_insecure"), 1.0);
    let port = &peers[0];
    assert!(dropped_after(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "garbage");
    assert!(dropped_after(port, &hello("another-cluster", 2, wire::VERSION, 1)), "wrong cluster name");
    assert!(dropped_after(port, &hello("badpeer", 2, wire::VERSION + 1, 1)), "wrong version");
    assert!(dropped_after(port, &hello("badpeer", 9, wire::VERSION, 1)), "not a member");
    let mut oversized = hello("badpeer", 2, wire::VERSION, 1);
    oversized.extend_from_slice(&(wire::FRAME_LEN_MAX as u32 + 1).to_be_bytes());
    assert!(dropped_after(port, &oversized), "oversized frame");
    let mut garbage_frame = hello("badpeer", 3, wire::VERSION, 1);
    garbage_frame.extend_from_slice(&[0, 0, 0, 5, 0, 1, 0xde, 0xad, 0xbe]);
    assert!(dropped_after(port, &garbage_frame), "garbage frame");
    // Node 2 "again", with another incarnation: a restarted node, refused.
    assert!(dropped_after(port, &hello("badpeer", 2, wire::VERSION, 2)), "restarted peer");
    let metrics = agent.metrics();
    for reason in ["bad_hello", "wrong_cluster", "wrong_version", "unknown_node", "bad_frame", "restarted_peer"] {
        let series = format!("dlm_cluster_peer_rejected_total{{reason=\"{reason}\"}}");
        assert!(metric_value(&metrics, &series) >= 1.0, "{reason} not counted:\n{metrics}");
    }
    // Still serving its clients: a resource whose directory is node 1 needs no one else.
    let membership =
        Membership::new((1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect(), 1).expect("members");
    let name = (0..)
        .map(|i| format!("local-{i}"))
        .find(|n| membership.directory(b"default", n.as_bytes()) == NodeId(1))
        .expect("a name");
    let session = agent.client().await.session().await.expect("session");
    let held = session.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await.expect("local lock");
    let other = agent.client().await.session().await.expect("session");
    let try_lock =
        other.lock("default", name.as_str(), Mode::Ex, opts(LockFlags::NOQUEUE)).await.map(|g| g.fencing_token());
    assert!(matches!(try_lock, Err(LockError::NotGranted(proto::Status::WouldBlock))), "{try_lock:?}");
    held.unlock().await.expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_needs_an_unreachable_node_fails_instead_of_hanging() {
    let mut cluster = Cluster::start("unreachable", 3, TIMINGS);
    let members: Vec<Member> = (1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect();
    let membership = Membership::new(members, 1).expect("members");
    let name = (0..)
        .map(|i| format!("needs-node-3-{i}"))
        .find(|name| membership.directory(b"default", name.as_bytes()) == NodeId(3))
        .expect("some name hashes to node 3");
    let mut node3 = cluster.agents.remove(2);
    node3.terminate();
    let session = cluster.agents[0].client().await.session().await.expect("session");
    let started = Instant::now();
    // Whether node 1 has noticed already (the request fails at once) or
    // not (it goes out and fails when the link drops), it fails.
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        session.lock("default", name.as_str(), Mode::Ex, LockOptions::default()),
    )
    .await;
    let Ok(outcome) = result else { panic!("the request hung") };
    let outcome = outcome.map(|g| g.fencing_token());
    assert!(matches!(outcome, Err(LockError::NotGranted(proto::Status::Unavailable))), "{outcome:?}");
    eprintln!("failed as unavailable after {:?}", started.elapsed());
    // A resource whose directory and master are reachable still works.
    let reachable = (0..)
        .map(|i| format!("reachable-{i}"))
        .find(|name| membership.directory(b"default", name.as_bytes()) != NodeId(3))
        .expect("some name hashes elsewhere");
    session.lock("default", reachable.as_str(), Mode::Ex, LockOptions::default()).await.expect("granted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_is_refused_rather_than_trusted_with_lost_state() {
    // Until recovery exists, a node that restarts has lost its queues and
    // directory entries: the others must not go on as if it had not.
    let mut cluster = Cluster::start("restart", 3, TIMINGS);
    let membership =
        Membership::new((1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect(), 1).expect("members");
    let name = (0..)
        .map(|i| format!("on-node-3-{i}"))
        .find(|n| membership.directory(b"default", n.as_bytes()) == NodeId(3))
        .expect("a name");
    cluster.restart(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Node 3 dials nodes 1 and 2 again; they refuse its new incarnation.
    let refused = |agent: &support::Agent| {
        metric_value(&agent.metrics(), "dlm_cluster_peer_rejected_total{reason=\"restarted_peer\"}")
    };
    while refused(&cluster.agents[0]) < 1.0 || refused(&cluster.agents[1]) < 1.0 {
        assert!(Instant::now() < deadline, "node 3 was not refused:\n{}", cluster.agents[0].log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let session = cluster.agents[0].client().await.session().await.expect("session");
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        session.lock("default", name.as_str(), Mode::Ex, LockOptions::default()),
    )
    .await
    .expect("ends instead of hanging")
    .map(|g| g.fencing_token());
    assert!(matches!(outcome, Err(LockError::NotGranted(proto::Status::Unavailable))), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_peer_queue_resets_the_link_and_every_request_still_ends() {
    // One batch queued per peer at most: bursts of requests fill it, the
    // link is reset, and the requests end one way or another.
    let cluster = Cluster::start("backpressure", 3, "deadlock_interval = \"50ms\"\npeer_queue_max = 1");
    const NAMES: usize = 300;
    let keeper = cluster.agents[1].client().await.session().await.expect("session");
    let mut kept = Vec::new();
    for i in 0..NAMES {
        // Even these may meet a reset link (node 2's queues are as small): try again.
        let guard = loop {
            match keeper.lock("default", format!("bp-{i}"), Mode::Nl, LockOptions::default()).await {
                Ok(guard) => break guard,
                Err(LockError::NotGranted(proto::Status::Unavailable)) => cluster.wait_links_up(),
                Err(other) => panic!("keeper {i}: {other}"),
            }
        };
        kept.push(guard);
    }
    cluster.wait_links_up();
    let burst = cluster.agents[0].client().await.session().await.expect("session");
    let resets = || metric_value(&cluster.agents[0].metrics(), "dlm_cluster_link_resets_total{reason=\"queue_full\"}");
    for round in 0..10 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..NAMES {
            let burst = burst.clone();
            tasks.spawn(async move {
                match burst.lock("default", format!("bp-{i}"), Mode::Pr, LockOptions::default()).await {
                    Ok(guard) => {
                        guard.unlock().await.expect("unlock");
                        true
                    }
                    Err(LockError::NotGranted(proto::Status::Unavailable)) => false,
                    Err(other) => panic!("request {i}: {other}"),
                }
            });
        }
        let (mut granted, mut unavailable) = (0, 0);
        let all = async {
            while let Some(done) = tasks.join_next().await {
                if done.expect("task") { granted += 1 } else { unavailable += 1 }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all).await.expect("every request ended");
        eprintln!("burst {round}: {granted} granted, {unavailable} unavailable");
        cluster.wait_links_up();
        if resets() >= 1.0 {
            break;
        }
    }
    assert!(resets() >= 1.0, "no burst ever filled a queue");
    // The links come back, and nothing was left behind on the master.
    for guard in kept {
        guard.unlock().await.expect("unlock");
    }
    let client = cluster.agents[1].client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let locks = client.status().await.expect("status").locks;
        if locks == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{locks} locks left on node 2:\n{}", cluster.agents[1].log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    burst
        .lock("default", "bp-0", Mode::Ex, LockOptions::default())
        .await
        .expect("works again")
        .unlock()
        .await
        .expect("unlock");
}

/// Issue 19's workload: no session ever holds or waits for more than one
/// lock at a time, so no deadlock is possible, and none may be reported,
/// however the wait-for reports of the three masters interleave. Then a real
/// deadlock between two nodes in the same cluster still finds exactly one victim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_cannot_deadlock_has_no_victim_and_a_real_deadlock_beside_it_has_one() {
    const SESSIONS_PER_NODE: usize = 6;
    const RESOURCES: u64 = 8;
    const REQUESTS: u64 = 30_000;
    let cluster = Cluster::start("phantom", 3, TIMINGS);
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadlocks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, agent) in cluster.agents.iter().enumerate() {
        for c in 0..SESSIONS_PER_NODE {
            let session = agent.client().await.session().await.expect("session");
            let (requests, deadlocks) = (requests.clone(), deadlocks.clone());
            tasks.push(tokio::spawn(async move {
                // A small generator per session: the run needs no other randomness.
                let mut state = ((n * SESSIONS_PER_NODE + c) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut next = move || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                };
                let mut outcomes = Vec::new();
                while requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REQUESTS
                    && started.elapsed() < Duration::from_secs(240)
                {
                    let resource = format!("p{}", next() % RESOURCES);
                    let mode = if next() % 4 == 0 { Mode::Pr } else { Mode::Ex };
                    let options = LockOptions { timeout: Some(Duration::from_secs(3)), ..LockOptions::default() };
                    match session.lock("default", resource.as_str(), mode, options).await {
                        Ok(guard) => {
                            tokio::time::sleep(Duration::from_micros(next() % 4_000)).await;
                            // The unlock's completion comes back before the next request.
                            guard.unlock().await.expect("unlock");
                        }
                        Err(LockError::NotGranted(proto::Status::Deadlock)) => {
                            deadlocks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(other) => outcomes.push(format!("{other:?}")),
                    }
                }
                outcomes
            }));
        }
    }
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.expect("task"));
    }
    let made = requests.load(std::sync::atomic::Ordering::Relaxed).min(REQUESTS);
    let elapsed = started.elapsed();
    eprintln!("{made} requests in {elapsed:?}; other failures: {failures:?}");
    assert!(made >= REQUESTS, "only {made} requests in {elapsed:?}");
    assert_eq!(deadlocks.load(std::sync::atomic::Ordering::Relaxed), 0, "deadlock victims where no deadlock can be");
    assert_eq!(cluster.metric_sum("dlm_cluster_deadlock_victims_total"), 0.0);

    // A real deadlock across nodes 1 and 2, in the same cluster.
    assert_one_victim_of_a_deadlock_between_nodes_1_and_2(&cluster, "real-1", "real-2").await;
    assert_eq!(cluster.metric_sum("dlm_cluster_deadlock_victims_total"), 1.0);
}
