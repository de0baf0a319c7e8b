//! How dlm's costs grow with the cluster: 3, 5 and 8 nodes, each a network
//! namespace with its own corosync and agent, measured the same way at each
//! size and printed in one table, so that a reader sees the growth.
//!
//! `cargo bench -p dlm-tests --bench scale` (part of `cargo xtask bench`;
//! needs root and corosync). At each size:
//! - **remote pair**: a client on node 1 takes EX and releases it, over and
//!   over, on 16 resources mastered on node 2 (node 2 locked them first):
//!   each lock and each unlock is a round trip between the two agents;
//!   p50 and p99 of the pair;
//! - **pairs/s, every node**: 4 clients on every node, each taking and
//!   releasing EX on resources of its own (mastered on its own node), all
//!   at once; the total;
//! - **pairs/s, spread**: the same, each client's resources first locked by
//!   a client of the next node (so mastered there): every request crosses
//!   the network;
//! - **recovery after an agent is lost**: every node's clients hold
//!   `LOCKS` locks in all, half of them on resources mastered on another
//!   node; the last node's agent is killed (SIGKILL) while a client of node
//!   1 waits for one of its locks: the time from the kill to that grant,
//!   and the survivors' recovery time as they measured it
//!   (`dlm_cluster_recovery_seconds`, the slowest survivor).
//!
//! Each figure is the median of `RUNS` runs (the recovery, one per size)
//! with the lowest and highest; all in `target/bench/scale.json`. Every
//! process is unpinned: on a 2-CPU machine the agents, the corosync daemons
//! and the benchmark's clients share both CPUs, so the growth includes the
//! CPUs shared by more agents, as a larger real cluster would not (each node
//! has its own). Without `--bench` (as `cargo test --benches` runs it) only 3
//! nodes, briefly: a check that the harness works, not a measurement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlm_agent::client::{LockGuard, LockOptions, Session};
use dlm_core::Mode;
use serde_json::json;
use support::corosync::{CorosyncCluster, can_run};
use support::metric_value;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// corosync's token (ms). Not the failover benchmark's 300: with every
/// node's clients saturating both CPUs, a 300 ms token was missed and a
/// node fenced itself mid-run (a membership change, not a measurement).
const TOKEN_MS: u32 = 1000;
/// Clients per node in the throughput cells.
const CLIENTS: usize = 4;

struct Plan {
    sizes: Vec<usize>,
    runs: usize,
    pairs: usize,
    measure: Duration,
    locks: usize,
}

/// Median, lowest and highest.
type Spread = (f64, f64, f64);

/// A row of the table: its label, and its figure at each size.
type Row = (String, Vec<(usize, Spread)>);

fn spread(values: &mut [f64]) -> Spread {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

async fn session(cluster: &CorosyncCluster, node: usize) -> Result<Session> {
    Ok(cluster.agent(node).client().await.session().await?)
}

/// p50 and p99 (µs) of `pairs` lock+unlock pairs from node 1 on resources
/// node 2 masters.
async fn remote_pair(cluster: &CorosyncCluster, plan: &Plan, run: usize) -> Result<(f64, f64)> {
    let master = session(cluster, 1).await?;
    let names: Vec<String> = (0..16).map(|i| format!("remote-{run}-{i}")).collect();
    let mut keep = Vec::new();
    for name in &names {
        keep.push(master.lock("default", name.as_str(), Mode::Nl, LockOptions::default()).await?);
    }
    let client = session(cluster, 0).await?;
    let mut latencies = Vec::with_capacity(plan.pairs);
    for i in 0..plan.pairs {
        let name = &names[i % names.len()];
        let began = Instant::now();
        let guard = client.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await?;
        guard.unlock().await?;
        latencies.push(began.elapsed().as_secs_f64() * 1e6);
    }
    for guard in keep {
        guard.unlock().await?;
    }
    let (p50, _, _) = spread(&mut latencies);
    let p99 = latencies[((latencies.len() - 1) as f64 * 0.99).round() as usize];
    Ok((p50, p99))
}

/// Pairs/s of `CLIENTS` clients on every node at once; `spread_masters`:
/// each client's resources are first locked from the next node.
async fn every_node(cluster: &CorosyncCluster, n: usize, plan: &Plan, run: usize, spread_masters: bool) -> Result<f64> {
    let mut keep: Vec<LockGuard> = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now() + Duration::from_millis(500);
    let end = start + plan.measure;
    for node in 0..n {
        let owner = session(cluster, (node + 1) % n).await?;
        for c in 0..CLIENTS {
            let name = format!("every-{spread_masters}-{run}-{node}-{c}");
            if spread_masters {
                // Node + 1 masters it: its NL lock stays until the end.
                keep.push(owner.lock("default", name.as_str(), Mode::Nl, LockOptions::default()).await?);
            }
            let client = session(cluster, node).await?;
            tasks.spawn(async move {
                let mut done = 0u64;
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    let guard = client.lock("default", name.as_str(), Mode::Ex, LockOptions::default()).await?;
                    guard.unlock().await?;
                    if began >= start {
                        done += 1;
                    }
                }
                Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(done)
            });
        }
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done??;
    }
    for guard in keep {
        guard.unlock().await?;
    }
    Ok(total as f64 / plan.measure.as_secs_f64())
}

