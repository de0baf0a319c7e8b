//! dlm side by side with Redis and etcd, in one run, on this machine.
//!
//! `cargo xtask bench` (or `cargo bench -p dlm-agent --bench peers`) starts a
//! dlm agent, a Redis server and an etcd server on loopback, then measures
//! each on the same workloads, in two placements of the threads:
//! - **unpinned**: every process (servers and the clients, which run in this
//!   process) may run on every CPU, where the scheduler puts it;
//! - **one CPU**: the servers and the clients all on CPU 0, so that a reply
//!   never waits for another CPU to wake (on this kind of VM a cross-CPU
//!   wake-up costs tens of µs, a same-CPU switch a few).
//!
//! In each placement, and repeated (interleaved, `DLM_BENCH_REPS`, default 3):
//! - uncontended lock+unlock pairs/s at concurrency 1, 8, 32, 128 (each
//!   client its own connection and its own resource);
//! - latency p50/p99 of a lock+unlock pair at concurrency 1, and the CPU
//!   each side used per pair (the server's, and this process's: the
//!   client's);
//! - 8 clients on one resource (dlm and etcd queue; Redis clients retry at
//!   once, and again with a 1 ms pause between attempts): hand-offs/s, the
//!   hand-offs per CPU-second of every process involved (the server and
//!   this process, whose only busy threads are the clients), how far the
//!   client with the most or fewest grants is from the mean, and p99 of a
//!   pair (its wait included);
//! - the floors: a 16-byte Unix-socket ping-pong between two processes, the
//!   same ping-pong rung on two eventfds (the wake-ups of a transport whose
//!   bytes go through shared memory, not the kernel), and beside the uncontended rows `echo`, the same clients making two 16-byte
//!   round trips per pair to a one-threaded server that only echoes (what
//!   the sockets, wake-ups and the clients' runtime allow in that placement,
//!   with no lock work at all).
//!
//! Each cell is reported as the median of its runs with the lowest and
//! highest, and each ratio against a peer as the ratio of medians with the
//! worst ratio the spread allows beside it. Then, once, a holder that dies:
//! how long until the waiter has the lock.
//!
//! dlm is measured three ways: `dlm-unix` (the client library's default on
//! the Unix socket, framed sessions through shared-memory rings;
//! `DLM_CLIENT_RINGS=0` in this process's environment measures them on the
//! socket), `dlm-unix-grpc` (gRPC session streams
//! on the same socket, as a client in another language would use it) and
//! `dlm-tcp` (gRPC over TCP).
//!
//! The Redis lock is the usual single-instance one: `SET key token NX PX ttl`
//! to take it, a compare-and-delete Lua script to release it, measured over
//! loopback TCP (`redis`, the peer the targets were first set against) and
//! over the server's Unix socket (`redis-unix`, the socket `dlm-unix`
//! connects to); the targets are checked against both. The etcd lock is its own
//! `Lock`/`Unlock` API with a lease per client.
//!
//! The agent runs without its eBPF programs (they would slow every process on
//! the machine, the peers' too); `DLM_BENCH_EBPF=1` measures with them. It
//! spins up to 50 µs before parking while requests flow (`DLM_SPIN_US`,
//! unless the environment sets it), and dlm's clients spin for a due answer
//! (the client library's default): the report says both, and the CPU they
//! burn is in its CPU rows.
//!
//! Every system's clients run in this process, on one tokio runtime of as
//! many worker threads as CPUs (tokio's default; `DLM_BENCH_CLIENT_WORKERS`
//! sets another count). The count matters on a 2-CPU VM: measured in one
//! sitting (12-07), dlm-unix made 103k pairs/s at 1 client unpinned with one
//! worker against 60-61k with two, and 44k contended hand-offs/s (32k per
//! CPU-second) against 41k (27k); on one CPU the count changed nothing.
//!
//! For quick comparisons while tuning, `DLM_BENCH_CLIENTS=1,8` measures
//! only those uncontended rows (empty: the contended row alone) and
//! `DLM_BENCH_PLACEMENTS=unpinned` (or `one-cpu`) one placement.
//!
//! Without `--bench` (as `cargo test --benches` runs it) every cell is short
//! and runs once: a check that the harness, the placements and the peers
//! work, not a measurement.

#[path = "common/services.rs"]
mod services;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlm_agent::client::Target;
use services::{
    BoxError, Etcd, LockSystem, Redis, Result, abandoned_holder, redis_unix_address, start_etcd, start_redis,
};

