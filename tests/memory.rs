//! Memory pressure on a node must not stall its agent (`[memory] resident`).
//!
//! Two agents run in one memory cgroup, each from its own copy of the binary
//! (copied inside the cgroup, so that the copy's pages are charged to it and
//! reclaimed under its limit): one resident (the default), one with
//! `resident = "off"`. A client outside the cgroup locks and unlocks on both
//! while a hog in the cgroup keeps it at its limit, so that the kernel has
//! to reclaim file pages, the agents' code among them, again and again.
//! The resident agent must read nothing back from storage (`read_bytes`
//! of `/proc/PID/io`); the other one, which does, shows that the squeeze
//! reached the agents' code (else the first check proves nothing).
//! Latencies and fault counts of both are printed: figures, not checks.
//! Why reads, not major faults: a read is what stalls an agent on storage,
//! while the kernel also counts as major a fault it retried after waiting
//! for a page. Once the machine's RAM was full of page cache (660 MiB free
//! of 24 GiB) the resident agent here took 1–3 major faults in some runs
//! where it had taken none; whether those read anything was not measured
//! then, and in the runs measured since it read nothing.
//!
//! Then a node's agent is squeezed for a minute with the node's workload,
//! in a three-node corosync cluster whose corosync runs in a cgroup of its
//! own (as `corosync.service` does): the node must stay in the view and
//! every lock request, node 1's on the resource it masters and its own,
//! must be served; what its agent read back and its faults are reported.
//! The node's workload there is the hogs, which leave a little less room
//! than a file takes, and a thrasher, which reads that file over and over:
//! its pages, evicted and read again, are the thrashing the kernel counts
//! as memory pressure; the node's pressure (PSI, of its cgroup) is reported
//! and must be at least 30 % full.
//! Twice: at the token the README recommends for a LAN (1,000 ms), and at
//! 300 ms with knet's ping timers set (the README says why they must be).
//!
//! By hand (figures, not checks): `DLM_SQUEEZE_SECS` (60), `DLM_SQUEEZE_TOKEN_MS`
//! (1000), `DLM_SQUEEZE_COROSYNC=1` to squeeze node 2's corosync with its
//! agent, `DLM_SQUEEZE_HOGS=0` for the same run without the hogs,
//! `DLM_SQUEEZE_THRASH=0` without the thrasher,
//! `DLM_SQUEEZE_RESIDENT=off` for node 2's agent not resident,
//! `DLM_SQUEEZE_REALTIME=0` for the membership's threads at normal
//! priority (on every node), `DLM_SQUEEZE_GROW=N` for node 2 taking N new
//! locks a second and holding them, `DLM_SQUEEZE_RESERVE_LOCKS=N` for node
//! 2's `[memory] reserve_locks`. What they showed is in the README's
//! "Memory pressure".

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dlm_agent::client::{LockOptions, Session};
use dlm_core::Mode;
use squeeze::{Squeeze, THRASHED_FILE, file_on_storage, lock_until, squeeze};
use support::corosync::{CorosyncCluster, can_run};
use support::{Agent, LowMemoryCgroup, metric_value, under_ci};

#[path = "memory/squeeze.rs"]
mod squeeze;

/// The cgroup's limit: room for both agents, the hog and a copy's pages.
const LIMIT: u64 = 384 << 20;
/// How long the hog squeezes the two agents' cgroup.
const SQUEEZE: Duration = Duration::from_secs(8);

/// How long the hogs squeeze the cluster's node (issue 31 asks for a
/// minute at least); `DLM_SQUEEZE_SECS` by hand.
fn node_squeeze() -> Duration {
    const NODE_SQUEEZE: Duration = Duration::from_secs(60);
    std::env::var("DLM_SQUEEZE_SECS").ok().and_then(|s| s.parse().ok()).map_or(NODE_SQUEEZE, Duration::from_secs)
}

