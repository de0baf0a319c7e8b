//! The dashboards and alert rules in `dashboards/`, checked against a real
//! Prometheus (Debian's) scraping a real agent under a workload that
//! exercises every panel: each panel's query, its variables substituted,
//! must parse and return data. A metric renamed in the agent without the
//! dashboards following fails here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dlm_agent::client::{Client, LockError, LockOptions};
use dlm_core::Mode;
use serde_json::Value;
use support::{Agent, LowMemoryCgroup, http_get};

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = dashboards_dir().join("grafana");
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .expect("dashboards/grafana")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read");
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, json)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!found.is_empty(), "no dashboard in {}", dir.display());
    found
}

/// A tool from a Debian package: missing is a skip on a developer's machine
/// (with the reason) and a failure under CI, where `cargo xtask test` installs it.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var("CI").is_err(), "{name} is required under CI (Debian package prometheus)");
        eprintln!("skipped: {name} is not installed (cargo xtask setup installs it)");
    }
    found
}

#[test]
fn dashboards_are_well_formed() {
    let mut uids = std::collections::BTreeSet::new();
    for (path, dashboard) in dashboards() {
        let name = path.display();
        let uid = dashboard["uid"].as_str().unwrap_or_else(|| panic!("{name}: no uid"));
        assert!(uids.insert(uid.to_string()), "{name}: uid {uid} is used twice");
        assert!(dashboard["title"].as_str().is_some_and(|t| t.starts_with("dlm / ")), "{name}: title");
        let variables = dashboard["templating"]["list"].as_array().expect("templating");
        assert!(
            variables
                .iter()
                .any(|v| v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"),
            "{name}: the Prometheus data source must be a template variable"
        );
        for variable in variables.iter().filter(|v| v["type"] == "query") {
            assert_eq!(variable["datasource"]["uid"], "${datasource}", "{name}: variable {}", variable["name"]);
        }
        let mut ids = std::collections::BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().unwrap_or("?");
            assert!(ids.insert(panel["id"].as_i64().expect("panel id")), "{name}: panel id {} twice", panel["id"]);
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{name}: panel {title:?} data source");
            let targets = panel["targets"]
                .as_array()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| panic!("{name}: panel {title:?} has no query"));
            for target in targets {
                assert!(
                    target["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{name}: panel {title:?} has an empty query"
                );
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{name}: panel {title:?} query data source");
            }
        }
    }
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let Some(promtool) = tool("promtool") else { return };
    let dir = dashboards_dir().join("prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "alerts.yml"],
        &["test", "rules", "alerts_test.yml"],
    ] {
        let output = Command::new(&promtool).args(args).current_dir(&dir).output().expect("promtool");
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

struct Prometheus {
    child: Child,
    address: String,
    /// Its configuration and data, removed after it is killed.
    _dir: support::Scratch,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(binary: &Path, scrape: &[&str]) -> Prometheus {
    let targets: Vec<String> = scrape.iter().map(|t| format!("\"{t}\"")).collect();
    let targets = targets.join(", ");
    let dir = support::Scratch::new("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: dlm\n    static_configs:\n      - targets: [{targets}]\n"),
    )
    .expect("config");
    let address = format!("127.0.0.1:{}", support::free_port());
    let child = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={address}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
        .spawn()
        .expect("start prometheus");
    let prometheus = Prometheus { child, address, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&prometheus.address, "/-/ready").is_none_or(|(status, _)| status != 200) {
        assert!(Instant::now() < deadline, "prometheus not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    prometheus
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn api(prometheus: &Prometheus, path: &str) -> Value {
    let (status, body) = http_get(&prometheus.address, path).expect("prometheus answers");
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if status != 200 || json["status"] != "success" {
        return serde_json::json!({ "error": format!("HTTP {status}: {body}") });
    }
    json
}

/// Whether an instant query returns at least one finite value.
fn has_data(result: &Value) -> bool {
    result["data"]["result"].as_array().is_some_and(|series| {
        series.iter().any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite))
    })
}

/// A panel query as Grafana would send it for "All" selections.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "20s")
        .replace("$instance", ".*")
        .replace("$lockspace", ".*")
        .replace("$node", ".*")
}

/// Everything the Overview dashboard shows: grants, waits, holds, blocking
/// callbacks, deadlocks, timeouts, refusals, sessions coming and going.
async fn workload(client: Client, stop: Arc<AtomicBool>) {
    let default = LockOptions::default;
    while !stop.load(Ordering::Relaxed) {
        let a = client.session().await.expect("session");
        let b = client.session().await.expect("session");
        // Contention: b waits for a (grant wait, blocking callback).
        let held = a.lock("default", "hot", Mode::Ex, default()).await.expect("lock");
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.lock("default", "hot", Mode::Ex, default()).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        held.unlock().await.expect("unlock");
        waiter.await.expect("task").expect("granted").unlock().await.expect("unlock");
        // A timeout.
        let held = a.lock("default", "slow", Mode::Ex, default()).await.expect("lock");
        let timed = b
            .lock("default", "slow", Mode::Ex, LockOptions { timeout: Some(Duration::from_millis(5)), ..default() })
            .await;
        assert!(matches!(timed, Err(LockError::NotGranted(_))));
        held.unlock().await.expect("unlock");
        // A deadlock: a holds x and wants y, b holds y and wants x.
        let x = a.lock("default", "x", Mode::Ex, default()).await.expect("lock");
        let y = b.lock("default", "y", Mode::Ex, default()).await.expect("lock");
        let a2 = a.clone();
        let crossing = tokio::spawn(async move { a2.lock("default", "y", Mode::Ex, default()).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let victim = b.lock("default", "x", Mode::Ex, default()).await;
        assert!(matches!(victim, Err(LockError::NotGranted(_))), "the youngest request is the victim");
        y.unlock().await.expect("unlock");
        crossing.await.expect("task").expect("granted").unlock().await.expect("unlock");
        // A lock held across a scrape, and a refusal.
        let _kept = a.lock("default", "kept", Mode::Pr, default()).await.expect("lock");
        let _ = b.lock("nowhere", "r", Mode::Ex, default()).await;
        x.unlock().await.expect("unlock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Locks on a resource mastered by node 2, and on short-lived resources
/// whose masters are released after a second of idleness.
async fn remote_workload(client: Client, stop: Arc<AtomicBool>) {
    let session = client.session().await.expect("session");
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        session
            .lock("default", "remote", Mode::Ex, LockOptions::default())
            .await
            .expect("remote")
            .unlock()
            .await
            .expect("unlock");
        let name = format!("short-lived-{}", round % 50);
        session
            .lock("default", name.as_str(), Mode::Ex, LockOptions::default())
            .await
            .expect("lock")
            .unlock()
            .await
            .expect("unlock");
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `kernel.bpf_stats_enabled` on for the test, restored when dropped.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> BpfStats {
        let previous = std::fs::read_to_string(Self::PATH).unwrap_or_else(|_| "0".into());
        std::fs::write(Self::PATH, "1").expect("turn on BPF run statistics (root)");
        BpfStats(previous.trim().to_owned())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// Page cache written past a 16 MiB cgroup limit, a few times: memcg
/// reclaim stalls for the Memory pressure dashboard.
fn memory_pressure() {
    let cgroup = LowMemoryCgroup::create("dashboards", 16 << 20).expect("a memory cgroup (root needed)");
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pressure-{}.bin", std::process::id()));
    for _ in 0..3 {
        cgroup.run(&format!("dd if=/dev/zero of={} bs=1M count=64 conv=fsync status=none", file.display()));
        std::thread::sleep(Duration::from_secs(5));
    }
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data_from_a_real_prometheus() {
    let Some(binary) = tool("prometheus") else { return };
    // The Contention, Memory pressure and eBPF cost dashboards need the
    // agent's eBPF programs, with BPF run statistics on for the cost panels.
    let ebpf = support::ebpf_available("the eBPF dashboards");
    let _run_stats = ebpf.then(BpfStats::enable);
    let no_ebpf = if ebpf { "false" } else { "true" };
    // Maps read every second, so the first stalls show up within the scrapes.
    // The agent is node 1 of a 2-node cluster, for the Cluster dashboard: a
    // second agent (without eBPF) masters a resource node 1's clients use.
    // Every eBPF family is on: the Contention dashboard's futex and off-CPU
    // panels need the opt-in `futex` and `sched` families.
    let peers = support::free_ports(2);
    let pki = support::TestPki::new("dashboards");
    let cluster = |id: u16| {
        format!(
            "[ebpf]\ninterval = \"1s\"\nfamilies = [\"locks\", \"futex\", \"sched\", \"holders\", \"memory\"]\n[cluster]\nname = \"dashboards\"\nnode_id = {id}\nrelease_delay = \"1s\"\n\
             [[cluster.member]]\nid = 1\naddress = \"127.0.0.1:{}\"\n[[cluster.member]]\nid = 2\naddress = \"127.0.0.1:{}\"\n{}",
            peers[0],
            peers[1],
            pki.tls_section(&format!("node{id}"))
        )
    };
    let (config1, config2) = (cluster(1), cluster(2));
    let starting = std::thread::spawn(move || Agent::start("dashboards-node2", &config2));
    let agent = Agent::start_with_env("dashboards", &config1, &[("DLM_NO_EBPF", no_ebpf.into())]);
    let node2 = starting.join().expect("node 2 starts");
    let pressure = ebpf.then(|| tokio::task::spawn_blocking(memory_pressure));
    let prometheus = start_prometheus(&binary, &[&agent.http, &node2.http]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload(agent.client().await, stop.clone()));
    // Node 2 masters "remote" (it locks it first and keeps an NL lock), and
    // a client of node 1 takes it over and over: remote requests, remote
    // grant waits, peer traffic. Idle resources come and go on both nodes.
    let keeper = node2.client().await.session().await.expect("session");
    let _kept = keeper.lock("default", "remote", Mode::Nl, LockOptions::default()).await.expect("nl");
    let remote_load = tokio::spawn(remote_workload(agent.client().await, stop.clone()));

    // Enough scrapes for 20 s rate windows to hold two samples with traffic.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrapes = api(
            &prometheus,
            &format!("/api/v1/query?query={}", url_encode("count_over_time(up{job=\"dlm\"}[1m]) >= 6")),
        );
        if has_data(&scrapes) {
            break;
        }
        assert!(Instant::now() < deadline, "prometheus did not scrape the agent:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut failures = Vec::new();
    let mut checked = 0;
    for (path, dashboard) in dashboards() {
        let file = path.file_name().expect("name").to_string_lossy().into_owned();
        if !ebpf && ["dlm-contention.json", "dlm-memory.json", "dlm-ebpf-cost.json"].contains(&file.as_str()) {
            eprintln!("not checking {file}: its metrics come from eBPF, which is not available here");
            continue;
        }
        for variable in
            dashboard["templating"]["list"].as_array().expect("variables").iter().filter(|v| v["type"] == "query")
        {
            // label_values(SELECTOR, LABEL) → the label's values among the selector's series.
            let definition = variable["definition"].as_str().expect("definition");
            let inner =
                definition.strip_prefix("label_values(").and_then(|d| d.strip_suffix(')')).expect("label_values(…)");
            let (selector, label) = inner.rsplit_once(',').expect("two arguments");
            let path =
                format!("/api/v1/label/{}/values?match[]={}", label.trim(), url_encode(&substitute(selector.trim())));
            let values = api(&prometheus, &path);
            checked += 1;
            if values["data"].as_array().is_none_or(Vec::is_empty) {
                failures.push(format!("{file}: variable {} ({definition}) has no values: {values}", variable["name"]));
            }
        }
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = substitute(target["expr"].as_str().expect("expr"));
                let result = api(&prometheus, &format!("/api/v1/query?query={}", url_encode(&expr)));
                checked += 1;
                if !has_data(&result) {
                    failures.push(format!("{file}: panel {:?} query {expr}\n  -> {result}", panel["title"]));
                }
            }
        }
    }
    if let Some(out) = std::env::var_os("DLM_DASHBOARD_DATA") {
        // `cargo xtask dashboards`: keep the workload going a while longer,
        // then save each panel's series for dashboards/render.py to plot.
        tokio::time::sleep(Duration::from_secs(40)).await;
        save_panel_series(&prometheus, Path::new(&out));
    }
    stop.store(true, Ordering::Relaxed);
    load.await.expect("workload");
    remote_load.await.expect("remote workload");
    if let Some(pressure) = pressure {
        pressure.await.expect("memory pressure");
    }
    assert!(failures.is_empty(), "{} of {checked} queries returned no data:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{checked} dashboard queries returned data");
}

/// Writes `<uid>.json` per dashboard: each panel's title, unit, type and
/// the range results of its queries over the last minute.
fn save_panel_series(prometheus: &Prometheus, out: &Path) {
    std::fs::create_dir_all(out).expect("output directory");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    for (_, dashboard) in dashboards() {
        let panels: Vec<Value> = dashboard["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .map(|panel| {
                let targets: Vec<Value> = panel["targets"]
                    .as_array()
                    .expect("targets")
                    .iter()
                    .map(|target| {
                        let expr = substitute(target["expr"].as_str().expect("expr"));
                        let path = format!("/api/v1/query_range?query={}&start={}&end={now}&step=1", url_encode(&expr), now - 60);
                        serde_json::json!({ "legend": target["legendFormat"], "result": api(prometheus, &path)["data"]["result"] })
                    })
                    .collect();
                serde_json::json!({
                    "title": panel["title"], "type": panel["type"],
                    "unit": panel["fieldConfig"]["defaults"]["unit"], "targets": targets,
                })
            })
            .collect();
        let uid = dashboard["uid"].as_str().expect("uid");
        let data = serde_json::json!({ "uid": uid, "title": dashboard["title"], "panels": panels });
        std::fs::write(out.join(format!("{uid}.json")), serde_json::to_string_pretty(&data).expect("json"))
            .expect("write");
    }
}
