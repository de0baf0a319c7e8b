//! A nemesis: clients on every node of a corosync cluster hammer a few
//! resources while agents are killed and restarted, links are cut and
//! healed, agents are stopped (SIGSTOP) and continued, a node's corosync is
//! stopped under its running agent past the survivors' grace, and a whole
//! node (corosync and agent, a paused VM) is stopped past the grace and
//! continued, at random. Clients pause too: now and then one stops for
//! longer than the lock-delay while it holds a lock (a garbage collector,
//! a stopped process), and cannot hear of anything meanwhile.
//!
//! Each EX holder reads a register of a store that honours fencing tokens
//! (`support::fenced_store`, after Jepsen's lock tests) and writes it plus
//! one. A checker then looks at every hold the clients saw and at the store:
//! - no two incompatible holds of one resource overlap in time, counting a
//!   hold until its client released it or was told it was lost (half the
//!   clients watch for the loss while they hold; the others look only
//!   after their work, as most programs do, and are told then) (a
//!   revocation, or its session ending with its agent) — not until the
//!   fault itself: with lock-delay, what a lost holder held stays in the
//!   way long enough for its client to hear. The one exception is a hold
//!   taken from a client while it was paused past the lock-delay: no lock
//!   service can tell a stopped process anything, which is what fencing
//!   tokens are for; such overlaps are counted, and the store shows
//!   whether the tokens kept it right;
//! - fencing tokens of one resource only grow: of two incompatible holds,
//!   the later one has the larger token;
//! - the store lost no update (every accepted write read the value it
//!   replaced) and its writes were not reordered (it refuses a token below
//!   the highest it saw);
//! - after healing, every client's requests complete and each client takes
//!   every resource once more (a node that fences itself again meanwhile,
//!   its lease lapsed under load, must come back into a view of all and
//!   grant; such refusals are counted).
//!
//! The test command runs it for 60 s (`DLM_NEMESIS_SECONDS` sets another
//! length; `cargo xtask nemesis --duration 30m` runs it long;
//! `DLM_NEMESIS_LOCK_DELAY` sets the agents' lock-delay). It prints what
//! was injected and what was checked. Needs root and corosync; elsewhere it
//! says so and skips, and under `CI=true` a skip is a failure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dlm_agent::client::{LockError, LockOptions, Session};
use dlm_core::Mode;
use support::corosync::{CorosyncCluster, can_run};
use support::fenced_store::FencedStore;

const NODES: usize = 3;
const CLIENTS_PER_NODE: usize = 2;
const RESOURCES: usize = 4;
/// corosync's token (ms): short, so that faults heal within the run.
const TOKEN_MS: u32 = 300;
/// How long the majority waits before it takes a cut-off node to have
/// fenced itself: well above the cut-off node's detection (token +
/// consensus, under a second here).
const GRACE: &str = "2s";

/// The faults, one at a time: an agent killed and restarted, a link cut,
/// an agent paused, a node's corosync frozen, a whole node frozen.
const FAULTS: [&str; 5] = ["kill", "cut", "pause", "freeze-corosync", "freeze-node"];

/// How long a frozen corosync or node stays stopped: past corosync's
/// detection (token + consensus, 0.66 s) and the grace, so that the others
/// have recovered its locks when it continues.
const STOPPED_PAST_GRACE: Duration = Duration::from_millis(4000);

/// One EX hold in this many, of a client that looks for a loss only after
/// its work, pauses in the middle of it.
const PAUSE_ONE_IN: u64 = 40;
/// How long a paused client stops: half the pauses within what lock-delay
/// covers (so that without it they show), half well past it.
const SHORT_PAUSE_MS: std::ops::Range<u64> = 100..400;
const LONG_PAUSE_MS: std::ops::Range<u64> = 700..1600;
/// The pause that lock-delay covers: the agents' default lock-delay (the
/// checker judges by it even when `DLM_NEMESIS_LOCK_DELAY` sets another,
/// so that a shorter one shows what it lets through).
const COVERED_PAUSE: Duration = Duration::from_millis(500);

/// One hold a client saw.
#[derive(Clone, Debug)]
struct Hold {
    resource: usize,
    mode: Mode,
    token: u64,
    client: usize,
    /// The socket of the agent that granted it: each agent started has its own.
    agent: PathBuf,
    granted: Instant,
    /// Released, or told it was lost (whichever came first); open while held.
    ended: Option<Instant>,
    /// When its client paused while holding it, and for how long, if it did.
    paused: Option<(Instant, Duration)>,
}