/// Whether node 2's corosync is squeezed with its agent
/// (`DLM_SQUEEZE_COROSYNC=1` by hand): a node where corosync shares the
/// workload's memory cgroup, against the README's advice.
fn squeeze_corosync() -> bool {
    std::env::var("DLM_SQUEEZE_COROSYNC").is_ok_and(|v| v == "1")
}

/// The cluster's corosync token: `DLM_SQUEEZE_TOKEN_MS` by hand.
fn node_token() -> u32 {
    std::env::var("DLM_SQUEEZE_TOKEN_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000)
}

/// Starts an agent inside `cgroup` from a copy of the binary made there.
fn start_in(cgroup: &LowMemoryCgroup, tag: &str, config: &str, copy: &Path) -> Agent {
    let script = format!("{} && cp \"$0\" {} && exec {} \"$@\"", cgroup.enter(), copy.display(), copy.display());
    Agent::start_wrapped(tag, config, &[], &["sh", "-c", &script])
}

/// Faults of a process so far, major and minor (`/proc/PID/stat`, fields
/// 12 and 10): a major fault waited for a read; a minor one may have waited
/// for reclaim to make room for a fresh page.
fn faults(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent's stat");
    // The command name, in parentheses, may hold spaces: count after it.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..].split(' ').collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse().ok()).expect("a fault count");
    (field(12), field(10))
}

/// Bytes a process made the kernel fetch from storage so far (`read_bytes`
/// of `/proc/PID/io`: its faults' reads included, every thread's).
fn storage_reads(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("the agent's io counts (root)");
    io.lines().find_map(|l| l.strip_prefix("read_bytes: ")?.trim().parse().ok()).expect("read_bytes")
}

fn since(now: (u64, u64), before: (u64, u64)) -> (u64, u64) {
    (now.0 - before.0, now.1 - before.1)
}

/// Takes new locks (`g/0`, `g/1`, …) on `session`, `per_second` of them,
/// and holds them until `end`: the agent's tables grow while the node is
/// squeezed. Returns each grant's time and the requests that failed.
async fn grow_until(session: &Session, end: Instant, per_second: u32) -> (Vec<Duration>, Vec<String>) {
    let (mut times, mut failed, mut held) = (Vec::new(), Vec::new(), Vec::new());
    if per_second == 0 {
        return (times, failed);
    }
    let every = Duration::from_secs(1) / per_second;
    let mut next = Instant::now();
    while Instant::now() < end {
        let start = Instant::now();
        match session.lock("default", format!("g/{}", held.len()), Mode::Ex, LockOptions::default()).await {
            Ok(guard) => {
                times.push(start.elapsed());
                held.push(guard);
            }
            Err(e) => failed.push(format!("grow: {e:?}")),
        }
        next += every;
        tokio::time::sleep_until(next.into()).await;
    }
    drop(held);
    (times, failed)
}

/// New locks per second node 2 takes and holds during its squeeze: 0 (by
/// hand, `DLM_SQUEEZE_GROW`, to see what growing under pressure costs).
fn growth_of_node_2() -> u32 {
    std::env::var("DLM_SQUEEZE_GROW").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    let at = |q: f64| times.get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)));
    format!(
        "{} round trips, p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        times.len(),
        at(0.5).copied().unwrap_or_default(),
        at(0.99).copied().unwrap_or_default(),
        at(0.999).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default()
    )
}

