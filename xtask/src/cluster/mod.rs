//! `cargo xtask cluster up|down|status`: a local cluster in one command.
//! By default each node is a network namespace on a bridge (so links can be
//! cut with `ip link`) with its own corosync daemon and an agent taking its
//! membership from it: nodes can be lost and recovered. With `--static`,
//! agents on loopback with a static member list (no root, no recovery).
//!
//! State lives in `target/cluster/`: one directory per node with its
//! configuration, socket, log and pids (and corosync's configuration, log
//! and state). `down` does not trust those files: it finds the cluster's
//! processes and network objects by what they are (`leftovers`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod leftovers;

use leftovers::{Leftovers, Names};

const DIR: &str = "target/cluster";
const BRIDGE: &str = "dlmbr0";
/// Node `i`'s namespace is `dlm-n<i>`, the host end of its veth `dlm-v<i>`.
const NAMESPACE: &str = "dlm-n";
const VETH: &str = "dlm-v";

fn names() -> Names<'static> {
    Names { dir: Path::new(DIR), namespace: NAMESPACE, veth: VETH, bridge: BRIDGE }
}
const SUBNET: &str = "10.77.0";
const NODES_MAX: usize = 16;

/// corosync's token timeout by default: a third of corosync's own default,
/// for a LAN (the README discusses the choice).
const TOKEN_MS_DEFAULT: u32 = 1000;
/// The corosync configuration template, shared with the cluster tests.
const COROSYNC_CONF: &str = include_str!("../../../tests/corosync/corosync.conf.in");

struct Options {
    nodes: usize,
    /// Namespaces and corosync (the default), or agents on loopback.
    netns: bool,
    ebpf: bool,
    base_port: u16,
    token_ms: u32,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options { nodes: 3, netns: true, ebpf: false, base_port: 17400, token_ms: TOKEN_MS_DEFAULT };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => {
                options.nodes = value("--nodes")?.parse().map_err(|_| "--nodes takes a number".to_string())?;
            }
            "--base-port" => {
                options.base_port =
                    value("--base-port")?.parse().map_err(|_| "--base-port takes a port".to_string())?;
            }
            "--static" => options.netns = false,
            "--token" => {
                options.token_ms = value("--token")?.parse().map_err(|_| "--token takes milliseconds".to_string())?;
            }
            "--ebpf" => options.ebpf = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if !(1..=NODES_MAX).contains(&options.nodes) {
        return Err(format!("--nodes must be 1 to {NODES_MAX}"));
    }
    Ok(options)
}

/// Runs `cluster up|down|status`.
pub fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("up") => up(&parse(&args[1..])?),
        Some("down") => down(),
        Some("status") => status(),
        _ => Err(
            "usage: cargo xtask cluster up [--nodes N] [--token MS] [--static [--base-port P]] [--ebpf] | down | status"
                .into(),
        ),
    }
}

fn node_dir(i: usize) -> PathBuf {
    Path::new(DIR).join(format!("node{i}"))
}

/// Where node `i` listens for peers and serves HTTP.
fn addresses(options: &Options, i: usize) -> (String, String) {
    let offset = u16::try_from(i).unwrap_or(0);
    if options.netns {
        (format!("{SUBNET}.{i}:7400"), format!("{SUBNET}.{i}:9420"))
    } else {
        (format!("127.0.0.1:{}", options.base_port + offset), format!("127.0.0.1:{}", options.base_port + 100 + offset))
    }
}

