//! Failover, measured side by side in one run: how long after a lock's
//! holder is gone a waiter on another node has it.
//!
//! `cargo bench -p dlm-tests --bench failover` (part of `cargo xtask bench`;
//! needs root and corosync) starts three nodes, each a network namespace with
//! its own corosync and agent, and a Redis and an etcd server on loopback,
//! then measures, each several times:
//! - **agent killed**: the holder's agent on node 3 is killed with SIGKILL;
//!   a waiter on node 1 waits for the lock;
//! - **node lost**: node 3's corosync and agent are killed together (as a
//!   node that loses power); the fencing command is `true`, so the figure is
//!   detection + fencing's bookkeeping + recovery, not a fence device's time;
//! - **Redis**: a holder that stops without unlocking; the waiter retries
//!   `SET NX` every millisecond until the key's TTL ends it;
//! - **etcd**: the same with etcd's lock API and a lease of the TTL asked
//!   (etcd raises a lease to its minimum TTL, about 2 s with its default
//!   election timeout);
//! - **recovery of many locks**: `LOCKS` locks held by clients of all three
//!   nodes, node 3's agent killed: the survivors' recovery time
//!   (`dlm_cluster_recovery_seconds`), and the waiter's.
//!
//! The medians of the runs are printed with their spread (min–max) and as
//! ratios to dlm's agent-killed figure, and written to
//! `target/bench/failover.json`. Every process is unpinned: on a 2-CPU
//! machine the agents, corosync daemons, Redis, etcd and the benchmark share
//! both CPUs. Without
//! `--bench` (as `cargo test --benches` runs it) each is measured once, with
//! fewer locks: a check that the harness works, not a measurement.

#[path = "../../dlm-agent/benches/common/services.rs"]
mod services;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlm_agent::client::{LockOptions, Session};
use dlm_core::Mode;
use serde_json::json;
use services::{Etcd, Redis, Result, abandoned_holder, start_etcd, start_redis};
use support::corosync::{CorosyncCluster, can_run};
use support::metric_value;

/// corosync's token in this benchmark (ms): the LAN tuning the README
/// discusses; a lost node is noticed after about twice this.
const TOKEN_MS: u32 = 300;
/// knet's ping interval and pong timeout (ms) at that token.
const KNET_PING: (u32, u32) = (75, 1000);
/// The Redis key's TTL and the etcd lease asked for.
const TTL: Duration = Duration::from_secs(1);

struct Plan {
    runs: usize,
    locks: usize,
}

fn median_and_spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