/// A directory of a test's own (the tests of this file run at once).
fn own_dir(tag: &str) -> support::Scratch {
    support::Scratch::new(&format!("memory-{tag}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resident_agent_reads_nothing_back_while_its_cgroup_is_squeezed() {
    let Some(cgroup) = LowMemoryCgroup::create("resident", LIMIT) else {
        assert!(!under_ci(), "a memory cgroup is required under CI=true (run as root)");
        eprintln!("skipping: needs root for a memory cgroup");
        return;
    };
    let copies = own_dir("copies");
    let mut resident = start_in(&cgroup, "memory-resident", "", &copies.join("resident"));
    let mut reclaimable = start_in(&cgroup, "memory-off", "[memory]\nresident = \"off\"\n", &copies.join("off"));
    assert_eq!(metric_value(&resident.metrics(), "dlm_memory_resident"), 1.0, "{}", resident.log());
    assert!(metric_value(&resident.metrics(), "dlm_memory_locked_bytes") > f64::from(1 << 20));
    assert_eq!(metric_value(&reclaimable.metrics(), "dlm_memory_resident"), 0.0);
    // Warm both up, so that what follows measures the squeeze, not a start.
    let warm = Instant::now() + Duration::from_millis(500);
    // The same sessions then go on: a connection's set-up is not measured.
    let on = resident.client().await.session().await.expect("session");
    let off = reclaimable.client().await.session().await.expect("session");
    let _ = tokio::join!(lock_until(&on, warm), lock_until(&off, warm));

    let before = (faults(resident.pid()), faults(reclaimable.pid()));
    let reads_before = (storage_reads(resident.pid()), storage_reads(reclaimable.pid()));
    let Squeeze { first: mut on, second: mut off, failed, hogs, killed, failures, .. } =
        squeeze(&cgroup, &on, &off, SQUEEZE, None).await;
    let (resident_faults, resident_minor) = since(faults(resident.pid()), before.0);
    let (reclaimable_faults, reclaimable_minor) = since(faults(reclaimable.pid()), before.1);
    let resident_reads = storage_reads(resident.pid()) - reads_before.0;
    let reclaimable_reads = storage_reads(reclaimable.pid()) - reads_before.1;
    eprintln!("{hogs} hogs started, {killed} of them killed when the cgroup ran out");
    eprintln!("squeeze of {SQUEEZE:?}: the limit was hit {failures} times");
    eprintln!(
        "resident: {resident_reads} bytes read back, {resident_faults} major, {resident_minor} minor faults; {}",
        summary(&mut on)
    );
    eprintln!(
        "resident = \"off\": {reclaimable_reads} bytes read back, {reclaimable_faults} major, {reclaimable_minor} \
         minor faults; {}",
        summary(&mut off)
    );

    assert!(resident.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))), "the resident agent died");
    assert!(reclaimable.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))), "the other agent died");
    assert!(failures > 0, "the hog never reached the limit: no squeeze");
    assert!(failed.is_empty(), "requests failed during the squeeze: {failed:?}");
    assert!(reclaimable_reads > 0, "the squeeze never reached the agents' code, so it proves nothing");
    assert_eq!(resident_reads, 0, "a resident agent waited for its own pages to be read back");
    assert!(on.len() > 100 && off.len() > 10, "both agents kept serving: {} and {}", on.len(), off.len());
    drop((resident, reclaimable));
}

/// Without CAP_IPC_LOCK and with a finite `RLIMIT_MEMLOCK`, locking every
/// future mapping could fail an allocation later: `required` refuses to
/// start and says what to give; `auto` starts, warns and reports 0.
#[test]
fn without_the_capability_required_refuses_to_start_and_auto_warns() {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    if !root {
        assert!(!under_ci(), "root is required under CI=true");
        eprintln!("skipping: needs root to drop CAP_IPC_LOCK from the bounding set");
        return;
    }
    let limited = "ulimit -l 64 && exec setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock \"$0\" \"$@\"";
    let dir = own_dir("required");
    let output = Command::new("sh")
        .args(["-c", limited, support::bin(), "run", "--http", "off", "--socket"])
        .arg(dir.join("dlm.sock"))
        .env("DLM_STATE_DIR", dir.join("state"))
        .env("DLM_NO_EBPF", "true")
        .env("DLM_CONFIG", {
            let config = dir.join("required.toml");
            std::fs::write(&config, "[memory]\nresident = \"required\"\n").expect("config");
            config
        })
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(77), "refused as a missing permission (EX_NOPERM): {stderr}");
    assert!(stderr.contains("CAP_IPC_LOCK") && stderr.contains("65536 bytes"), "{stderr}");

    let agent = Agent::start_wrapped("memory-auto", "", &[], &["sh", "-c", limited]);
    assert_eq!(metric_value(&agent.metrics(), "dlm_memory_resident"), 0.0);
    assert!(agent.log().contains("memory not resident"), "{}", agent.log());
    drop(agent);
}