/// Locks held on every node, the last node's agent killed: (ms to the
/// waiter's grant, the slowest survivor's recovery in ms).
async fn recovery(cluster: &mut CorosyncCluster, n: usize, plan: &Plan) -> Result<(f64, f64)> {
    let sessions: Vec<Arc<Session>> = {
        let mut all = Vec::new();
        for node in 0..n {
            all.push(Arc::new(session(cluster, node).await?));
        }
        all
    };
    let per_node = plan.locks / n;
    let mut held = Vec::new();
    for (node, session) in sessions.iter().enumerate() {
        for i in 0..per_node {
            // Half on resources of its own, half first locked (and so
            // mastered) by the next node, which keeps a NL lock there.
            let name = format!("held-{node}-{i}");
            if i % 2 == 1 {
                let next = &sessions[(node + 1) % n];
                held.push(next.lock("default", name.as_str(), Mode::Nl, LockOptions::default()).await?);
            }
            held.push(session.lock("default", name.as_str(), Mode::Pr, LockOptions::default()).await?);
        }
    }
    let before: Vec<(f64, f64)> = (0..n - 1)
        .map(|i| {
            let metrics = cluster.agent(i).metrics();
            (
                metric_value(&metrics, "dlm_cluster_recovery_seconds_sum"),
                metric_value(&metrics, "dlm_cluster_recovery_seconds_count"),
            )
        })
        .collect();
    let last = n - 1;
    let wanted = format!("held-{last}-0");
    let waiter = sessions[0].clone();
    let waiting = tokio::spawn(async move {
        let granted = waiter.lock("default", wanted.as_str(), Mode::Ex, LockOptions::default()).await;
        (granted.map(std::mem::forget).is_ok(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Instant::now();
    let _ = cluster.kill_agent(last);
    let (granted, at) = tokio::time::timeout(Duration::from_secs(60), waiting).await??;
    if !granted {
        return Err("the waiter was not granted".into());
    }
    let waited = at.saturating_duration_since(killed).as_secs_f64() * 1e3;
    // The survivors' own measure of the recovery (the last one each made).
    let mut slowest: f64 = 0.0;
    for (i, (sum, count)) in before.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = cluster.agent(i).metrics();
            let (sum_now, count_now) = (
                metric_value(&metrics, "dlm_cluster_recovery_seconds_sum"),
                metric_value(&metrics, "dlm_cluster_recovery_seconds_count"),
            );
            if count_now > *count {
                slowest = slowest.max((sum_now - sum) / (count_now - count) * 1e3);
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("node {} never finished a recovery", i + 1).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    std::mem::forget(held);
    Ok((waited, slowest))
}

async fn run(plan: &Plan) -> Result<()> {
    let mut table: Vec<Row> = vec![
        ("remote lock+unlock pair p50 (µs)".into(), Vec::new()),
        ("remote lock+unlock pair p99 (µs)".into(), Vec::new()),
        (format!("pairs/s, {CLIENTS} clients on every node, own resources"), Vec::new()),
        (format!("pairs/s, {CLIENTS} clients on every node, resources of the next node"), Vec::new()),
        (format!("agent killed -> waiter granted (ms), {} locks held", plan.locks), Vec::new()),
        ("survivors' recovery, slowest (ms)".into(), Vec::new()),
    ];
    for &n in &plan.sizes {
        eprintln!("{n} nodes: starting {n} corosync daemons and agents");
        let mut cluster = CorosyncCluster::start(&format!("scale{n}"), n, TOKEN_MS, "");
        let (mut p50, mut p99, mut own, mut spread_rate) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..plan.runs {
            eprintln!("{n} nodes, run {}/{}: remote pairs, then every node's clients", run + 1, plan.runs);
            let (a, b) = remote_pair(&cluster, plan, run).await?;
            p50.push(a);
            p99.push(b);
            own.push(every_node(&cluster, n, plan, run, false).await?);
            spread_rate.push(every_node(&cluster, n, plan, run, true).await?);
        }
        eprintln!("{n} nodes: {} locks held, the last agent killed", plan.locks);
        let (waited, slowest) = recovery(&mut cluster, n, plan).await?;
        for (row, values) in table.iter_mut().zip([p50, p99, own, spread_rate, vec![waited], vec![slowest]]) {
            let mut values = values;
            row.1.push((n, spread(&mut values)));
        }
        drop(cluster);
    }
    print!("\n{:<72}", "median (lowest-highest), by nodes");
    for n in &plan.sizes {
        print!("{:>24}", format!("{n} nodes"));
    }
    println!();
    for (label, cells) in &table {
        print!("{label:<72}");
        for (_, (median, low, high)) in cells {
            print!("{:>24}", format!("{median:.0} ({low:.0}-{high:.0})"));
        }
        println!();
    }
    println!(
        "({} runs per size, the recovery once; every process unpinned on {} CPUs shared by every node)",
        plan.runs,
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    );
    if std::env::args().any(|a| a == "--bench") {
        let rows: Vec<serde_json::Value> = table
            .iter()
            .map(|(label, cells)| {
                json!({
                    "workload": label,
                    "by_nodes": cells.iter().map(|(n, (median, low, high))| json!({
                        "nodes": n, "median": median, "min": low, "max": high,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/scale.json");
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        std::fs::write(&path, serde_json::to_string_pretty(&json!({ "rows": rows, "token_ms": TOKEN_MS }))?)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

fn main() {
    if !can_run("the scale benchmark", true) {
        return;
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    let plan = if measuring {
        Plan { sizes: vec![3, 5, 8], runs: 3, pairs: 3000, measure: Duration::from_secs(2), locks: 4000 }
    } else {
        Plan { sizes: vec![3], runs: 1, pairs: 200, measure: Duration::from_millis(300), locks: 300 }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if let Err(error) = runtime.block_on(run(&plan)) {
        eprintln!("scale benchmark failed: {error}");
        std::process::exit(1);
    }
}
