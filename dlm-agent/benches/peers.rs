//! dlm side by side with Redis and etcd, in one run, on this machine.
//!
//! `cargo xtask bench` (or `cargo bench -p dlm-agent --bench peers`) starts a
//! dlm agent, a Redis server and an etcd server on loopback, then measures
//! each on the same workloads:
//! - uncontended lock+unlock pairs/s at concurrency 1, 8, 32, 128 (each
//!   client its own connection and its own resource);
//! - latency p50/p99 of a lock+unlock pair at concurrency 1;
//! - 8 clients on one resource (dlm and etcd queue; Redis clients retry, at
//!   once, and again with a 1 ms pause between attempts);
//! - a holder that dies: how long until the waiter has the lock;
//! - for scale, the floor: a Unix-socket round trip between two processes.
//!
//! dlm is measured three ways: `dlm-unix` (the client library's default on
//! the Unix socket, framed sessions), `dlm-unix-grpc` (gRPC session streams
//! on the same socket, as a client in another language would use it) and
//! `dlm-tcp` (gRPC over TCP).
//!
//! The Redis lock is the usual single-instance one: `SET key token NX PX ttl`
//! to take it, a compare-and-delete Lua script to release it. The etcd lock is
//! its own `Lock`/`Unlock` API with a lease per client.
//!
//! The agent runs without its eBPF programs (they would slow every process on
//! the machine, the peers' too); `DLM_BENCH_EBPF=1` measures with them.
//!
//! Without `--bench` (as `cargo test --benches` runs it) every cell is short:
//! a check that the harness and the peers work, not a measurement.

#[path = "common/services.rs"]
mod services;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlm_agent::client::{Client, LockOptions, Target};
use dlm_core::Mode;
use services::{
    BoxError, Etcd, LockHeld, LockSystem, Redis, Result, Server, abandoned_holder, free_port, start_etcd, start_redis,
    wait_for_port,
};

/// How long each cell runs.
struct Plan {
    warmup: Duration,
    measure: Duration,
    concurrency: Vec<usize>,
    /// TTL of the Redis key and the etcd lease: how long a dead holder blocks.
    ttl: Duration,
}

// ----- the systems -----

struct Dlm {
    name: &'static str,
    target: Target,
    /// Sessions as gRPC streams even on the Unix socket (as other
    /// languages' clients open them), instead of framed sessions.
    grpc_sessions: bool,
}

impl LockSystem for Dlm {
    type Conn = dlm_agent::client::Session;
    fn name(&self) -> &'static str {
        self.name
    }
    async fn connect(&self) -> Result<Self::Conn> {
        let client = Client::connect(&self.target).await?;
        let client = if self.grpc_sessions { client.with_grpc_sessions() } else { client };
        Ok(client.session().await?)
    }
    async fn lock(&self, conn: &mut Self::Conn, key: &str) -> Result<LockHeld> {
        Ok(LockHeld::Dlm(conn.lock("default", key, Mode::Ex, LockOptions::default()).await?))
    }
    async fn unlock(&self, _: &mut Self::Conn, held: LockHeld) -> Result<()> {
        let LockHeld::Dlm(guard) = held else { return Err("not a dlm lock".into()) };
        Ok(guard.unlock().await?)
    }
}

// ----- the workloads -----