/// Whether a thrasher reads a file in node 2's cgroup during its squeeze
/// (the default; `DLM_SQUEEZE_THRASH=0` by hand for the hogs alone).
fn thrasher_on_node_2() -> bool {
    std::env::var("DLM_SQUEEZE_THRASH").map_or(true, |v| v != "0")
}

/// Node 2's `[memory] resident`: its default, spelled out; by hand
/// `DLM_SQUEEZE_RESIDENT=off` shows what residency buys in the cluster.
fn residency_of_node_2() -> String {
    let mode = std::env::var("DLM_SQUEEZE_RESIDENT").unwrap_or_else(|_| "auto".into());
    // By hand, `DLM_SQUEEZE_RESERVE_LOCKS` sets room aside for that many locks.
    let reserve = std::env::var("DLM_SQUEEZE_RESERVE_LOCKS").unwrap_or_else(|_| "0".into());
    format!("[memory]\nresident = \"{mode}\"\nreserve_locks = {reserve}\n")
}

/// Every node's `[cluster] realtime_priority` (the membership's threads):
/// the default unless `DLM_SQUEEZE_REALTIME` gives one (by hand, `0` shows
/// what real-time priority buys).
fn realtime_of_nodes() -> (String, Option<u8>) {
    match std::env::var("DLM_SQUEEZE_REALTIME").ok().and_then(|v| v.parse::<u8>().ok()) {
        Some(priority) => (format!("realtime_priority = {priority}\n"), Some(priority)),
        None => (String::new(), None),
    }
}

/// A node whose memory is squeezed is still a healthy member: it stays in
/// the view (its agent, resident, does not stall) and keeps serving the
/// resources it masters to the other nodes. Node 2's agent is put in a
/// memory cgroup with the hogs, which squeeze it for a minute as in the
/// test above but leave the thrasher room, and the thrasher, which makes the
/// kernel count the squeeze as pressure, while node 1 and node 2 lock a
/// resource node 2 masters.
///
/// Node 2's corosync stays in its own cgroup, where a node's service
/// manager puts it: squeezed with the hogs here, where it cannot lock its
/// memory (no CAP_SYS_RESOURCE: "Could not increase RLIMIT_MEMLOCK, not
/// locking memory"), its real-time threads reclaim for the cgroup at
/// priority 99 and starve every other task of the machine, the OOM-killed
/// hog that would free the memory among them, for about a second: every
/// node's token and lease lapse (the README's "Memory pressure" has the
/// trace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squeezed_node_stays_in_the_view_and_serves_what_it_masters() {
    squeezed_node_stays_in_the_view("a_squeezed_node_stays_in_the_view", "squeeze", node_token(), None).await;
}

/// The same squeeze at a 300-ms token. corosync derives knet's pong timeout
/// from the token (half of it: 150 ms), and this machine's knet sends its
/// pings about every 160 ms (`corosync-cmapctl -m stats`): its links then
/// drop about every 8 s with no load, pressure or loss at all. With knet's
/// ping timers set (75 ms, pong timeout 1 s; the token still detects a lost
/// node in 300 ms) the squeezed node stays in the view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_300_ms_token_a_squeezed_node_stays_in_the_view_too() {
    squeezed_node_stays_in_the_view("at_a_300_ms_token_a_squeezed_node_stays", "squeeze300", 300, Some((75, 1000)))
        .await;
}