/// How long each cell runs, and how often.
struct Plan {
    warmup: Duration,
    measure: Duration,
    concurrency: Vec<usize>,
    /// Runs of every cell in each placement.
    reps: usize,
    /// Round trips of the floor's ping-pong per run.
    trips: usize,
    /// TTL of the Redis key and the etcd lease: how long a dead holder blocks.
    ttl: Duration,
}

// ----- the systems, and where threads run -----

#[path = "peers/dlm.rs"]
mod dlm;
use dlm::{Dlm, DlmAgent, agent_spin_us, dlm_killed_holder, start_dlm};

#[path = "peers/placement.rs"]
mod placement;
use placement::{Placement, client_workers, cpu_seconds, online_cpus, place};

// ----- the workloads -----

struct Cell {
    pairs_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU of the server and of this process (the clients) over the
    /// measured time.
    server_cpu_s: f64,
    client_cpu_s: f64,
    /// How far the client with the most or the fewest pairs is from the
    /// mean, in per cent.
    share_off_pct: f64,
}

/// `clients` clients lock and unlock for the plan's time; all on `shared_key`
/// if given, else each on its own key. `server` is the server's pid, whose
/// CPU is counted with this process's.
async fn pairs<S: LockSystem>(
    system: &Arc<S>,
    plan: &Plan,
    clients: usize,
    shared_key: Option<&str>,
    server: u32,
) -> Result<Cell> {
    let start = Instant::now() + plan.warmup;
    let end = start + plan.measure;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let system = system.clone();
        let key = shared_key.map_or_else(|| format!("bench/{}/{client}", system.name()), str::to_string);
        let mut conn = system.connect().await?;
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let held = system.lock(&mut conn, &key).await?;
                system.unlock(&mut conn, held).await?;
                if began >= start {
                    latencies.push(began.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok::<_, BoxError>(latencies)
        });
    }
    let cpu = |_: ()| (cpu_seconds(server), cpu_seconds(std::process::id()));
    tokio::time::sleep_until(start.into()).await;
    let cpu_before = cpu(());
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = cpu(());
    let mut latencies = Vec::new();
    let mut counts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let mine = done??;
        counts.push(mine.len() as f64);
        latencies.extend(mine);
    }
    latencies.sort_by(f64::total_cmp);
    let quantile =
        |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    let mean = counts.iter().sum::<f64>() / counts.len().max(1) as f64;
    let share_off_pct = counts.iter().map(|c| (c - mean).abs() / mean.max(1.0) * 100.0).fold(0.0, f64::max);
    Ok(Cell {
        pairs_per_s: latencies.len() as f64 / plan.measure.as_secs_f64(),
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
        server_cpu_s: cpu_after.0 - cpu_before.0,
        client_cpu_s: cpu_after.1 - cpu_before.1,
        share_off_pct,
    })
}

// ----- the report -----

#[path = "peers/report.rs"]
mod report;
use report::{CONTENDED, DLM, Measured, P50, PER_CPU, Row, SHARE, SYSTEMS, print_table, print_targets, write_json};

// ----- the floor -----

#[path = "peers/floor.rs"]
mod floor;
use floor::{
    ECHO_MANY, ECHO_SERVER, EVENTFD_ECHO, Echo, echo_many, echo_server, eventfd_echo, eventfd_round_trip_p50,
    start_echo, unix_round_trip_p50,
};