/// A tiny deterministic generator (the run's seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What every client records, shared with the nemesis.
#[derive(Default)]
struct Record {
    holds: Vec<Hold>,
    /// When each killed agent (by its socket) was killed: reported (holds
    /// heard of after their agent's kill), not used to end holds, which last
    /// until their clients are told.
    killed: BTreeMap<PathBuf, Instant>,
    /// The logs of the killed agents, kept for a failure's report.
    logs: Vec<(usize, String)>,
    requests: u64,
    granted: u64,
    failed: u64,
    /// Client pauses made.
    pauses: u64,
    /// When a client of each node last paused, while one is: a kill goes to
    /// a node whose client has just paused, to take its lock from it.
    paused_nodes: BTreeMap<usize, Instant>,
}

type Shared = Arc<Mutex<Record>>;

fn lock(record: &Shared) -> std::sync::MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One client, taking random resources in EX or PR until `stop`; when its
/// agent is gone it opens a new session on the agent `connect` finds.
async fn client(
    id: usize,
    (mut session, mut agent): (Session, PathBuf),
    record: Shared,
    store: Arc<FencedStore>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    connect: impl Fn() -> Option<PathBuf>,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let resource = rng.below(RESOURCES as u64) as usize;
        let mode = if rng.below(3) == 0 { Mode::Pr } else { Mode::Ex };
        lock(&record).requests += 1;
        let options = LockOptions { timeout: Some(Duration::from_secs(3)), ..LockOptions::default() };
        match session.lock("default", format!("r{resource}"), mode, options).await {
            Ok(guard) => {
                let index = {
                    let mut r = lock(&record);
                    r.granted += 1;
                    r.holds.push(Hold {
                        resource,
                        mode,
                        token: guard.fencing_token(),
                        client: id,
                        agent: agent.clone(),
                        granted: Instant::now(),
                        ended: None,
                        paused: None,
                    });
                    r.holds.len() - 1
                };
                // An EX holder reads its register (a PR holder only holds:
                // readers at once would refuse each other's tokens).
                let token = guard.fencing_token();
                let read = if mode == Mode::Ex { store.read(resource, token).ok() } else { None };
                // The hold lasts until the client lets go or is told it
                // lost the lock (a revocation, or its session ending with
                // its agent): not a moment earlier, whatever happened to
                // the agent or the node.
                // Half the clients watch for the loss while they work; the
                // others, as most programs do, work and look only after
                // (they are told when they look), which is what lock-delay
                // is for; now and then one of those pauses mid-work for
                // longer than the lock-delay, which only fencing tokens cover.
                let hold_for = Duration::from_millis(rng.below(20));
                let lost = if id.is_multiple_of(2) {
                    tokio::time::timeout(hold_for, guard.lost()).await.is_ok()
                } else {
                    tokio::time::sleep(hold_for).await;
                    if mode == Mode::Ex && rng.below(PAUSE_ONE_IN) == 0 {
                        let range = if rng.below(2) == 0 { SHORT_PAUSE_MS } else { LONG_PAUSE_MS };
                        let pause = Duration::from_millis(range.start + rng.below(range.end - range.start));
                        let node = id / CLIENTS_PER_NODE;
                        {
                            let mut r = lock(&record);
                            r.holds[index].paused = Some((Instant::now(), pause));
                            r.pauses += 1;
                            r.paused_nodes.insert(node, Instant::now());
                        }
                        tokio::time::sleep(pause).await;
                        lock(&record).paused_nodes.remove(&node);
                    }
                    false
                };
                // The write, by a holder that was not told of a loss: the
                // store decides by its token.
                if let (false, Some(read)) = (lost, read) {
                    let _ = store.increment(resource, token, read);
                }
                let lost = lost || !guard.is_held();
                lock(&record).holds[index].ended = Some(Instant::now());
                if lost {
                    std::mem::forget(guard);
                } else {
                    let _ = guard.unlock().await;
                }
            }
            Err(LockError::SessionClosed) => {
                lock(&record).failed += 1;
                // The agent is gone: wait for its successor and open a new session.
                loop {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Some(socket) = connect() else { continue };
                    let target = dlm_agent::client::Target::Unix(socket.clone());
                    if let Ok(client) = dlm_agent::client::Client::connect(&target).await
                        && let Ok(new) = client.session().await
                    {
                        session = new;
                        agent = socket;
                        break;
                    }
                }
            }
            Err(_) => {
                lock(&record).failed += 1;
                // Fenced or timed out: do not spin while the node is cut off.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn compatible(a: Mode, b: Mode) -> bool {
    a == Mode::Pr && b == Mode::Pr
}

/// What the checker found.
#[derive(Debug, Default)]
struct Findings {
    violations: Vec<String>,
    /// Holds taken from clients paused past the lock-delay (granted to
    /// another while the first was stopped and could hear nothing).
    taken_while_paused: usize,
    /// Of the violations, holds taken from clients paused within it.
    taken_within_covered_pause: usize,
}

/// The checker: overlapping incompatible holds (but for holds taken while
/// their client was paused, counted), and tokens going backwards.
fn check(record: &Record) -> Findings {
    let mut found = Findings::default();
    for resource in 0..RESOURCES {
        let mut holds: Vec<&Hold> = record.holds.iter().filter(|h| h.resource == resource).collect();
        holds.sort_by_key(|h| h.granted);
        for (i, a) in holds.iter().enumerate() {
            for b in &holds[i + 1..] {
                if compatible(a.mode, b.mode) {
                    continue;
                }
                if b.token <= a.token {
                    found.violations.push(format!(
                        "r{resource}: token went backwards: {:?} token {} after {:?} token {}",
                        b.mode, b.token, a.mode, a.token
                    ));
                }
                if a.ended.is_some_and(|end| end <= b.granted) {
                    continue;
                }
                match a.paused {
                    Some((at, pause)) if at <= b.granted && pause > COVERED_PAUSE => {
                        found.taken_while_paused += 1;
                        continue;
                    }
                    Some((at, _)) if at <= b.granted => found.taken_within_covered_pause += 1,
                    _ => {}
                }
                found.violations.push(format!(
                    "r{resource}: {:?} token {} (client {}) still held when {:?} token {} (client {}) was granted {:?} later",
                    a.mode,
                    a.token,
                    a.client,
                    b.mode,
                    b.token,
                    b.client,
                    b.granted - a.granted
                ));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nemesis_of_kills_cuts_pauses_and_freezes_breaks_no_lock() {
    if !can_run("the nemesis", true) {
        return;
    }
    let seconds: u64 = std::env::var("DLM_NEMESIS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("DLM_NEMESIS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("nemesis: {seconds} s, seed {seed} (DLM_NEMESIS_SEED={seed} replays the same choices)");
    // `DLM_NEMESIS_LOCK_DELAY=0s` runs without lock-delay, to show the
    // checker sees what it prevents.
    let lock_delay = std::env::var("DLM_NEMESIS_LOCK_DELAY").map(|d| format!("lock_delay = \"{d}\"\n"));
    let extra = format!("{}[cluster.fencing]\nself_fence_grace = \"{GRACE}\"\n", lock_delay.unwrap_or_default());
    let cluster = Arc::new(Mutex::new(CorosyncCluster::start("nemesis", NODES, TOKEN_MS, &extra)));
    let record: Shared = Arc::default();
    let store = Arc::new(FencedStore::new(RESOURCES));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each node's agent's socket now (a restarted agent has a new one).
    let sockets: Arc<Mutex<Vec<std::path::PathBuf>>> = {
        let c = cluster.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::new(Mutex::new((0..NODES).map(|i| c.agent(i).socket.clone()).collect()))
    };
    let socket_of = |node: usize| sockets.lock().unwrap_or_else(PoisonError::into_inner)[node].clone();
    let mut clients = Vec::new();
    for node in 0..NODES {
        for k in 0..CLIENTS_PER_NODE {
            let id = node * CLIENTS_PER_NODE + k;
            let target = dlm_agent::client::Target::Unix(socket_of(node));
            let session =
                dlm_agent::client::Client::connect(&target).await.expect("connect").session().await.expect("session");
            let sockets = sockets.clone();
            let connect = move || {
                let socket = sockets.lock().unwrap_or_else(PoisonError::into_inner)[node].clone();
                socket.exists().then_some(socket)
            };
            let agent = socket_of(node);
            let (record, store, stop) = (record.clone(), store.clone(), stop.clone());
            clients.push(tokio::spawn(client(id, (session, agent), record, store, stop, connect)));
        }
    }

    // The nemesis: one fault at a time, each healed before the next.
    let mut rng = Rng(seed);
    let mut injected: BTreeMap<&str, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
        let mut node = rng.below(NODES as u64) as usize;
        let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        if fault == "kill" {
            // Where a client has just paused holding a lock, if one does
            // within a few seconds: its lock is then taken while it cannot
            // hear (what fencing tokens are for).
            let looking = Instant::now();
            while looking.elapsed() < Duration::from_secs(3) {
                let fresh = lock(&record)
                    .paused_nodes
                    .iter()
                    .find(|(_, at)| at.elapsed() < Duration::from_millis(50))
                    .map(|(&n, _)| n);
                if let Some(paused) = fresh {
                    node = paused;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        *injected.entry(fault).or_default() += 1;
        eprintln!("nemesis: {fault} node {}", node + 1);
        let c = cluster.clone();
        let r = record.clone();
        let sockets = sockets.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = c.lock().unwrap_or_else(PoisonError::into_inner);
            match fault {
                "kill" => {
                    let socket = c.agent(node).socket.clone();
                    lock(&r).killed.insert(socket, Instant::now());
                    let log = c.kill_agent(node);
                    lock(&r).logs.push((node, log));
                    std::thread::sleep(Duration::from_millis(300));
                    c.start_agent(node);
                    sockets.lock().unwrap_or_else(PoisonError::into_inner)[node] = c.agent(node).socket.clone();
                }
                "cut" => {
                    c.hosts.link(node, false);
                    std::thread::sleep(Duration::from_millis(3000));
                    c.hosts.link(node, true);
                }
                "freeze-corosync" => {
                    // Past detection and the grace: the others recover the
                    // node's locks while its agent runs on.
                    c.signal_corosync(node, "STOP");
                    std::thread::sleep(STOPPED_PAST_GRACE);
                    c.signal_corosync(node, "CONT");
                }
                "freeze-node" => {
                    c.signal_corosync(node, "STOP");
                    c.signal_agent(node, "STOP");
                    std::thread::sleep(STOPPED_PAST_GRACE);
                    c.signal_corosync(node, "CONT");
                    c.signal_agent(node, "CONT");
                }
                _ => {
                    c.signal_agent(node, "STOP");
                    std::thread::sleep(Duration::from_millis(1000));
                    c.signal_agent(node, "CONT");
                }
            }
            // Healed: wait until every node runs in a view of all.
            for i in 0..NODES {
                c.wait_state(i, Duration::from_secs(60), in_a_view_of_all);
            }
        })
        .await
        .expect("fault");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("a client's request never completed")
            .expect("client");
    }

    // After healing, every client takes every resource once more. A node
    // may fence itself again meanwhile, rightly, if its corosync left it
    // unanswered past the lease (a 300-ms token on a loaded 2-CPU machine):
    // its refusal is then `Fenced`, and it must come back into a view of
    // all and grant; the fences are counted and their log lines printed.
    let mut fenced_again = 0;
    for node in 0..NODES {
        let target = dlm_agent::client::Target::Unix(socket_of(node));
        let session =
            dlm_agent::client::Client::connect(&target).await.expect("connect").session().await.expect("session");
        for resource in 0..RESOURCES {
            let options = LockOptions { timeout: Some(Duration::from_secs(10)), ..LockOptions::default() };
            let mut granted = session.lock("default", format!("r{resource}"), Mode::Ex, options.clone()).await;
            if matches!(granted, Err(LockError::NotGranted(dlm_agent::proto::Status::Fenced))) {
                fenced_again += 1;
                let c = cluster.clone();
                tokio::task::spawn_blocking(move || {
                    let c = c.lock().unwrap_or_else(PoisonError::into_inner);
                    for line in c.agent(node).log().lines().filter(|l| l.contains("lease") || l.contains("fenc")) {
                        eprintln!("nemesis: node {} after healing: {line}", node + 1);
                    }
                    c.wait_state(node, Duration::from_secs(60), in_a_view_of_all);
                })
                .await
                .expect("back in a view of all");
                granted = session.lock("default", format!("r{resource}"), Mode::Ex, options).await;
            }
            assert!(granted.is_ok(), "node {} cannot take r{resource} after healing: {:?}", node + 1, granted.err());
        }
    }
    let mut record = lock(&record);
    let Findings { mut violations, taken_while_paused, taken_within_covered_pause } = check(&record);
    let lost_updates = store.check();
    violations.extend(lost_updates.iter().cloned());
    if !violations.is_empty() {
        let c = cluster.lock().unwrap_or_else(PoisonError::into_inner);
        record.logs.extend((0..NODES).map(|node| (node, c.agent(node).log())));
        keep_logs(seed, &record.logs);
    }
    let heard_late =
        record.holds.iter().filter(|h| record.killed.get(&h.agent).is_some_and(|k| *k < h.granted)).count();
    let tally = store.tally();
    eprintln!(
        "nemesis: injected {injected:?}, client pauses {}; {fenced_again} locks refused as fenced after healing; {} requests, {} granted, {} failed (timeouts, fenced, \
         sessions lost); {} holds checked over {RESOURCES} resources ({heard_late} heard of after their agent's kill, \
         {taken_while_paused} taken from a client paused past {COVERED_PAUSE:?}); store: {} writes accepted, {} operations refused for a \
         stale token, {} lost updates; {} violations ({taken_within_covered_pause} of them holds taken from a \
         client paused within {COVERED_PAUSE:?})",
        record.pauses,
        record.requests,
        record.granted,
        record.failed,
        record.holds.len(),
        tally.writes,
        tally.rejected,
        lost_updates.len(),
        violations.len()
    );
    assert!(violations.is_empty(), "seed {seed}:\n{}", violations.join("\n"));
    assert!(record.granted > 100, "too little was granted to check anything: {}", record.granted);
    assert!(tally.writes > 50, "too little was written to check the store: {tally:?}");
}

/// Whether a node's status says it runs in a view of every node.
fn in_a_view_of_all(status: &serde_json::Value) -> bool {
    status["state"] == "running" && status["members"].as_array().is_some_and(|m| m.len() == NODES)
}

/// Lines of each agent's log printed with a failure: the files are gone with
/// a CI machine, its output is not.
const LOG_TAIL: usize = 40;

/// Writes every agent's log where a failure's report says, and prints the
/// end of each.
fn keep_logs(seed: u64, logs: &[(usize, String)]) {
    let dir = std::env::temp_dir().join(format!("dlm-nemesis-{seed}"));
    let _ = std::fs::create_dir_all(&dir);
    for (i, (node, log)) in logs.iter().enumerate() {
        let _ = std::fs::write(dir.join(format!("{i:02}-node{}.log", node + 1)), log);
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- log {i:02}, node {}, its last {LOG_TAIL} lines ---", node + 1);
        for line in &lines[lines.len().saturating_sub(LOG_TAIL)..] {
            eprintln!("{line}");
        }
    }
    eprintln!("nemesis: the agents' logs are in {} (killed ones first, in order)", dir.display());
}

#[test]
fn the_checker_finds_overlapping_incompatible_holds_and_tokens_going_backwards() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let hold = |resource, mode, token, client: usize, granted: Instant, ended: Option<Instant>| Hold {
        resource,
        mode,
        token,
        client,
        agent: PathBuf::from(format!("agent-of-client-{client}")),
        granted,
        ended,
        paused: None,
    };
    // Fine: one after the other with growing tokens; two readers together.
    let mut record = Record {
        holds: vec![
            hold(0, Mode::Ex, 1, 0, at(0), Some(at(10))),
            hold(0, Mode::Ex, 2, 1, at(11), Some(at(20))),
            hold(0, Mode::Pr, 3, 0, at(21), Some(at(30))),
            hold(0, Mode::Pr, 4, 1, at(22), Some(at(31))),
        ],
        ..Record::default()
    };
    assert!(check(&record).violations.is_empty());
    // An EX granted while another is held; a later grant with a smaller token.
    record.holds.push(hold(0, Mode::Ex, 5, 2, at(25), Some(at(40))));
    record.holds.push(hold(1, Mode::Ex, 9, 0, at(0), Some(at(5))));
    record.holds.push(hold(1, Mode::Ex, 8, 1, at(6), Some(at(7))));
    let found = check(&record).violations;
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found.iter().filter(|v| v.contains("still held")).count() == 2, "{found:#?}");
    assert!(found.iter().any(|v| v.contains("backwards")), "{found:#?}");
    // A hold whose agent was killed lasts until its client was told, not
    // only until the kill: a client that hears late is the bug users hit.
    let mut record = Record {
        holds: vec![hold(2, Mode::Ex, 1, 2, at(0), Some(at(50))), hold(2, Mode::Ex, 2, 0, at(20), Some(at(30)))],
        ..Record::default()
    };
    assert_eq!(check(&record).violations.len(), 1);
    record.killed.insert(PathBuf::from("agent-of-client-2"), at(10));
    assert_eq!(check(&record).violations.len(), 1, "the kill does not end the hold: the client was told at 50 ms");
    // Taken while its client was paused past the lock-delay (from 15 ms):
    // counted, not a violation (the store's tokens must cover it); paused
    // only after the other grant, it is one.
    record.holds[0].paused = Some((at(15), Duration::from_millis(600)));
    let found = check(&record);
    assert_eq!((found.violations.len(), found.taken_while_paused), (0, 1), "{found:?}");
    record.holds[0].paused = Some((at(25), Duration::from_millis(600)));
    assert_eq!(check(&record).violations.len(), 1);
    // Paused for less than lock-delay covers: a violation.
    record.holds[0].paused = Some((at(15), Duration::from_millis(300)));
    let found = check(&record);
    assert_eq!((found.violations.len(), found.taken_within_covered_pause), (1, 1), "{found:?}");
}