/// The squeeze of node 2 (module docs) in a cluster with corosync's token
/// `token` (ms) and, if given, knet's ping timers (interval, pong timeout).
/// `tag` names its cgroup, directories and cluster (the tests run at once).
async fn squeezed_node_stays_in_the_view(name: &str, tag: &str, token: u32, knet_ping: Option<(u32, u32)>) {
    if !can_run(name, true) {
        return;
    }
    // Made first, so that it goes last: after the processes in it.
    let cgroup = LowMemoryCgroup::create(tag, LIMIT).expect("a memory cgroup (root)");
    let (realtime, priority) = realtime_of_nodes();
    let mut cluster = match knet_ping {
        Some(ping) => CorosyncCluster::start_with_knet_ping(tag, 3, token, ping, &realtime),
        None => CorosyncCluster::start(tag, 3, token, &realtime),
    };
    // Node 2's agent again, from a copy of its own made in the cgroup: its
    // pages are its own (the other agents map the shared binary's) and
    // charged to the cgroup.
    cluster.kill_agent(1);
    let copies = own_dir(tag);
    let copy = copies.join("node2");
    // Run as `sh -c SCRIPT ip netns exec NS BIN ARGS…`: into the cgroup
    // and the copy made outside the namespace, whose `/sys` is its own.
    let script = format!(
        "ns=$3; bin=$4; shift 4; {} && cp \"$bin\" {copy} && exec ip netns exec \"$ns\" {copy} \"$@\"",
        cgroup.enter(),
        copy = copy.display()
    );
    cluster.start_agent_through(1, &residency_of_node_2(), &["sh", "-c", &script]);
    let all = serde_json::json!([1, 2, 3]);
    for i in 0..3 {
        cluster.wait_state(i, Duration::from_secs(30), |s| s["state"] == "running" && s["members"] == all);
    }
    let epochs = || (0..3).map(|i| cluster.status(i).0["epoch"].as_u64().expect("epoch")).collect::<Vec<_>>();
    let before = epochs();
    // Node 2 masters `r`: it locks it first.
    let local = cluster.agent(1).client().await.session().await.expect("session");
    let guard = local.lock("default", "r", Mode::Ex, LockOptions::default()).await.expect("granted");
    guard.unlock().await.expect("unlocked");
    let remote = cluster.agent(0).client().await.session().await.expect("session");
    let _ = lock_until(&remote, Instant::now() + Duration::from_millis(500)).await;

    if squeeze_corosync() {
        // By hand: node 2's corosync joins the cgroup with its pages (cgroup
        // v1's move_charge_at_immigrate: anonymous and mapped file pages).
        let _ = std::fs::write(cgroup.path().join("memory.move_charge_at_immigrate"), "3");
        cgroup.join(cluster.corosync_pid(1));
    }
    // As root, the membership's threads (lease, cpg, quorum; no watchdog
    // here) run at real-time priority unless it is turned off.
    let realtime_threads = metric_value(&cluster.agent(1).metrics(), "dlm_cluster_membership_realtime_threads");
    assert_eq!(realtime_threads, if priority == Some(0) { 0.0 } else { 3.0 }, "{}", cluster.agent(1).log());
    let agent = cluster.agent(1).pid();
    let corosync = cluster.corosync_pid(1);
    let faults_before = (faults(agent), faults(corosync));
    let reads_before = storage_reads(agent);
    let time = node_squeeze();
    let grower = cluster.agent(1).client().await.session().await.expect("session");
    let thrashed = copies.join("thrashed");
    let thrasher = thrasher_on_node_2();
    if thrasher {
        file_on_storage(&thrashed, THRASHED_FILE);
    }
    let (squeezed, (mut grown, grow_failed)) = tokio::join!(
        squeeze(&cgroup, &remote, &local, time, thrasher.then_some(thrashed.as_path())),
        grow_until(&grower, Instant::now() + time, growth_of_node_2())
    );
    let Squeeze { first: mut from_node1, second: mut on_node2, mut failed, hogs, killed, failures, pressure, thrashed } =
        squeezed;
    failed.extend(grow_failed);
    let (major, minor) = since(faults(agent), faults_before.0);
    let reads = storage_reads(agent) - reads_before;
    let (corosync_major, corosync_minor) = since(faults(corosync), faults_before.1);
    let where_corosync = if squeeze_corosync() { "squeezed with the agent" } else { "in its own cgroup" };
    eprintln!(
        "squeeze of {time:?}, token {token} ms, node 2's corosync {where_corosync}; {realtime_threads} membership \
         threads at real-time priority"
    );
    eprintln!("{hogs} hogs started, {killed} of them killed; the limit was hit {failures} times");
    if let Some(pages) = thrashed {
        eprintln!("the thrasher touched {pages} pages of its {} MiB file", THRASHED_FILE >> 20);
    }
    eprintln!("memory pressure of the machine (every node's): {}", pressure.machine);
    match pressure.cgroup {
        Some(node2) => eprintln!("memory pressure of node 2 (its cgroup: its agent and its workload): {node2}"),
        None => eprintln!("memory pressure of node 2: not kept for its cgroup on this machine (no cgroup v2)"),
    }
    // Reads reported, not checked: in one run of about eight with the
    // machine's RAM full of page cache, this agent (resident: its mappings
    // locked) still had 416 KiB read for it from storage, source not found
    // yet (issue 31's note); the test above checks that a resident agent
    // reads nothing. Not resident (`DLM_SQUEEZE_RESIDENT=off`): 6.4 GB.
    let locked = metric_value(&cluster.agent(1).metrics(), "dlm_memory_locked_bytes") / f64::from(1 << 20);
    eprintln!("node 2's agent: {reads} bytes read back, {major} major, {minor} minor faults; {locked:.0} MiB locked");
    eprintln!("node 2's corosync: {corosync_major} major, {corosync_minor} minor faults");
    eprintln!("node 1 locking r (mastered on node 2): {}", summary(&mut from_node1));
    eprintln!("node 2 locking r: {}", summary(&mut on_node2));
    if !grown.is_empty() {
        eprintln!("node 2 taking new locks and holding them: {}", summary(&mut grown));
    }

    // The hogs leave the thrasher room (no OOM kill is due); alone, they
    // fill the cgroup until the kernel kills them.
    assert!(
        failures > 0 && (thrasher || killed > 0),
        "no squeeze: the limit was hit {failures} times, {killed} hogs killed"
    );
    // The squeeze must be the pressure issue 31 asks for (full ≥ 30 % of the
    // time), else it shows nothing about a node under it; checked where the
    // cgroup's pressure is kept.
    if thrasher {
        assert!(thrashed.is_some_and(|pages| pages > 0), "the thrasher read nothing");
        if let Some(node2) = pressure.cgroup {
            assert!(node2.full >= 0.30, "the thrasher made too little pressure: {node2}");
        }
    }
    assert!(failed.is_empty(), "{} requests failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert_eq!(epochs(), before, "a view changed: the squeezed node was taken for lost");
    for i in 0..3 {
        let (status, code) = cluster.status(i);
        assert_eq!((status["state"].as_str(), code), (Some("running"), 0), "node {}: {status:#}", i + 1);
    }
    // Node 1 hears node 2's pressure every second (what it would log if it
    // lost node 2 now), and node 2 shows its own.
    let (status, _) = cluster.status(0);
    let peer2 = status["peers"].as_array().and_then(|p| p.iter().find(|p| p["node_id"] == 2)).cloned();
    let reported = peer2.as_ref().map(|p| &p["pressure"]).filter(|p| p.is_object()).cloned();
    assert!(reported.as_ref().is_some_and(|p| p["age_ms"].as_u64() < Some(3000)), "node 1's status: {status:#}");
    eprintln!("node 1's status of node 2: {}", peer2.unwrap_or_default());
    assert!(cluster.status(1).0["pressure"].is_object(), "node 2's status: {:#}", cluster.status(1).0);
    assert!(from_node1.len() > 100, "node 1 was served {} times in {time:?}", from_node1.len());
    drop(cluster);
}
