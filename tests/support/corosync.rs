//! Clusters of real nodes on one machine: each node a network namespace on
//! a bridge (so its link can be cut), with its own corosync daemon (in a
//! private mount namespace: corosync 3.1.7 keeps its pid file and state at
//! fixed paths) and its own agent taking membership from it.
//!
//! Needs root, `ip` and `corosync` ([`can_run`] says why not, and fails
//! under `CI=true`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Agent, TestPki, bin, under_ci};

/// The corosync configuration template (`@…@` fields), shared with `cargo xtask cluster up`.
pub const COROSYNC_CONF: &str = include_str!("../corosync/corosync.conf.in");

/// Whether this machine can make network namespaces (and, with
/// `corosync`, run corosync daemons in them); says why not (a failure under `CI=true`).
#[must_use]
pub fn can_run(test: &str, corosync: bool) -> bool {
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let has = |program: &str, arg: &str| Command::new(program).arg(arg).output().is_ok_and(|o| o.status.success());
    let reason = if !root {
        "network namespaces and corosync daemons need root"
    } else if !has("ip", "-V") {
        "the ip command (iproute2) is missing"
    } else if corosync && !has("corosync", "-v") {
        "corosync is not installed (cargo xtask setup installs it)"
    } else {
        return true;
    };
    assert!(!under_ci(), "CI=true and {test} cannot run: {reason}");
    eprintln!("skipped {test}: {reason}");
    false
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// Namespaces, veth pairs and a bridge made for one test, removed on drop.
pub struct Hosts {
    bridge: String,
    /// Node `i + 1`'s namespace at index `i`.
    pub namespaces: Vec<String>,
    /// The host end of node `i + 1`'s veth pair: down cuts the node off.
    pub veths: Vec<String>,
    subnet: String,
}

impl Hosts {
    /// `n` hosts on a new bridge, each with its own subnet address.
    #[must_use]
    pub fn make(n: usize) -> Hosts {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = (std::process::id() + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % 10_000;
        let hosts = Hosts {
            bridge: format!("dlmb{id}"),
            namespaces: (1..=n).map(|i| format!("dlmt{id}-{i}")).collect(),
            veths: (1..=n).map(|i| format!("dlmv{id}-{i}")).collect(),
            subnet: format!("10.{}.{}", 80 + id / 250 % 40, id % 250),
        };
        ip(&["link", "add", &hosts.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}.254/24", hosts.subnet), "dev", &hosts.bridge]);
        ip(&["link", "set", &hosts.bridge, "up"]);
        for (i, (ns, veth)) in hosts.namespaces.iter().zip(&hosts.veths).enumerate() {
            ip(&["netns", "add", ns]);
            ip(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            ip(&["link", "set", veth, "master", &hosts.bridge, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{}.{}/24", hosts.subnet, i + 1), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// Node `i + 1`'s address.
    #[must_use]
    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// Node `i + 1`'s address with `port`.
    #[must_use]
    pub fn address(&self, i: usize, port: u16) -> String {
        format!("{}:{port}", self.ip(i))
    }

    /// Cuts node `i + 1` off (`up == false`) or brings it back.
    pub fn link(&self, i: usize, up: bool) {
        ip(&["link", "set", &self.veths[i], if up { "up" } else { "down" }]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// One corosync cluster at a time in a test process: each is 3 corosync
/// daemons and agents with timing-sensitive faults, and several at once on
/// a 2-CPU machine make their timings the machine's load rather than theirs.
struct Turn;

static BUSY: (std::sync::Mutex<bool>, std::sync::Condvar) = (std::sync::Mutex::new(false), std::sync::Condvar::new());

impl Turn {
    fn take() -> Turn {
        let mut busy = BUSY.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *busy {
            busy = BUSY.1.wait(busy).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *busy = true;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        *BUSY.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        BUSY.1.notify_one();
    }
}

/// Nodes with corosync and an agent each.
pub struct CorosyncCluster {
    /// The namespaces (dropped last: the processes go first).
    pub hosts: Hosts,
    dir: crate::Scratch,
    corosync: Vec<Option<Child>>,
    /// Node `i + 1`'s agent at index `i`, while it runs.
    pub agents: Vec<Option<Agent>>,
    configs: Vec<String>,
    tag: String,
    /// The CA of the members' certificates (their links are TLS).
    pub pki: TestPki,
    /// Held for the cluster's life (dropped last).
    _turn: Turn,
}

impl CorosyncCluster {
    /// `n` nodes, corosync's token `token_ms`, `extra` added to every
    /// agent's `[cluster]` section (before its members; `@NODE@` in it is the
    /// node's id), each agent running in a view of all.
    #[must_use]
    pub fn start(tag: &str, n: usize, token_ms: u32, extra: &str) -> CorosyncCluster {
        let cluster = CorosyncCluster::start_with_members(tag, n, token_ms, extra, |_| (1..=n).collect());
        cluster.wait_all_running(n);
        cluster
    }

    /// As [`CorosyncCluster::start`], with knet's ping timers set to
    /// `knet_ping` (interval, pong timeout, in ms) instead of corosync's,
    /// which it derives from the token (a pong timeout of half the token:
    /// 150 ms at a 300-ms token, which this machine's knet sends pings
    /// slower than — see the README's "Memory pressure").
    #[must_use]
    pub fn start_with_knet_ping(
        tag: &str,
        n: usize,
        token_ms: u32,
        knet_ping: (u32, u32),
        extra: &str,
    ) -> CorosyncCluster {
        let cluster =
            CorosyncCluster::start_configured(tag, n, token_ms, Some(knet_ping), extra, |_| (1..=n).collect());
        cluster.wait_all_running(n);
        cluster
    }

    /// Waits until each of the `n` agents runs in a view of all.
    fn wait_all_running(&self, n: usize) {
        let all: Vec<Value> = (1..=n).map(Value::from).collect();
        for i in 0..n {
            self.wait_state(i, Duration::from_secs(30), |s| {
                s["state"] == "running" && s["members"].as_array() == Some(&all)
            });
        }
    }

    /// As [`CorosyncCluster::start`], each agent configured with the members
    /// `members_of(i)` gives, and without waiting for any view.
    #[must_use]
    pub fn start_with_members(
        tag: &str,
        n: usize,
        token_ms: u32,
        extra: &str,
        members_of: impl Fn(usize) -> Vec<usize>,
    ) -> CorosyncCluster {
        CorosyncCluster::start_configured(tag, n, token_ms, None, extra, members_of)
    }

    fn start_configured(
        tag: &str,
        n: usize,
        token_ms: u32,
        knet_ping: Option<(u32, u32)>,
        extra: &str,
        members_of: impl Fn(usize) -> Vec<usize>,
    ) -> CorosyncCluster {
        let turn = Turn::take();
        let hosts = Hosts::make(n);
        let dir = crate::Scratch::new(&format!("corosync-{tag}"));
        let nodes: String = (0..n)
            .map(|i| format!("    node {{\n        ring0_addr: {}\n        nodeid: {}\n    }}\n", hosts.ip(i), i + 1))
            .collect();
        for i in 0..n {
            let node = dir.join(format!("n{}", i + 1));
            for sub in ["run", "lib"] {
                std::fs::create_dir_all(node.join(sub)).expect("corosync dirs");
            }
            let conf = COROSYNC_CONF
                .replace("@CLUSTER@", tag)
                .replace("@TOKEN@", &token_ms.to_string())
                .replace("@KNET@", &knet_ping.map(knet_interface).unwrap_or_default())
                .replace("@NODES@", nodes.trim_end())
                .replace("@LOGFILE@", &node.join("corosync.log").display().to_string());
            std::fs::write(node.join("corosync.conf"), conf).expect("corosync.conf");
        }
        let pki = TestPki::new(tag);
        let configs = (0..n)
            .map(|i| {
                let members: String = members_of(i)
                    .iter()
                    .map(|&m| format!("[[cluster.member]]\nid = {m}\naddress = \"{}\"\n", hosts.address(m - 1, 7400)))
                    .collect();
                // Each node keeps its state (its generation) across its
                // agents' restarts, as a real node does.
                let state = dir.join(format!("n{}/state", i + 1));
                format!(
                    "state_dir = \"{}\"\n[[lockspace]]\nname = \"default\"\n[cluster]\nname = \"{tag}\"\nnode_id = {}\n\
                     membership = \"corosync\"\nlisten = \"{}\"\n{}\n{members}{}",
                    state.display(),
                    i + 1,
                    hosts.address(i, 7400),
                    extra.replace("@NODE@", &(i + 1).to_string()),
                    pki.tls_section(&format!("node{}", i + 1))
                )
            })
            .collect();
        let mut cluster = CorosyncCluster {
            hosts,
            dir,
            corosync: (0..n).map(|_| None).collect(),
            agents: (0..n).map(|_| None).collect(),
            configs,
            tag: tag.to_string(),
            pki,
            _turn: turn,
        };
        for i in 0..n {
            cluster.start_corosync(i);
        }
        for i in 0..n {
            cluster.start_agent(i);
        }
        cluster
    }

    /// Starts node `i + 1`'s corosync.
    pub fn start_corosync(&mut self, i: usize) {
        let node = self.dir.join(format!("n{}", i + 1));
        let script = format!(
            "mount --bind {run} /run && mount --bind {lib} /var/lib/corosync && exec corosync -f -c {conf}",
            run = node.join("run").display(),
            lib = node.join("lib").display(),
            conf = node.join("corosync.conf").display()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hosts.namespaces[i], "unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start corosync");
        self.corosync[i] = Some(child);
    }

    /// Sets corosync's token to `token_ms` in every node's corosync.conf and
    /// has every running corosync reload it (`corosync-cfgtool -R`, run on
    /// node `i + 1`, reloads the whole cluster).
    pub fn reload_token(&self, i: usize, token_ms: u32) {
        for node in 0..self.corosync.len() {
            let path = self.dir.join(format!("n{}/corosync.conf", node + 1));
            let conf = std::fs::read_to_string(&path).expect("corosync.conf");
            let conf: String = conf
                .lines()
                .map(|line| {
                    if line.trim_start().starts_with("token:") {
                        format!("    token: {token_ms}")
                    } else {
                        line.to_string()
                    }
                })
                .map(|line| line + "\n")
                .collect();
            std::fs::write(&path, conf).expect("corosync.conf");
        }
        let status = Command::new("ip")
            .args(["netns", "exec", &self.hosts.namespaces[i], "corosync-cfgtool", "-R"])
            .stdout(Stdio::null())
            .status()
            .expect("corosync-cfgtool");
        assert!(status.success(), "corosync-cfgtool -R on node {}", i + 1);
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to node `i + 1`'s corosync.
    pub fn signal_corosync(&self, i: usize, signal: &str) {
        signal_process(self.corosync[i].as_ref().expect("corosync running").id(), signal);
    }

    /// Node `i + 1`'s agent configuration.
    #[must_use]
    pub fn config(&self, i: usize) -> &str {
        &self.configs[i]
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to node `i + 1`'s agent.
    pub fn signal_agent(&self, i: usize, signal: &str) {
        signal_process(self.agent(i).pid(), signal);
    }

    /// Node `i + 1`'s corosync process (`ip netns exec`, `unshare` and `sh`
    /// each exec the next: the pid is corosync's).
    #[must_use]
    pub fn corosync_pid(&self, i: usize) -> u32 {
        self.corosync[i].as_ref().expect("corosync running").id()
    }

    /// Kills node `i + 1`'s corosync (SIGKILL).
    pub fn kill_corosync(&mut self, i: usize) {
        if let Some(mut child) = self.corosync[i].take() {
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            remove_ipc_files(pid);
        }
    }

    /// Starts node `i + 1`'s agent (a new process).
    pub fn start_agent(&mut self, i: usize) {
        let http = self.hosts.address(i, 9420);
        let tag = format!("{}-n{}", self.tag, i + 1);
        self.agents[i] = Some(Agent::start_in_netns(&tag, &self.configs[i], &self.hosts.namespaces[i], &http));
    }

    /// Starts node `i + 1`'s agent through `wrapper` (a command that execs
    /// the rest) with `extra` added to its configuration.
    pub fn start_agent_through(&mut self, i: usize, extra: &str, wrapper: &[&str]) {
        let http = self.hosts.address(i, 9420);
        let tag = format!("{}-n{}", self.tag, i + 1);
        let config = format!("{}\n{extra}", self.configs[i]);
        self.agents[i] = Some(Agent::start_in_netns_through(&tag, &config, &self.hosts.namespaces[i], &http, wrapper));
    }

    /// Kills node `i + 1`'s agent (SIGKILL); its log is kept in the returned text.
    pub fn kill_agent(&mut self, i: usize) -> String {
        let mut agent = self.agents[i].take().expect("agent running");
        if let Some(child) = agent.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        agent.log()
    }

    /// Node `i + 1`'s agent.
    #[must_use]
    pub fn agent(&self, i: usize) -> &Agent {
        self.agents[i].as_ref().expect("agent running")
    }

    /// `dlm-agent status --json` of node `i + 1`, and its exit status.
    #[must_use]
    pub fn status(&self, i: usize) -> (Value, i32) {
        let output = Command::new(bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.agent(i).socket)
            .output()
            .expect("run dlm-agent status");
        let value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        (value, output.status.code().unwrap_or(-1))
    }

    /// Waits until node `i + 1`'s status satisfies `done`; returns it.
    pub fn wait_state(&self, i: usize, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (status, _) = self.status(i);
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never reached the state awaited; last status {status:#}\nlog:\n{}",
                i + 1,
                self.agent(i).log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CorosyncCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for agent in &mut self.agents {
            drop(agent.take());
        }
        for i in 0..self.corosync.len() {
            self.kill_corosync(i);
        }
        // The directory goes with the field, after every process in it.
    }
}

impl CorosyncCluster {
    /// Prints the end of every node's agent and corosync logs: what a
    /// failed test leaves to read once its directory is gone.
    fn print_logs(&self) {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
        };
        for i in 0..self.corosync.len() {
            if let Some(agent) = &self.agents[i] {
                eprintln!("--- node {} agent log (last {LOG_TAIL} lines) ---\n{}", i + 1, tail(agent.log()));
            }
            let corosync = std::fs::read_to_string(self.dir.join(format!("n{}/corosync.log", i + 1)));
            eprintln!(
                "--- node {} corosync log (last {LOG_TAIL} lines) ---\n{}",
                i + 1,
                tail(corosync.unwrap_or_default())
            );
        }
    }
}

/// How many lines of each log a failed cluster test prints.
const LOG_TAIL: usize = 40;

/// Removes what a killed corosync leaves in `/dev/shm`: libqb's flight
/// recorder (`qb-corosync-PID-blackbox-*`, 8 MiB each) and its IPC
/// connections' ring buffers (`qb-PID-CLIENT-*`). A process killed with
/// SIGKILL cannot remove them, and left there they fill the machine's
/// memory run after run (10 GB after a day of test runs here).
fn remove_ipc_files(pid: u32) {
    let (recorder, rings) = (format!("qb-corosync-{pid}-"), format!("qb-{pid}-"));
    for entry in std::fs::read_dir("/dev/shm").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(&recorder) {
            let _ = std::fs::remove_file(entry.path());
        } else if name.starts_with(&rings) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Sends `signal` to `pid`; for `STOP`, returns only once every thread of
/// it has stopped (a signal is delivered asynchronously: a process told to
/// stop may still answer a request sent right after `kill` returns).
pub fn signal_process(pid: u32, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
    if signal != "STOP" {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return true };
        tasks.flatten().all(|task| {
            // `pid (comm) S …`: the state follows the last `)`.
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['T', 't'])))
                .unwrap_or(true)
        })
    };
    while !stopped() {
        assert!(std::time::Instant::now() < deadline, "process {pid} did not stop within 5 s of SIGSTOP");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The `interface` section that sets knet's ping timers (interval, pong
/// timeout, in ms) for link 0: the man page lists them among an
/// interface's settings (set directly in `totem`, they changed nothing in
/// our runs).
fn knet_interface((interval, timeout): (u32, u32)) -> String {
    format!(
        "    interface {{\n        linknumber: 0\n        knet_ping_interval: {interval}\n        knet_ping_timeout: {timeout}\n    }}"
    )
}