/// Holds `name` from `holder`, has `waiter` wait for it, runs `fail`, and
/// returns the time from `fail` to the grant.
async fn failover(holder: &Session, waiter: Arc<Session>, name: &str, fail: impl FnOnce()) -> Result<Duration> {
    let held = holder.lock("default", name, Mode::Ex, LockOptions::default()).await?;
    let name = name.to_string();
    let waiting = tokio::spawn(async move {
        let granted = waiter.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await;
        let granted = granted.map(|guard| {
            // Held until the run ends: the agent unlocks it with the session.
            std::mem::forget(guard);
        });
        (granted.is_ok(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let failed = Instant::now();
    fail();
    std::mem::forget(held);
    let (granted, at) = tokio::time::timeout(Duration::from_secs(30), waiting).await??;
    if !granted {
        return Err("the waiter was not granted".into());
    }
    Ok(at.saturating_duration_since(failed))
}

/// Waits until node 1 runs in a view of all three.
fn wait_all_back(cluster: &CorosyncCluster) {
    cluster.wait_state(0, Duration::from_secs(60), |s| s["state"] == "running" && s["members"] == json!([1, 2, 3]));
    cluster.wait_state(2, Duration::from_secs(60), |s| s["state"] == "running");
}

async fn run(plan: &Plan) -> Result<()> {
    // Dropped last, after the servers writing in it.
    let dir = support::Scratch::new("failover-bench");
    let (_redis_server, redis_address) = start_redis(&dir).await?;
    let (_etcd_server, etcd_endpoint) = start_etcd(&dir).await?;
    let redis = Arc::new(Redis {
        address: redis_address,
        ttl_ms: TTL.as_millis().to_string(),
        retry_delay: Some(Duration::from_millis(1)),
    });
    let etcd = Arc::new(Etcd { endpoint: etcd_endpoint, ttl_s: i64::try_from(TTL.as_secs()).unwrap_or(1) });
    // At a 300-ms token knet's ping timers are set (the README's "A tight
    // token needs knet's ping timers set"): else a link drops every ~8 s.
    let fencing = "[cluster.fencing]\ncommand = [\"true\"]\n";
    let mut cluster = CorosyncCluster::start_with_knet_ping("failover", 3, TOKEN_MS, KNET_PING, fencing);
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("agent killed", Vec::new()),
        ("node lost", Vec::new()),
        ("redis (key TTL)", Vec::new()),
        ("etcd (lease TTL)", Vec::new()),
    ];
    for run in 0..plan.runs {
        eprintln!("failover: run {} of {}", run + 1, plan.runs);
        let waiter = Arc::new(cluster.agent(0).client().await.session().await?);
        let holder = cluster.agent(2).client().await.session().await?;
        let took = failover(&holder, waiter.clone(), &format!("agent-{run}"), || {
            cluster.kill_agent(2);
        })
        .await?;
        rows[0].1.push(took.as_secs_f64() * 1e3);
        cluster.start_agent(2);
        wait_all_back(&cluster);

        let holder = cluster.agent(2).client().await.session().await?;
        let took = failover(&holder, waiter.clone(), &format!("node-{run}"), || {
            cluster.kill_corosync(2);
            cluster.kill_agent(2);
        })
        .await?;
        rows[1].1.push(took.as_secs_f64() * 1e3);
        cluster.start_corosync(2);
        cluster.start_agent(2);
        wait_all_back(&cluster);
        rows[2].1.push(abandoned_holder(&redis).await?.as_secs_f64() * 1e3);
        rows[3].1.push(abandoned_holder(&etcd).await?.as_secs_f64() * 1e3);
    }
    let (survivors, waiter) = many_locks(&mut cluster, plan.locks).await?;
    let label = format!("{} locks held, agent killed: waiter", plan.locks);
    report(
        &rows,
        plan,
        &[(format!("{} locks held, agent killed: survivors' recovery", plan.locks), survivors), (label, waiter)],
    )
}

/// Recovery with `locks` locks held by clients of every node: node 3's agent
/// is killed; returns the survivors' recovery times and the time a waiter
/// for one of node 3's resources waited (ms).
async fn many_locks(cluster: &mut CorosyncCluster, locks: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    eprintln!("failover: taking {locks} locks over 3 nodes");
    let mut held = Vec::new();
    let mut tasks = Vec::new();
    const SESSIONS_PER_NODE: usize = 4;
    for node in 0..3 {
        for s in 0..SESSIONS_PER_NODE {
            let session = cluster.agent(node).client().await.session().await?;
            let count = locks / 3 / SESSIONS_PER_NODE;
            tasks.push(tokio::spawn(async move {
                let mut guards = Vec::with_capacity(count);
                for i in 0..count {
                    let name = format!("bulk-{node}-{s}-{i}");
                    guards.push(session.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await?);
                }
                Ok::<_, dlm_agent::client::LockError>((session, guards))
            }));
        }
    }
    for task in tasks {
        held.push(task.await??);
    }
    let recovery = |cluster: &CorosyncCluster, i: usize| {
        let metrics = cluster.agent(i).metrics();
        (
            metric_value(&metrics, "dlm_cluster_recovery_seconds_sum"),
            metric_value(&metrics, "dlm_cluster_recovery_seconds_count"),
        )
    };
    let before = [recovery(cluster, 0), recovery(cluster, 1)];
    let waiter = Arc::new(cluster.agent(0).client().await.session().await?);
    let name = "bulk-2-0-0".to_string();
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            (waiter.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await.is_ok(), Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Instant::now();
    cluster.kill_agent(2);
    let (granted, at) = tokio::time::timeout(Duration::from_secs(60), waiting).await??;
    if !granted {
        return Err("the waiter was not granted".into());
    }
    let waited = at.saturating_duration_since(killed).as_secs_f64() * 1e3;
    let mut survivors = Vec::new();
    for (i, (sum, count)) in before.into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (sum_now, count_now) = recovery(cluster, i);
            if count_now > count {
                survivors.push((sum_now - sum) / (count_now - count) * 1e3);
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("node {}'s recovery never ended", i + 1).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Node 3's sessions went with its agent; the others' locks go now.
    drop(held);
    Ok((survivors, vec![waited]))
}

fn report(rows: &[(&str, Vec<f64>)], plan: &Plan, recovery: &[(String, Vec<f64>)]) -> Result<()> {
    let dlm = rows.first().map(|(_, v)| v.clone()).unwrap_or_default();
    let (dlm_median, _, _) = median_and_spread(&mut dlm.clone());
    println!("{:<40} {:>12} {:>20} {:>12}", "holder gone -> waiter granted", "median ms", "min-max ms", "x agent");
    let mut json_rows = Vec::new();
    for (label, values) in rows {
        let (median, min, max) = median_and_spread(&mut values.clone());
        println!("{label:<40} {median:>12.1} {:>20} {:>12.1}", format!("{min:.1}-{max:.1}"), median / dlm_median);
        json_rows
            .push(json!({"label": label, "median_ms": median, "min_ms": min, "max_ms": max, "runs": values.len()}));
    }
    for (label, values) in recovery {
        let (median, min, max) = median_and_spread(&mut values.clone());
        println!("{label:<60} {median:>8.1} ms ({min:.1}-{max:.1}, {} values)", values.len());
        json_rows
            .push(json!({"label": label, "median_ms": median, "min_ms": min, "max_ms": max, "runs": values.len()}));
    }
    // cargo runs a benchmark in its package's directory: the workspace's target is one up.
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    let json = json!({"token_ms": TOKEN_MS, "ttl_ms": TTL.as_millis() as u64, "runs": plan.runs, "rows": json_rows});
    std::fs::write(out.join("failover.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

fn main() {
    if !can_run("the failover benchmark", true) {
        return;
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    let plan = if measuring { Plan { runs: 5, locks: 100_000 } } else { Plan { runs: 1, locks: 3_000 } };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if let Err(error) = runtime.block_on(run(&plan)) {
        eprintln!("failover benchmark failed: {error}");
        std::process::exit(1);
    }
}