struct Cell {
    pairs_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `clients` clients lock and unlock for the plan's time; all on `shared_key`
/// if given, else each on its own key.
async fn pairs<S: LockSystem>(system: &Arc<S>, plan: &Plan, clients: usize, shared_key: Option<&str>) -> Result<Cell> {
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
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    latencies.sort_by(f64::total_cmp);
    let quantile =
        |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    Ok(Cell {
        pairs_per_s: latencies.len() as f64 / plan.measure.as_secs_f64(),
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
    })
}

/// A dlm holder is a real process (`dlm-agent lock … -- sleep`) killed with
/// SIGKILL; the time is from the kill to the waiter's grant.
async fn dlm_killed_holder(agent: &DlmAgent) -> Result<Duration> {
    let mut holder = Command::new(BIN)
        .args(["lock", "--socket"])
        .arg(&agent.socket)
        .args(["killed", "--", "sleep", "60"])
        .stdout(Stdio::null())
        .spawn()?;
    let client = Client::connect(&Target::Unix(agent.socket.clone())).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump = client
            .dump(dlm_agent::proto::DumpRequest {
                lockspace: "default".into(),
                name: Some(b"killed".to_vec()),
                max_resources: 1,
                ..dlm_agent::proto::DumpRequest::default()
            })
            .await?;
        if dump.resources.first().is_some_and(|r| !r.granted.is_empty()) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the holder never got the lock".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let session = client.session().await?;
    let waiter = tokio::spawn(async move {
        let guard = session.lock("default", "killed", Mode::Ex, LockOptions::default()).await;
        (guard.is_ok(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let killed = Instant::now();
    holder.kill()?;
    holder.wait()?;
    let (granted, at) = waiter.await?;
    if !granted {
        return Err("the waiter was not granted".into());
    }
    Ok(at.saturating_duration_since(killed))
}

// ----- the servers -----

const BIN: &str = env!("CARGO_BIN_EXE_dlm-agent");

struct DlmAgent {
    _server: Server,
    socket: PathBuf,
    tcp: String,
}

async fn start_dlm(dir: &Path) -> Result<DlmAgent> {
    let socket = dir.join("dlm.sock");
    let port = free_port()?;
    let tcp = format!("127.0.0.1:{port}");
    // The agent's eBPF programs trace every context switch on the machine,
    // Redis's and etcd's too: they are off unless DLM_BENCH_EBPF=1 asks to
    // measure everything under them.
    let ebpf = std::env::var("DLM_BENCH_EBPF").is_ok_and(|v| v == "1");
    // Plain TCP, as Redis and etcd are measured here: the comparison is of
    // the lock services, not of TLS (whose cost the cluster bench measures).
    let config = dir.join("dlm.toml");
    std::fs::write(&config, "[tls]\ninsecure = true\n")?;
    let child = Command::new(BIN)
        .args(["run", "--http", "off", "--tcp", &tcp, "--log", "warn", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("dlm-state"))
        .env("DLM_NO_EBPF", if ebpf { "false" } else { "true" })
        .stderr(std::fs::File::create(dir.join("dlm.log"))?)
        .spawn()?;
    let server = Server { child };
    wait_for_port(port, "dlm-agent").await?;
    Ok(DlmAgent { _server: server, socket, tcp })
}

// ----- the report -----

#[derive(Default)]
struct Row {
    label: String,
    unit: &'static str,
    /// Larger is better (throughput) or smaller is (latency, time to grant).
    higher_is_better: bool,
    values: Vec<(String, f64)>,
}

fn print_table(rows: &[Row], systems: &[&str]) {
    print!("{:<52}", "workload");
    for system in systems {
        print!("{system:>15}");
    }
    // Every other system against dlm's default (framed sessions, Unix socket).
    for peer in &systems[1..] {
        print!("{:>22}", format!("dlm vs {peer}"));
    }
    println!();
    for row in rows {
        print!("{:<52}", format!("{} ({})", row.label, row.unit));
        let value = |name: &str| row.values.iter().find(|(s, _)| s == name).map(|(_, v)| *v);
        for system in systems {
            match value(system) {
                Some(v) if v >= 100.0 => print!("{v:>15.0}"),
                Some(v) => print!("{v:>15.2}"),
                None => print!("{:>15}", "-"),
            }
        }
        let dlm = value("dlm-unix");
        for peer in &systems[1..] {
            match (dlm, value(peer)) {
                (Some(dlm), Some(peer)) if dlm > 0.0 && peer > 0.0 => {
                    let ratio = if row.higher_is_better { dlm / peer } else { peer / dlm };
                    print!("{:>22}", format!("{ratio:.2}x"));
                }
                _ => print!("{:>22}", "-"),
            }
        }
        println!();
    }
    println!(
        "(ratios: how many times better dlm-unix (framed sessions on the Unix socket) is; above 1 means it is ahead)"
    );
}

fn write_json(rows: &[Row], floor_us: f64, path: &Path) -> Result<()> {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "workload": row.label,
                "unit": row.unit,
                "higher_is_better": row.higher_is_better,
                "values": row.values.iter().map(|(s, v)| (s.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let json = serde_json::json!({ "rows": rows, "unix_round_trip_p50_us": floor_us });
    std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

// ----- the floor -----

/// A Unix-socket ping-pong of 16 bytes between this process and a child
/// (this binary again, as an echo server): round trips in µs, sorted. No
/// lock service can answer faster than this on the machine; a queued
/// hand-off costs at least one (grant to the waiter, its unlock back).
async fn unix_round_trips(dir: &Path, count: usize) -> Result<Vec<f64>> {
    let path = dir.join("echo.sock");
    let mut child = Command::new(std::env::current_exe()?).arg(ECHO_SERVER).arg(&path).spawn()?;
    let result = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(error) => return Err(error.into()),
            }
        };
        let mut buffer = [7u8; 16];
        let mut trips = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            stream.write_all(&buffer)?;
            stream.read_exact(&mut buffer)?;
            trips.push(start.elapsed().as_secs_f64() * 1e6);
        }
        trips.sort_by(f64::total_cmp);
        Ok(trips)
    })
    .await?;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The argument that makes this binary the echo server of [`unix_round_trips`].
const ECHO_SERVER: &str = "--echo-server";

fn echo_server(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let (mut stream, _) = listener.accept()?;
    let mut buffer = [0u8; 16];
    while stream.read_exact(&mut buffer).is_ok() {
        stream.write_all(&buffer)?;
    }
    Ok(())
}

// ----- main -----

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(ECHO_SERVER) {
        let path = PathBuf::from(args.get(2).cloned().unwrap_or_default());
        std::process::exit(i32::from(echo_server(&path).is_err()));
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    let plan = if measuring {
        Plan {
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(3),
            concurrency: vec![1, 8, 32, 128],
            ttl: Duration::from_secs(2),
        }
    } else {
        Plan {
            warmup: Duration::ZERO,
            measure: Duration::from_millis(200),
            concurrency: vec![1, 8],
            ttl: Duration::from_secs(2),
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if let Err(error) = runtime.block_on(run(plan, measuring)) {
        eprintln!("peers benchmark failed: {error}");
        std::process::exit(1);
    }
}

async fn run(plan: Plan, measuring: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("dlm-bench-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let agent = start_dlm(&dir).await?;
    let (_redis_server, redis_address) = start_redis(&dir).await?;
    let (_etcd_server, etcd_endpoint) = start_etcd(&dir).await?;

    let unix = Target::Unix(agent.socket.clone());
    let dlm_unix = Arc::new(Dlm { name: "dlm-unix", target: unix.clone(), grpc_sessions: false });
    let dlm_unix_grpc = Arc::new(Dlm { name: "dlm-unix-grpc", target: unix, grpc_sessions: true });
    let dlm_tcp = Arc::new(Dlm { name: "dlm-tcp", target: Target::Tcp(agent.tcp.clone()), grpc_sessions: false });
    let ttl_ms = plan.ttl.as_millis().to_string();
    let redis = Arc::new(Redis { address: redis_address.clone(), ttl_ms: ttl_ms.clone(), retry_delay: None });
    let redis_polite = Arc::new(Redis { address: redis_address, ttl_ms, retry_delay: Some(Duration::from_millis(1)) });
    // The throughput cells run longer than a short lease: their clients get
    // a long one; only the dead-holder cell uses the short TTL.
    let etcd = Arc::new(Etcd { endpoint: etcd_endpoint.clone(), ttl_s: 600 });
    let etcd_short_lease =
        Arc::new(Etcd { endpoint: etcd_endpoint, ttl_s: i64::try_from(plan.ttl.as_secs()).unwrap_or(2).max(1) });
    let systems = ["dlm-unix", "dlm-unix-grpc", "dlm-tcp", "redis", "etcd"];
    // DLM_BENCH_SYSTEMS=dlm-unix,redis runs only those (for quick comparisons while tuning).
    let only = std::env::var("DLM_BENCH_SYSTEMS").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|list| list.split(',').any(|s| s.trim() == name));

    let mut rows = Vec::new();
    let cells = plan.concurrency.len() * systems.len() + systems.len() + 5;
    let mut done = 0usize;
    let mut progress = |what: &str| {
        done += 1;
        eprintln!("[{done:>2}/{cells}] {what}");
    };

    let mut latency_p50 = Row { label: "lock+unlock latency p50, 1 client".into(), unit: "µs", ..Row::default() };
    let mut latency_p99 = Row { label: "lock+unlock latency p99, 1 client".into(), unit: "µs", ..Row::default() };
    for &clients in &plan.concurrency {
        let mut row = Row {
            label: format!("uncontended pairs/s, {clients} clients"),
            unit: "pairs/s",
            higher_is_better: true,
            ..Row::default()
        };
        macro_rules! measure {
            ($system:expr) => {{
                if wanted($system.name()) {
                    progress(&format!("{} uncontended, {clients} clients", $system.name()));
                    let cell = pairs(&$system, &plan, clients, None).await?;
                    row.values.push(($system.name().to_string(), cell.pairs_per_s));
                    if clients == 1 {
                        latency_p50.values.push(($system.name().to_string(), cell.p50_us));
                        latency_p99.values.push(($system.name().to_string(), cell.p99_us));
                    }
                }
            }};
        }
        measure!(dlm_unix);
        measure!(dlm_unix_grpc);
        measure!(dlm_tcp);
        measure!(redis);
        measure!(etcd);
        rows.push(row);
    }
    rows.push(latency_p50);
    rows.push(latency_p99);

    let mut contended = Row {
        label: "contended pairs/s, 8 clients, 1 resource".into(),
        unit: "pairs/s",
        higher_is_better: true,
        ..Row::default()
    };
    macro_rules! contend {
        ($system:expr) => {{
            if wanted($system.name()) {
                progress(&format!("{} contended, 8 clients on one resource", $system.name()));
                let cell = pairs(&$system, &plan, 8, Some("hot")).await?;
                contended.values.push(($system.name().to_string(), cell.pairs_per_s));
            }
        }};
    }
    contend!(dlm_unix);
    contend!(dlm_unix_grpc);
    contend!(dlm_tcp);
    contend!(redis);
    contend!(etcd);
    let dlm_contended = contended.values.iter().find(|(s, _)| s == "dlm-unix").cloned();
    rows.push(contended);
    if wanted("redis") {
        // The same with Redis clients pausing 1 ms between attempts, as real
        // clients do (and more briefly than their defaults).
        progress("redis contended, clients retrying every 1 ms");
        let cell = pairs(&redis_polite, &plan, 8, Some("hot-polite")).await?;
        let mut row = Row {
            label: "contended, Redis retry after 1 ms".into(),
            unit: "pairs/s",
            higher_is_better: true,
            ..Row::default()
        };
        row.values.extend(dlm_contended);
        row.values.push(("redis".into(), cell.pairs_per_s));
        rows.push(row);
    }

    let mut killed = Row { label: "dead holder -> waiter granted".into(), unit: "ms", ..Row::default() };
    if wanted("dlm-unix") {
        progress("dlm: holder process killed with SIGKILL");
        killed.values.push(("dlm-unix".into(), dlm_killed_holder(&agent).await?.as_secs_f64() * 1e3));
    }
    if wanted("redis") {
        progress(&format!("redis: holder gone, key TTL {} ms", plan.ttl.as_millis()));
        killed.values.push(("redis".into(), abandoned_holder(&redis).await?.as_secs_f64() * 1e3));
    }
    if wanted("etcd") {
        progress(&format!("etcd: holder gone, lease TTL {} s", etcd_short_lease.ttl_s));
        killed.values.push(("etcd".into(), abandoned_holder(&etcd_short_lease).await?.as_secs_f64() * 1e3));
    }
    rows.push(killed);

    progress("floor: Unix socket round trip between two processes");
    let trips = unix_round_trips(&dir, if measuring { 20_000 } else { 1_000 }).await?;
    let floor_us = trips[trips.len() / 2];

    println!();
    print_table(&rows, &systems);
    println!(
        "floor: a Unix socket round trip between two processes, p50 {floor_us:.1} µs \
         (a lock+unlock pair needs two, a queued hand-off one)"
    );
    if measuring {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/peers.json");
        write_json(&rows, floor_us, &path)?;
        println!("written to {}", path.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