// ----- main -----

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(ECHO_SERVER) {
        let path = PathBuf::from(args.get(2).cloned().unwrap_or_default());
        std::process::exit(i32::from(echo_server(&path).is_err()));
    }
    if args.get(1).map(String::as_str) == Some(EVENTFD_ECHO) {
        let fd = |i: usize| args.get(i).and_then(|fd| fd.parse().ok()).unwrap_or(-1);
        std::process::exit(i32::from(eventfd_echo(fd(2), fd(3)).is_err()));
    }
    if args.get(1).map(String::as_str) == Some(ECHO_MANY) {
        let path = PathBuf::from(args.get(2).cloned().unwrap_or_default());
        std::process::exit(i32::from(echo_many(&path).is_err()));
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    // Taken before any placement narrows this process's CPUs.
    let _ = online_cpus();
    let reps = std::env::var("DLM_BENCH_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(3usize).max(1);
    let plan = if measuring {
        Plan {
            warmup: Duration::from_millis(300),
            measure: Duration::from_secs(2),
            concurrency: concurrency(&[1, 8, 32, 128]),
            reps,
            trips: 20_000,
            ttl: Duration::from_secs(2),
        }
    } else {
        Plan {
            warmup: Duration::ZERO,
            measure: Duration::from_millis(200),
            concurrency: concurrency(&[1, 8]),
            reps: 1,
            trips: 1_000,
            ttl: Duration::from_secs(2),
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_workers())
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(error) = runtime.block_on(run(plan, measuring)) {
        eprintln!("peers benchmark failed: {error}");
        std::process::exit(1);
    }
}

/// The uncontended rows' client counts: `DLM_BENCH_CLIENTS` (`1,8`; empty:
/// none, the contended row alone), else `default`. For quick comparisons
/// while tuning: the targets want every row.
fn concurrency(default: &[usize]) -> Vec<usize> {
    match std::env::var("DLM_BENCH_CLIENTS") {
        Ok(list) => list.split(',').filter_map(|n| n.trim().parse().ok()).filter(|&n| n > 0).collect(),
        Err(_) => default.to_vec(),
    }
}

/// The placements measured: `DLM_BENCH_PLACEMENTS` (`unpinned`, `one-cpu`
/// or both, comma-separated), else both.
fn placements() -> Vec<Placement> {
    let wanted = std::env::var("DLM_BENCH_PLACEMENTS").ok();
    [Placement::Unpinned, Placement::OneCpu]
        .into_iter()
        .filter(|p| wanted.as_deref().is_none_or(|list| list.split(',').any(|w| w.trim() == p.key())))
        .collect()
}

/// The servers and the systems measured on them.
struct Bench {
    plan: Plan,
    agent: DlmAgent,
    redis_pid: u32,
    etcd_pid: u32,
    dlm_unix: Arc<Dlm>,
    dlm_unix_grpc: Arc<Dlm>,
    dlm_tcp: Arc<Dlm>,
    redis: Arc<Redis>,
    /// The same server on its Unix socket, as dlm-unix is measured.
    redis_unix: Arc<Redis>,
    redis_polite: Arc<Redis>,
    etcd: Arc<Etcd>,
    /// The uncontended rows' floor: a server that only echoes.
    echo: Arc<Echo>,
    echo_pid: u32,
    /// The systems to measure (`DLM_BENCH_SYSTEMS=dlm-unix,redis` for quick
    /// comparisons while tuning).
    only: Option<String>,
}

impl Bench {
    fn wanted(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|list| list.split(',').any(|s| s.trim() == name))
    }

    /// Every cell of one placement, `plan.reps` times (interleaved).
    async fn measure(&self, placement: Placement, dir: &Path, progress: &mut impl FnMut(&str)) -> Result<Measured> {
        let cpus = placement.cpus();
        for pid in [self.agent.pid, self.redis_pid, self.etcd_pid, self.echo_pid, std::process::id()] {
            place(pid, &cpus)?;
        }
        let mut rows: Vec<Row> = Vec::new();
        let mut floor_us = Vec::new();
        let mut eventfd_floor_us = Vec::new();
        let label = |clients: usize| format!("uncontended pairs/s, {clients} clients");
        for &clients in &self.plan.concurrency {
            rows.push(Row::new(label(clients), "pairs/s", true));
        }
        rows.push(Row::new(P50, "µs", false));
        rows.push(Row::new("lock+unlock latency p99, 1 client", "µs", false));
        rows.push(Row::new("1 client: the server's CPU per pair", "µs", false));
        rows.push(Row::new("1 client: the client's CPU per pair", "µs", false));
        rows.push(Row::new(CONTENDED, "pairs/s", true));
        rows.push(Row::new(PER_CPU, "pairs/CPU-s", true));
        rows.push(Row::new(SHARE, "%", false));
        rows.push(Row::new("contended: pair p99, wait included", "µs", false));
        rows.push(Row::new("contended, Redis retrying after 1 ms", "pairs/s", true));
        let index = |rows: &[Row], label: &str| rows.iter().position(|r| r.label == label).expect("a row");
        for rep in 1..=self.plan.reps {
            let what = |cell: &str| format!("[{} {rep}/{}] {cell}", placement.name(), self.plan.reps);
            progress(&what("floor: Unix socket round trip between two processes"));
            floor_us.push(unix_round_trip_p50(dir, self.plan.trips, &cpus).await?);
            progress(&what("floor: eventfd round trip between two processes"));
            eventfd_floor_us.push(eventfd_round_trip_p50(self.plan.trips, &cpus).await?);
            for &clients in &self.plan.concurrency {
                let row = index(&rows, &label(clients));
                macro_rules! uncontended {
                    ($system:expr, $pid:expr) => {{
                        let system = $system.name();
                        if self.wanted(system) {
                            progress(&what(&format!("{system} uncontended, {clients} clients")));
                            let cell = pairs(&$system, &self.plan, clients, None, $pid).await?;
                            rows[row].add(system, cell.pairs_per_s);
                            if clients == 1 {
                                let p50 = index(&rows, P50);
                                rows[p50].add(system, cell.p50_us);
                                rows[p50 + 1].add(system, cell.p99_us);
                                // CPU per pair, each side's: where the time goes.
                                let pairs = (cell.pairs_per_s * self.plan.measure.as_secs_f64()).max(1.0);
                                rows[p50 + 2].add(system, cell.server_cpu_s / pairs * 1e6);
                                rows[p50 + 3].add(system, cell.client_cpu_s / pairs * 1e6);
                            }
                        }
                    }};
                }
                uncontended!(self.dlm_unix, self.agent.pid);
                uncontended!(self.dlm_unix_grpc, self.agent.pid);
                uncontended!(self.dlm_tcp, self.agent.pid);
                uncontended!(self.redis, self.redis_pid);
                uncontended!(self.redis_unix, self.redis_pid);
                uncontended!(self.etcd, self.etcd_pid);
                uncontended!(self.echo, self.echo_pid);
            }
            let contended = index(&rows, CONTENDED);
            macro_rules! contend {
                ($system:expr, $pid:expr) => {{
                    let system = $system.name();
                    if self.wanted(system) {
                        progress(&what(&format!("{system} contended, 8 clients on one resource")));
                        let cell = pairs(&$system, &self.plan, 8, Some("hot"), $pid).await?;
                        rows[contended].add(system, cell.pairs_per_s);
                        let cpu = cell.server_cpu_s + cell.client_cpu_s;
                        let per_cpu = cell.pairs_per_s * self.plan.measure.as_secs_f64() / cpu.max(1e-3);
                        rows[contended + 1].add(system, per_cpu);
                        rows[contended + 2].add(system, cell.share_off_pct);
                        rows[contended + 3].add(system, cell.p99_us);
                    }
                }};
            }
            contend!(self.dlm_unix, self.agent.pid);
            contend!(self.dlm_unix_grpc, self.agent.pid);
            contend!(self.dlm_tcp, self.agent.pid);
            contend!(self.redis, self.redis_pid);
            contend!(self.redis_unix, self.redis_pid);
            contend!(self.etcd, self.etcd_pid);
            if self.wanted("redis") {
                // Redis clients pausing 1 ms between attempts, as real
                // clients do (and more briefly than their defaults); dlm's
                // contended figure beside it.
                progress(&what("redis contended, clients retrying every 1 ms"));
                let cell = pairs(&self.redis_polite, &self.plan, 8, Some("hot-polite"), self.redis_pid).await?;
                let polite = index(&rows, "contended, Redis retrying after 1 ms");
                rows[polite].add("redis", cell.pairs_per_s);
                if let Some(&dlm) = rows[contended].runs.get(DLM).and_then(|runs| runs.last()) {
                    rows[polite].add(DLM, dlm);
                }
            }
        }
        Ok(Measured { placement, rows, floor_us, eventfd_floor_us })
    }
}

async fn run(plan: Plan, measuring: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("dlm-bench-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let agent = start_dlm(&dir).await?;
    let (redis_server, redis_address) = start_redis(&dir).await?;
    let (etcd_server, etcd_endpoint) = start_etcd(&dir).await?;
    let echo_socket = dir.join("echo-many.sock");
    let echo_server = start_echo(&echo_socket).await?;

    let unix = Target::Unix(agent.socket.clone());
    let ttl_ms = plan.ttl.as_millis().to_string();
    let bench = Bench {
        dlm_unix: Arc::new(Dlm { name: "dlm-unix", target: unix.clone(), grpc_sessions: false }),
        dlm_unix_grpc: Arc::new(Dlm { name: "dlm-unix-grpc", target: unix, grpc_sessions: true }),
        dlm_tcp: Arc::new(Dlm { name: "dlm-tcp", target: Target::Tcp(agent.tcp.clone()), grpc_sessions: false }),
        redis: Arc::new(Redis { address: redis_address.clone(), ttl_ms: ttl_ms.clone(), retry_delay: None }),
        redis_unix: Arc::new(Redis { address: redis_unix_address(&dir), ttl_ms: ttl_ms.clone(), retry_delay: None }),
        redis_polite: Arc::new(Redis { address: redis_address, ttl_ms, retry_delay: Some(Duration::from_millis(1)) }),
        // The throughput cells run longer than a short lease: their clients
        // get a long one; only the dead-holder cell uses the short TTL.
        etcd: Arc::new(Etcd { endpoint: etcd_endpoint.clone(), ttl_s: 600 }),
        redis_pid: redis_server.child.id(),
        etcd_pid: etcd_server.child.id(),
        echo: Arc::new(Echo { socket: echo_socket }),
        echo_pid: echo_server.child.id(),
        agent,
        only: std::env::var("DLM_BENCH_SYSTEMS").ok(),
        plan,
    };
    let placements = placements();
    // Every system in each uncontended row; all but the echo floor contended;
    // the ping-pong floor and Redis retrying politely.
    let per_placement = bench.plan.reps * (bench.plan.concurrency.len() * SYSTEMS.len() + SYSTEMS.len() - 1 + 2);
    let cells = placements.len() * per_placement + 3;
    let mut done = 0usize;
    let mut progress = |what: &str| {
        done += 1;
        eprintln!("[{done:>3}/{cells}] {what}");
    };
    let mut all = Vec::new();
    for placement in placements {
        all.push(bench.measure(placement, &dir, &mut progress).await?);
    }
    // Back to every CPU for the dead holder.
    for pid in [bench.agent.pid, bench.redis_pid, bench.etcd_pid, bench.echo_pid, std::process::id()] {
        place(pid, &Placement::Unpinned.cpus())?;
    }
    let mut killed = Row::new("dead holder -> waiter granted (unpinned, once)", "ms", false);
    if bench.wanted(DLM) {
        progress("dlm: holder process killed with SIGKILL");
        killed.add(DLM, dlm_killed_holder(&bench.agent).await?.as_secs_f64() * 1e3);
    }
    if bench.wanted("redis") {
        progress(&format!("redis: holder gone, key TTL {} ms", bench.plan.ttl.as_millis()));
        killed.add("redis", abandoned_holder(&bench.redis).await?.as_secs_f64() * 1e3);
    }
    if bench.wanted("etcd") {
        let short_lease = Arc::new(Etcd {
            endpoint: etcd_endpoint,
            ttl_s: i64::try_from(bench.plan.ttl.as_secs()).unwrap_or(2).max(1),
        });
        progress(&format!("etcd: holder gone, lease TTL {} s", short_lease.ttl_s));
        killed.add("etcd", abandoned_holder(&short_lease).await?.as_secs_f64() * 1e3);
    }

    println!(
        "\ndlm's spins: the agent up to {} µs before it parks while requests flow (DLM_SPIN_US), each client \
         session up to {} µs for a due answer while it is its process's only one waiting (DLM_CLIENT_SPIN_US); \
         neither on one CPU. The CPU they burn is in the CPU rows. Every system's clients run in this \
         process on one tokio runtime of {} worker threads (DLM_BENCH_CLIENT_WORKERS).",
        agent_spin_us(),
        dlm_agent::client::answer_spin().as_micros(),
        client_workers()
    );
    for measured in &all {
        print_table(measured);
    }
    println!("\n{}:", killed.label);
    for system in [DLM, "redis", "etcd"] {
        if let Some((ms, _, _)) = killed.spread(system) {
            println!("  {system:<10} {ms:>8.1} ms");
        }
    }
    println!(
        "\n(ratios: how many times better dlm-unix (framed sessions on the Unix socket) is, of the medians, with \
         the worst its spread allows; above 1 means it is ahead. {} runs of each cell per placement, {:?} each)",
        bench.plan.reps, bench.plan.measure
    );
    print_targets(&all);
    if measuring {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/peers.json");
        write_json(&all, &killed, &path)?;
        println!("written to {}", path.display());
    }
    drop((redis_server, etcd_server, echo_server));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
