//! Clusters with membership from real corosync daemons, one per network
//! namespace, and real faults: an agent killed, a node lost (its corosync
//! and agent killed), a node cut off by its link, corosync killed under a
//! running agent, and membership input that must be refused. Freezes
//! (corosync, a whole node, an agent stopped) are in `freeze.rs`. Needs root;
//! elsewhere it says so and skips, and under `CI=true` a skip is a failure.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dlm_agent::client::{LockError, LockGuard, LockOptions, SessionEvent};
use dlm_agent::proto;
use dlm_core::Mode;
use support::cluster_clients::{fence_script, granted, hold, names, try_opts, wait_for};
use support::corosync::{CorosyncCluster, can_run};
use support::metric_value;

/// bpftrace on the recovery probe points of every agent process, until dropped.
struct RecoveryTracer {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl RecoveryTracer {
    /// Attaches (None, and says why, where bpftrace is missing outside CI);
    /// `agent` is locked until the probes are live.
    fn attach(agent: &support::Agent) -> Option<RecoveryTracer> {
        if std::process::Command::new("bpftrace").arg("--version").output().is_err() {
            assert!(!support::under_ci(), "bpftrace is required under CI=true (cargo xtask setup installs it)");
            eprintln!("not tracing the recovery probe points: bpftrace is not installed");
            return None;
        }
        let binary = std::fs::canonicalize(support::bin()).expect("binary path");
        let binary = binary.display();
        let script = format!(
            r#"usdt:{binary}:dlm:lock__request {{ printf("request %s\n", str(arg1)); }}
usdt:{binary}:dlm:recovery__start {{ printf("start pid=%d epoch=%d members=%d departed=%d\n", pid, arg0, arg1, arg2); }}
usdt:{binary}:dlm:recovery__phase {{ printf("phase pid=%d epoch=%d phase=%d\n", pid, arg0, arg1); }}
usdt:{binary}:dlm:recovery__done {{ printf("done pid=%d epoch=%d ns=%d departed=%d\n", pid, arg0, arg1, arg2); }}"#
        );
        let out = agent.dir.join("recovery-probes.out");
        let child = std::process::Command::new("bpftrace")
            .args(["-e", &script])
            .stdout(std::fs::File::create(&out).expect("out"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("bpftrace");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&out).unwrap_or_default().contains("request warmup") {
            assert!(Instant::now() < deadline, "bpftrace did not attach");
            agent.cli().args(["lock", "warmup", "--", "true"]).status().expect("warm-up lock");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(RecoveryTracer { child, out })
    }

    /// What it printed once `pid` printed a line with `needle`.
    fn wait_for(&self, pid: u32, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let output = std::fs::read_to_string(&self.out).unwrap_or_default();
            if output.lines().any(|l| l.contains(&format!("pid={pid} ")) && l.contains(needle)) {
                return output;
            }
            assert!(Instant::now() < deadline, "no {needle:?} from pid {pid}:\n{output}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RecoveryTracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fencing token each live agent's dump shows for a granted lock on `name`.
async fn tokens_in_dumps(cluster: &CorosyncCluster, name: &str) -> Vec<u64> {
    let mut tokens = Vec::new();
    for agent in cluster.agents.iter().flatten() {
        let client = agent.client().await;
        let resources = client.dump_all("default", Some(name.as_bytes()), 0, |_| {}).await.expect("dump");
        tokens.extend(resources.iter().flat_map(|r| r.granted.iter().map(|l| l.fencing_token)));
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_loses_only_its_clients_locks_and_their_waiters_are_granted_at_once() {
    if !can_run("an_agent_killed", true) {
        return;
    }
    let mut cluster = CorosyncCluster::start("agentkill", 3, 1000, "");
    let tracer = RecoveryTracer::attach(cluster.agent(0));
    let s1 = cluster.agent(0).client().await.session().await.expect("session");
    let s3 = cluster.agent(2).client().await.session().await.expect("session");
    let s2 = Arc::new(cluster.agent(1).client().await.session().await.expect("session"));
    let (kept_names, lost_names) = (names("kept", 8), names("lost", 8));
    let kept = hold(&s1, &kept_names).await;
    // A resource mastered on node 1 (its first locker) that node 2 holds
    // too: node 2's lock stays there through the recovery, checked by its
    // digest, not sent again.
    let shared_1 = s1.lock("default", "shared", Mode::Pr, LockOptions::default()).await.expect("granted");
    let shared_2 = s2.lock("default", "shared", Mode::Pr, LockOptions::default()).await.expect("granted");
    let lost = hold(&s3, &lost_names).await;
    let lost_tokens: Vec<u64> = lost.iter().map(LockGuard::fencing_token).collect();
    let waiters = wait_for(&s2, &lost_names);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(waiters.iter().all(|w| !w.is_finished()), "a waiter was granted while the holder lived");

    let killed = SystemTime::now();
    let log = cluster.kill_agent(2);
    std::mem::forget(lost);
    let mut latencies = Vec::new();
    for ((token, at), old) in granted(waiters, Duration::from_secs(10)).await.into_iter().zip(&lost_tokens) {
        assert!(token > *old, "a recovered resource's token went backwards: {token} after {old}");
        latencies.push(at.duration_since(killed).unwrap_or_default());
    }
    latencies.sort();
    eprintln!("agent killed: 8 waiters granted after {:?} (median) to {:?} (last)", latencies[4], latencies[7]);
    assert!(latencies[7] < Duration::from_secs(2), "an agent's exit needs no token timeout: {latencies:?}\n{log}");

    // Every other lock is still held, with the token it was granted with.
    for (guard, name) in kept.iter().zip(&kept_names) {
        let tried = s2.lock("default", name.as_str(), Mode::Ex, try_opts()).await.map(|g| g.fencing_token());
        assert!(matches!(tried, Err(LockError::NotGranted(proto::Status::WouldBlock))), "{name}: {tried:?}");
        assert_eq!(tokens_in_dumps(&cluster, name).await, [guard.fencing_token()], "{name}");
    }
    let (status, code) = cluster.status(0);
    assert_eq!((status["state"].as_str(), code), (Some("running"), 0), "{status:#}");
    assert_eq!(status["members"], serde_json::json!([1, 2]));
    // The recovery was seen at its probe points, start to done, with its epoch.
    if let Some(tracer) = &tracer {
        let pid = cluster.agent(0).child.as_ref().expect("running").id();
        let epoch = status["epoch"].as_u64().expect("epoch");
        let output = tracer.wait_for(pid, &format!("done pid={pid} epoch={epoch} "));
        assert!(output.contains(&format!("start pid={pid} epoch={epoch} members=2 departed=1")), "{output}");
        assert!(output.contains(&format!("phase pid={pid} epoch={epoch} phase=4")), "{output}");
    }
    assert_eq!(metric_value(&cluster.agent(0).metrics(), "dlm_cluster_fencing_total"), 0.0, "nothing to fence");
    assert!(metric_value(&cluster.agent(0).metrics(), "dlm_cluster_recoveries_total") >= 1.0);
    let kept_here = |text: &str| {
        let line = text.lines().find(|l| l.starts_with("dlm_cluster_recovered_locks_total{how=\"kept\"}"));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or(0.0)
    };
    assert!(kept_here(&cluster.agent(0).metrics()) >= 1.0, "node 2's lock on node 1 was not kept by its digest");
    let mut shared = tokens_in_dumps(&cluster, "shared").await;
    shared.sort_unstable();
    let mut held = vec![shared_1.fencing_token(), shared_2.fencing_token()];
    held.sort_unstable();
    assert_eq!(shared, held, "the shared resource's locks, with their tokens");

    // The agent comes back as a new process: a member again, in a new epoch.
    let before = status["epoch"].as_u64().expect("epoch");
    cluster.start_agent(2);
    let back = cluster.wait_state(0, Duration::from_secs(20), |s| s["members"] == serde_json::json!([1, 2, 3]));
    assert!(back["epoch"].as_u64() > Some(before));
    let s3 = cluster.agent(2).client().await.session().await.expect("session");
    s3.lock("default", "after-restart", Mode::Ex, LockOptions::default()).await.expect("granted on the restarted node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_fenced_before_any_of_its_locks_is_recovered() {
    if !can_run("a_lost_node_is_fenced", true) {
        return;
    }
    let dir = support::Scratch::new("fence");
    let record = dir.join("calls");
    // Fails its first call, as fence agents do when a device does not
    // answer; each call is recorded with the time it ended.
    let script = fence_script(
        &dir,
        &format!(
            "sleep 0.3\nif [ ! -e {record}.first ]; then touch {record}.first; exit 1; fi\n\
             echo \"$1 $2 $(date +%s.%N)\" >> {record}\n",
            record = record.display()
        ),
    );
    let fencing = format!("[cluster.fencing]\ncommand = [\"{}\"]\n", script.display());
    let mut cluster = CorosyncCluster::start("nodelost", 3, 500, &fencing);
    let s3 = cluster.agent(2).client().await.session().await.expect("session");
    let s1 = Arc::new(cluster.agent(0).client().await.session().await.expect("session"));
    let lost_names = names("lost", 6);
    let lost = hold(&s3, &lost_names).await;
    let waiters = wait_for(&s1, &lost_names);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let killed = SystemTime::now();
    cluster.kill_corosync(2);
    cluster.kill_agent(2);
    std::mem::forget(lost);
    // While fencing fails, status says so and exits 3.
    let waiting = cluster.wait_state(0, Duration::from_secs(10), |s| s["state"] == "waiting_for_fencing");
    assert_eq!(waiting["waiting_for_fencing"][0]["node_id"], 3, "{waiting:#}");
    assert_eq!(cluster.status(0).1, 3);
    let grants: Vec<SystemTime> =
        granted(waiters, Duration::from_secs(20)).await.into_iter().map(|(_, at)| at).collect();
    let calls = std::fs::read_to_string(&record).expect("the fencing command ran");
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 1, "fenced once after the failed attempt: {calls}");
    let fields: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(fields[..2], ["3", cluster.hosts.ip(2).as_str()]);
    let fenced_at: f64 = fields[2].parse().expect("time");
    let since_epoch = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs_f64();
    let first_grant = grants.iter().copied().map(since_epoch).fold(f64::INFINITY, f64::min);
    assert!(
        first_grant >= fenced_at,
        "a lock of the lost node was granted at {first_grant} before fencing ended at {fenced_at}"
    );
    eprintln!(
        "node lost (token 500 ms): fenced {:.3} s after the kill (one failed attempt, 0.3 s per attempt), first waiter granted {:.3} s after",
        fenced_at - since_epoch(killed),
        first_grant - since_epoch(killed)
    );
    let metrics = cluster.agent(0).metrics();
    assert_eq!(metric_value(&metrics, "dlm_cluster_fencing_total{outcome=\"failure\"}"), 1.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "dlm_cluster_fencing_total{outcome=\"success\"}"), 1.0);
    // Node 3 had told node 1 its pressure (every second) before it went, and
    // its loss is counted once, as under pressure or not by what it said.
    assert!(
        metrics.contains("dlm_cluster_peer_pressure_ratio{kind=\"some\",peer=\"3\",resource=\"memory\"}"),
        "{metrics}"
    );
    assert_eq!(metric_value(&metrics, "dlm_cluster_nodes_lost_total"), 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_fences_itself_the_majority_recovers_and_healing_brings_it_back_in_a_new_epoch() {
    if !can_run("a_partitioned_node", true) {
        return;
    }
    // The grace is computed from corosync's timeouts (1.79 s at token 500 ms).
    let cluster = CorosyncCluster::start("partition", 3, 500, "");
    let s3 = cluster.agent(2).client().await.session().await.expect("session");
    let mut revocations = s3.events();
    let s1 = Arc::new(cluster.agent(0).client().await.session().await.expect("session"));
    let cut_names = names("cut", 4);
    let held = hold(&s3, &cut_names).await;
    let handles: Vec<u64> = held.iter().map(LockGuard::handle).collect();
    let waiters = wait_for(&s1, &cut_names);
    let epoch = cluster.status(0).0["epoch"].as_u64().expect("epoch");

    let cut = SystemTime::now();
    cluster.hosts.link(2, false);
    // The cut-off node fences itself: its clients hear their locks are gone.
    let mut revoked = Vec::new();
    while revoked.len() < handles.len() {
        match tokio::time::timeout(Duration::from_secs(15), revocations.recv()).await {
            Ok(Ok(SessionEvent::Revoked { handle, .. })) => revoked.push((handle, SystemTime::now())),
            Ok(Ok(_)) => {}
            other => panic!("no revocation: {other:?}\n{}", cluster.agent(2).log()),
        }
    }
    let last_revoked = revoked.iter().map(|(_, at)| *at).max().expect("revoked");
    let fenced = cluster.wait_state(2, Duration::from_secs(5), |s| s["state"] == "fenced");
    assert_eq!(cluster.status(2).1, 4, "{fenced:#}");
    let first_grant =
        granted(waiters, Duration::from_secs(20)).await.into_iter().map(|(_, at)| at).min().expect("grants");
    assert!(first_grant > last_revoked, "the majority granted before the cut-off node had revoked");
    eprintln!(
        "partition (token 500 ms, grace computed): minority revoked {:?} after the cut, majority granted {:?} after",
        last_revoked.duration_since(cut).unwrap_or_default(),
        first_grant.duration_since(cut).unwrap_or_default()
    );
    drop(held);

    cluster.hosts.link(2, true);
    let healed = cluster.wait_state(2, Duration::from_secs(30), |s| s["state"] == "running");
    assert!(healed["epoch"].as_u64() > Some(epoch), "{healed:#}");
    assert_eq!(healed["members"], serde_json::json!([1, 2, 3]));
    let again = s3.lock("default", "after-heal", Mode::Ex, LockOptions::default()).await;
    assert!(again.is_ok(), "the healed node serves its clients without a restart: {:?}", again.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corosync_killed_under_an_agent_fences_that_agent() {
    if !can_run("corosync_killed", true) {
        return;
    }
    let mut cluster = CorosyncCluster::start("corokill", 3, 500, "");
    let s2 = cluster.agent(1).client().await.session().await.expect("session");
    let mut events = s2.events();
    let guard = s2.lock("default", "held", Mode::Ex, LockOptions::default()).await.expect("granted");
    cluster.kill_corosync(1);
    // The quorum and CPG connections break one after the other: whichever
    // is seen first fences the node; both are seen soon.
    cluster.wait_state(1, Duration::from_secs(10), |s| s["state"] == "fenced" && s["corosync_connected"] == false);
    let revoked = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert!(
        matches!(&revoked, Ok(Ok(SessionEvent::Revoked { handle, .. })) if *handle == guard.handle()),
        "{revoked:?}"
    );
    let refused = s2.lock("default", "new", Mode::Ex, try_opts()).await.map(|g| g.fencing_token());
    assert!(matches!(refused, Err(LockError::NotGranted(proto::Status::Fenced))), "{refused:?}");
    // The others go on without it (after the self-fencing grace).
    cluster.wait_state(0, Duration::from_secs(20), |s| {
        s["state"] == "running" && s["members"] == serde_json::json!([1, 3])
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_that_is_no_configured_node_and_a_peer_from_an_old_epoch_are_refused_and_counted() {
    if !can_run("bad_membership_input", true) {
        return;
    }
    // Nodes 1 and 2 know only each other; node 3's agent joins the group all the same.
    let cluster =
        CorosyncCluster::start_with_members(
            "strangers",
            3,
            1000,
            "",
            |i| {
                if i < 2 { vec![1, 2] } else { vec![1, 2, 3] }
            },
        );
    let status = cluster.wait_state(0, Duration::from_secs(10), |s| {
        s["state"] == "running" && s["members"] == serde_json::json!([1, 2])
    });
    assert_eq!(status["state"], "running");
    // Node 3's agent may join the group after that view: its refusal comes then.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = cluster.agent(0).metrics();
        if metric_value(&metrics, "dlm_membership_refused_total{reason=\"not_configured\"}") >= 1.0 {
            break metrics;
        }
        assert!(Instant::now() < deadline, "node 3 was never refused:\n{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = cluster.status(0).0;
    assert_eq!(status["members"], serde_json::json!([1, 2]), "node 3 stays out of every view: {status:#}");
    // A hello from an older epoch than node 1's, sent by hand, is refused and counted.
    let epoch = status["epoch"].as_u64().expect("epoch");
    let hello = dlm_core::cluster::wire::Hello {
        version: dlm_core::cluster::wire::VERSION,
        cluster: b"strangers".to_vec(),
        node: dlm_core::cluster::NodeId(2),
        epoch: epoch - 1,
        incarnation: 1,
    };
    let before = metric_value(&metrics, "dlm_cluster_peer_rejected_total{reason=\"wrong_epoch\"}");
    {
        // Over TLS as node 2 (its certificate): the refusal is the epoch's.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (cert, key) = cluster.pki.issue("node2");
        let address = cluster.hosts.address(0, 7400);
        let mut stream =
            support::tls_connect(&address, &cluster.pki.ca(), Some((&cert, &key)), "node1").await.expect("TLS");
        stream.write_all(&dlm_core::cluster::wire::encode_hello(&hello)).await.expect("hello");
        stream.flush().await.expect("flush");
        let mut answer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "an old epoch's hello gets no hello back: {read:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(&cluster.agent(0).metrics(), "dlm_cluster_peer_rejected_total{reason=\"wrong_epoch\"}") <= before
    {
        assert!(Instant::now() < deadline, "the old epoch's hello was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Path::new(&cluster.agent(2).socket).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_failure_while_a_change_waits_starts_it_over_and_loses_nothing_of_the_survivors() {
    if !can_run("a_second_failure_during_recovery", true) {
        return;
    }
    let mut cluster = CorosyncCluster::start("twice", 3, 1000, "");
    let s1 = cluster.agent(0).client().await.session().await.expect("session");
    let s3 = cluster.agent(2).client().await.session().await.expect("session");
    let waiter = Arc::new(cluster.agent(0).client().await.session().await.expect("session"));
    let (kept_names, lost_names) = (names("kept", 4), names("lost", 4));
    let kept = hold(&s1, &kept_names).await;
    let lost = hold(&s3, &lost_names).await;
    let waiters = wait_for(&waiter, &lost_names);
    // Node 2's agent stops (SIGSTOP): alive for corosync, silent for its peers.
    let node2 = cluster.agent(1).child.as_ref().expect("running").id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &node2]).status().expect("kill").success());
    // Node 3's agent is killed and restarted (node 1 alone would be one
    // agent of three, which grants nothing).
    cluster.kill_agent(2);
    cluster.start_agent(2);
    std::mem::forget(lost);
    // The change waits for node 2's report (corosync still counts its
    // stopped process), and node 1 says so.
    let stuck = cluster.wait_state(0, Duration::from_secs(10), |s| {
        s["state"] == "recovering" && s["view_waiting_for"] == serde_json::json!([2])
    });
    assert_eq!(cluster.status(0).1, 2, "{stuck:#}");
    assert!(waiters.iter().all(|w| !w.is_finished()), "granted before the recovery ended");
    // The second failure: node 2's agent is killed while it holds up the recovery.
    let _ = std::process::Command::new("kill").args(["-KILL", &node2]).status();
    drop(cluster.agents[1].take());
    granted(waiters, Duration::from_secs(10)).await;
    let status = cluster.wait_state(0, Duration::from_secs(10), |s| s["state"] == "running");
    assert_eq!(status["members"], serde_json::json!([1, 3]), "{status:#}");
    assert!(status["epoch"].as_u64() > stuck["epoch"].as_u64(), "a newer view took over the stuck change");
    for (guard, name) in kept.iter().zip(&kept_names) {
        // Node 1's copy, and its master's if node 3 masters it now.
        let mut tokens = tokens_in_dumps(&cluster, name).await;
        tokens.dedup();
        assert_eq!(tokens, [guard.fencing_token()], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grow_through_a_restart_of_the_whole_cluster() {
    if !can_run("tokens_grow_through_a_restart_of_the_whole_cluster", true) {
        return;
    }
    let mut cluster = CorosyncCluster::start("wholerestart", 3, 500, "");
    let all = serde_json::json!([1, 2, 3]);
    // Node 3 stops while nodes 1 and 2 go through views it never sees: its
    // generation stays below the epochs whose tokens node 1 then hands out.
    // So after the restart, node 3's own generation would not lift its
    // tokens above node 1's: only epochs later than every earlier one do.
    cluster.kill_agent(2);
    for _ in 0..3 {
        // Node 1 alone is one agent of three: it takes the view, fenced.
        cluster.kill_agent(1);
        cluster.wait_state(0, Duration::from_secs(30), |s| {
            s["state"] == "fenced" && s["members"] == serde_json::json!([1])
        });
        cluster.start_agent(1);
        cluster.wait_state(0, Duration::from_secs(30), |s| {
            s["state"] == "running" && s["members"] == serde_json::json!([1, 2])
        });
    }
    let epoch = cluster.status(0).0["epoch"].as_u64().expect("epoch");
    let before = {
        let session = cluster.agent(0).client().await.session().await.expect("session");
        let guard = session.lock("default", "r", Mode::Ex, LockOptions::default()).await.expect("granted");
        guard.fencing_token()
    };
    // Everything stops: every agent, every corosync (epochs start again).
    for i in 0..3 {
        if i < 2 {
            cluster.kill_agent(i);
        }
        cluster.kill_corosync(i);
    }
    for i in 0..3 {
        cluster.start_corosync(i);
    }
    for i in 0..3 {
        cluster.start_agent(i);
    }
    for i in 0..3 {
        let status = cluster.wait_state(i, Duration::from_secs(30), |s| s["state"] == "running" && s["members"] == all);
        assert!(
            status["epoch"].as_u64() > Some(epoch),
            "node {}: epoch after the restart {status:#}, {epoch} before",
            i + 1
        );
    }
    // Node 3 first: it masters `r` now.
    for i in [2, 0, 1] {
        let session = cluster.agent(i).client().await.session().await.expect("session");
        let guard = session.lock("default", "r", Mode::Ex, LockOptions::default()).await.expect("granted");
        let after = guard.fencing_token();
        assert!(after > before, "node {}: token {after} after the whole cluster restarted, {before} before", i + 1);
        guard.unlock().await.expect("unlock");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_only_while_the_node_is_a_quorate_member_and_its_corosync_answers() {
    if !can_run("the_watchdog", true) {
        return;
    }
    // A regular file stands for each node's /dev/watchdog: every feeding
    // writes a byte, a clean stop the magic 'V'. (softdog itself would reset
    // this machine; what is checked is what the agent writes, and when.)
    let dir = support::Scratch::new("watchdog");
    for node in 1..=3 {
        std::fs::write(dir.join(format!("wd{node}")), b"").expect("device");
    }
    let extra = format!("[cluster.fencing]\nwatchdog = \"{}/wd@NODE@\"\n", dir.display());
    let mut cluster = CorosyncCluster::start("watchdog", 3, 500, &extra);
    let fed = |node: usize| std::fs::metadata(dir.join(format!("wd{node}"))).map_or(0, |m| m.len());
    let grows = |node: usize, over: Duration| {
        let before = fed(node);
        std::thread::sleep(over);
        fed(node) > before
    };
    assert!(grows(3, Duration::from_millis(2500)), "a quorate member feeds its watchdog");

    // Cut off: the node loses quorum and stops feeding.
    cluster.hosts.link(2, false);
    cluster.wait_state(2, Duration::from_secs(10), |s| s["state"] == "fenced");
    std::thread::sleep(Duration::from_millis(1200));
    assert!(!grows(3, Duration::from_millis(2500)), "a fenced node must not feed its watchdog");
    cluster.hosts.link(2, true);
    cluster.wait_state(2, Duration::from_secs(30), |s| s["state"] == "running");
    assert!(grows(3, Duration::from_millis(2500)), "back in a quorate view, it feeds again");

    // A frozen corosync cannot tell the agent anything: the agent still
    // believes it is a quorate member, and only the watchdog notices.
    assert!(grows(2, Duration::from_millis(2500)));
    cluster.signal_corosync(1, "STOP");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!grows(2, Duration::from_millis(2500)), "a node whose corosync is frozen must stop feeding");
    cluster.signal_corosync(1, "CONT");

    // A clean stop disarms the device.
    let mut agent = cluster.agents[0].take().expect("agent 1");
    assert!(agent.terminate().success());
    let written = std::fs::read(dir.join("wd1")).expect("device");
    assert_eq!(written.last(), Some(&b'V'), "a clean stop writes the magic V");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_fencing_grace_below_what_corosync_needs_is_refused_at_start() {
    if !can_run("a_grace_below_corosync", true) {
        return;
    }
    let mut cluster = CorosyncCluster::start("lowgrace", 1, 500, "");
    cluster.kill_agent(0);
    // token 500 ms, consensus 600 ms: the floor is 1.1 s + 0.6875 s.
    let config = format!("{}\n[cluster.fencing]\nself_fence_grace = \"1s\"\n", cluster.config(0));
    let dir = support::Scratch::new("lowgrace");
    let file = dir.join("agent.toml");
    std::fs::write(&file, config).expect("config");
    let output = std::process::Command::new("timeout")
        .arg("40")
        .args(["ip", "netns", "exec", &cluster.hosts.namespaces[0], support::bin(), "run", "--no-ebpf", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("self_fence_grace = 1s is below what this corosync needs"), "{stderr}");
    assert!(stderr.contains("= 1.7875s"), "the message gives the sum: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_and_the_grace_follow_corosyncs_timeouts_when_its_configuration_is_reloaded() {
    if !can_run("timeouts_reloaded", true) {
        return;
    }
    // A grace of 2 s covers token 500 ms (floor 1.7875 s), not 1,000 ms.
    let cluster = CorosyncCluster::start("reload", 1, 500, "[cluster.fencing]\nself_fence_grace = \"2s\"\n");
    let bound = || metric_value(&cluster.agent(0).metrics(), "dlm_cluster_lease_bound_seconds");
    assert!((bound() - 0.55).abs() < 1e-9, "token 500 ms + consensus 600 ms, halved: {}", bound());
    cluster.reload_token(0, 1000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while (bound() - 1.1).abs() > 1e-9 {
        assert!(Instant::now() < deadline, "the lease kept its bound: {}\n{}", bound(), cluster.agent(0).log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = cluster.agent(0).log();
    assert!(log.contains("corosync's timeouts changed"), "{log}");
    assert!(
        log.contains("self_fence_grace = 2s is below what this corosync needs") && log.contains("using the floor"),
        "a grace below the new floor is replaced by it, and said: {log}"
    );
    // Still a quorate member that grants.
    let session = cluster.agent(0).client().await.session().await.expect("session");
    session.lock("default", "after-reload", Mode::Ex, LockOptions::default()).await.expect("granted");
}