fn up(options: &Options) -> Result<(), String> {
    let found = Leftovers::find(&names());
    if !found.is_empty() {
        return Err(format!(
            "a cluster, or what is left of one, is in the way:\n{}\n`cargo xtask cluster down` stops and removes it",
            found.describe()
        ));
    }
    if options.netns && !is_root() {
        return Err("a cluster with corosync needs root (network namespaces, one corosync daemon per node); \
                    run it as root, or `cargo xtask cluster up --static` for agents on loopback without \
                    corosync (and without recovery)"
            .into());
    }
    crate::run("cargo", &["build", "--release", "--locked", "--package", "dlm-agent"])?;
    let binary = std::fs::canonicalize("target/release/dlm-agent").map_err(|e| format!("agent binary: {e}"))?;
    std::fs::create_dir_all(DIR).map_err(|e| format!("{DIR}: {e}"))?;
    if options.netns {
        make_namespaces(options.nodes)?;
        start_corosync(options)?;
    }
    let members: String = (1..=options.nodes)
        .map(|i| format!("[[cluster.member]]\nid = {i}\naddress = \"{}\"\n", addresses(options, i).0))
        .collect();
    // The peer links are TLS: a CA of the cluster's own and a certificate
    // per member (`dlm-agent certs`), kept with the cluster's files.
    let pki = std::path::Path::new(DIR).join("pki");
    let names: Vec<String> = (1..=options.nodes).map(|i| format!("node{i}")).collect();
    let certs = Command::new(&binary)
        .args(["certs", "--ca-name", "dlm local cluster CA", "--dir"])
        .arg(&pki)
        .args(&names)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("dlm-agent certs: {e}"))?;
    if !certs.success() {
        return Err("dlm-agent certs failed".into());
    }
    let pki = std::fs::canonicalize(&pki).map_err(|e| format!("{}: {e}", pki.display()))?;
    for i in 1..=options.nodes {
        let dir = node_dir(i);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = std::fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (_, http) = addresses(options, i);
        let membership = if options.netns {
            // Without a fencing command a lost node is taken to have fenced
            // itself after the grace (it has: it lost quorum, or its lease
            // lapsed), which the agent computes from corosync's timeouts.
            "membership = \"corosync\"\n"
        } else {
            ""
        };
        let config = format!(
            "node = \"node{i}\"\nsocket = \"{}\"\nhttp = \"{http}\"\n\n[ebpf]\nenabled = {}\n\n\
             [tls]\nca = \"{pki}/ca.pem\"\ncert = \"{pki}/node{i}.pem\"\nkey = \"{pki}/node{i}.key\"\n\n\
             [cluster]\nname = \"local\"\nnode_id = {i}\n{membership}\n{members}",
            dir.join("dlm.sock").display(),
            options.ebpf,
            pki = pki.display(),
        );
        std::fs::write(dir.join("agent.toml"), config).map_err(|e| format!("config: {e}"))?;
        let log = std::fs::File::create(dir.join("agent.log")).map_err(|e| format!("log: {e}"))?;
        let mut command = if options.netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &format!("{NAMESPACE}{i}")]).arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        command.args(["run", "--config"]).arg(dir.join("agent.toml")).arg("--state-dir").arg(dir.join("state"));
        // Its own process group: it outlives this command and ^C here.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start node {i}: {e}"))?;
        std::fs::write(dir.join("pid"), child.id().to_string()).map_err(|e| format!("pid file: {e}"))?;
        eprintln!("xtask: node {i} started (pid {})", child.id());
    }
    eprintln!("xtask: waiting for every node to be ready and every peer link up…");
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 1..=options.nodes {
        let (_, http) = addresses(options, i);
        loop {
            let metrics = http_get(&http, "/metrics").unwrap_or_default();
            let ready = metrics.contains("dlm_cluster_members")
                && !metrics.lines().any(|l| l.starts_with("dlm_cluster_peer_up{") && l.ends_with(" 0"))
                && (!options.netns || metrics.lines().any(|l| l == "dlm_cluster_quorate 1"));
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("node {i} not ready after 30 s; see {}", node_dir(i).join("agent.log").display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("cluster \"local\" is up with {} nodes:", options.nodes);
    for i in 1..=options.nodes {
        let (peer, http) = addresses(options, i);
        let socket = std::fs::canonicalize(node_dir(i)).map(|d| d.join("dlm.sock")).unwrap_or_default();
        println!("  node {i}: DLM_SOCKET={} target/release/dlm-agent status", socket.display());
        println!(
            "          metrics http://{http}/metrics, peers at {peer}, log {}",
            node_dir(i).join("agent.log").display()
        );
    }
    if options.netns {
        println!(
            "corosync: token {} ms; each node's corosync.conf and corosync.log are in its directory",
            options.token_ms
        );
        println!("fail node i:");
        println!("  its agent:  kill -9 $(cat {DIR}/node<i>/pid)   (its locks are recovered at once)");
        println!("  the node:   kill -9 $(cat {DIR}/node<i>/corosync.pid) $(cat {DIR}/node<i>/pid)");
        println!("  its link:   ip link set dlm-v<i> down   (and up again: it rejoins in a new epoch)");
        println!("watch:        DLM_SOCKET={DIR}/node<j>/dlm.sock target/release/dlm-agent status");
    }
    println!("stop: cargo xtask cluster down");
    Ok(())
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// Below this token, knet's ping timers are set rather than derived.
const KNET_TIMERS_BELOW_MS: u32 = 1000;

/// knet's ping timers for link 0 at a token below
/// [`KNET_TIMERS_BELOW_MS`], else nothing (corosync derives them). corosync
/// makes knet's pong timeout half the token; at 300 ms that is 150 ms,
/// shorter than the ~160 ms at which knet sent its pings on the machines
/// this was measured on, and the link dropped every ~8 s with no load (the
/// README's "A tight token needs knet's ping timers set"). A lost node is
/// still found by the token: the pong timeout only decides when knet calls
/// the link down.
fn knet_timers(token_ms: u32) -> String {
    if token_ms >= KNET_TIMERS_BELOW_MS {
        return String::new();
    }
    "    interface {\n        linknumber: 0\n        knet_ping_interval: 75\n        knet_ping_timeout: 1000\n    }"
        .into()
}

/// Starts one corosync per namespace, each in a private mount namespace
/// (corosync 3.1.7 keeps its pid file and state at fixed paths), and waits
/// until every one counts every node.
fn start_corosync(options: &Options) -> Result<(), String> {
    let nodes: String = (1..=options.nodes)
        .map(|i| format!("    node {{\n        ring0_addr: {SUBNET}.{i}\n        nodeid: {i}\n    }}\n"))
        .collect();
    for i in 1..=options.nodes {
        let dir = node_dir(i);
        for sub in ["run", "lib"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let dir = std::fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let conf = COROSYNC_CONF
            .replace("@CLUSTER@", "local")
            .replace("@TOKEN@", &options.token_ms.to_string())
            .replace("@KNET@", &knet_timers(options.token_ms))
            .replace("@NODES@", nodes.trim_end())
            .replace("@LOGFILE@", &dir.join("corosync.log").display().to_string());
        std::fs::write(dir.join("corosync.conf"), conf).map_err(|e| format!("corosync.conf: {e}"))?;
        let script = format!(
            "mount --bind {run} /run && mount --bind {lib} /var/lib/corosync && exec corosync -f -c {conf}",
            run = dir.join("run").display(),
            lib = dir.join("lib").display(),
            conf = dir.join("corosync.conf").display()
        );
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &format!("{NAMESPACE}{i}"), "unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script]);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start corosync on node {i}: {e} (cargo xtask setup installs it)"))?;
        std::fs::write(dir.join("corosync.pid"), child.id().to_string()).map_err(|e| format!("pid file: {e}"))?;
    }
    eprintln!(
        "xtask: corosync started on {} nodes (token {} ms); waiting for quorum…",
        options.nodes, options.token_ms
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 1..=options.nodes {
        loop {
            let output = Command::new("ip")
                .args(["netns", "exec", &format!("{NAMESPACE}{i}"), "corosync-quorumtool", "-s"])
                .output()
                .map_err(|e| format!("corosync-quorumtool: {e}"))?;
            let text = String::from_utf8_lossy(&output.stdout);
            let nodes_line = format!("Nodes:            {}", options.nodes);
            if text.contains(&nodes_line) && text.contains("Quorate:          Yes") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("node {i}'s corosync has not seen every node after 30 s:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn make_namespaces(nodes: usize) -> Result<(), String> {
    let ip = |args: &[&str]| crate::run("ip", args);
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{SUBNET}.254/24"), "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    for i in 1..=nodes {
        let ns = format!("{NAMESPACE}{i}");
        let veth = format!("dlm-v{i}");
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["link", "set", &veth, "master", BRIDGE, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{SUBNET}.{i}/24"), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Stops every process of the cluster and removes its network objects,
/// whatever the state files say: they are found by what they are (see
/// `leftovers`).
fn down() -> Result<(), String> {
    let found = Leftovers::find(&names());
    if found.is_empty() {
        println!("no cluster is up: nothing to stop");
    } else {
        println!("stopping and removing:\n{}", found.describe());
        found.remove()?;
        println!(
            "stopped {} processes, removed {} namespaces and {} links",
            found.processes.len(),
            found.namespaces.len(),
            found.links.len()
        );
    }
    for i in 1..=NODES_MAX {
        for file in ["pid", "corosync.pid"] {
            let _ = std::fs::remove_file(node_dir(i).join(file));
        }
    }
    Ok(())
}

fn status() -> Result<(), String> {
    let mut any = false;
    for i in 1..=NODES_MAX {
        let socket = node_dir(i).join("dlm.sock");
        if !node_dir(i).join("pid").exists() {
            continue;
        }
        any = true;
        println!("--- node {i}");
        let _ = Command::new("target/release/dlm-agent").args(["status", "--socket"]).arg(&socket).status();
    }
    if !any {
        println!("no cluster is up");
    }
    Ok(())
}

fn http_get(address: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}
