//! The harness of the workspace's cross-process tests: starts the real
//! `dlm-agent` binary for a test (its own socket directory and HTTP port,
//! killed when the test ends), clusters of them, and what the tests share
//! besides (metrics, cgroups, eBPF availability).

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use dlm_agent::client::{Client, Target};

#[path = "support/cgroup.rs"]
pub mod cgroup;
#[path = "support/cluster_clients.rs"]
pub mod cluster_clients;
#[path = "support/corosync.rs"]
pub mod corosync;
#[path = "support/fenced_store.rs"]
pub mod fenced_store;
#[path = "support/libdlm.rs"]
pub mod libdlm;
#[path = "support/python.rs"]
pub mod python;
#[path = "support/scratch.rs"]
pub mod scratch;

pub use cgroup::{LowMemoryCgroup, memory_stall_totals};
pub use scratch::Scratch;

/// The agent binary the tests run: `DLM_AGENT_BIN` when set, else the
/// `dlm-agent` that cargo built for this test run, in this test
/// executable's profile directory (`target/<profile>/`).
///
/// A package's tests cannot name another package's binary
/// (`CARGO_BIN_EXE_*` is only set for the package's own, and artifact
/// dependencies are unstable), but cargo builds dlm-agent's binary whenever
/// it builds dlm-agent's own tests or benchmarks: `cargo test --workspace`
/// (what `cargo xtask test` runs) does, before any test starts.
///
/// # Panics
/// The binary is missing, or older than a source it is built from (it
/// would test stale code: the same test of modification times cargo makes);
/// the message says how to build it.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("DLM_AGENT_BIN") {
            return path.into_string().expect("DLM_AGENT_BIN is UTF-8");
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        // target/<profile>/deps/<test>-<hash>
        let profile_dir = exe.parent().and_then(Path::parent).expect("the test runs from target/<profile>/deps");
        let binary = profile_dir.join("dlm-agent");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let build = format!(
            "build it in the same run (`cargo test --workspace`, or `cargo test -p dlm-agent -p dlm-tests`), \
             or first: `cargo build -p dlm-agent --profile {profile}`; or set DLM_AGENT_BIN"
        );
        let Some(built) = modified(&binary) else {
            panic!("the agent binary {} is missing: {build}", binary.display());
        };
        if let Some(source) = newest_agent_source().filter(|(_, changed)| *changed > built) {
            panic!("the agent binary {} is older than {}: {build}", binary.display(), source.0.display());
        }
        binary.into_os_string().into_string().expect("a UTF-8 target directory")
    })
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The most recently changed of the files the agent binary is built from.
fn newest_agent_source() -> Option<(PathBuf, SystemTime)> {
    newest_source(&[
        "Cargo.lock",
        "dlm-agent/Cargo.toml",
        "dlm-agent/build.rs",
        "dlm-agent/src",
        "dlm-client/Cargo.toml",
        "dlm-client/src",
        "dlm-core/Cargo.toml",
        "dlm-core/src",
        "dlm-proto/Cargo.toml",
        "dlm-proto/build.rs",
        "dlm-proto/proto",
        "dlm-proto/src",
        "dlm-ebpf/Cargo.toml",
        "dlm-ebpf/src",
        "dlm-ebpf/common",
    ])
}

/// The most recently changed file under `sources` (paths from the
/// workspace's root), and when.
pub fn newest_source(sources: &[&str]) -> Option<(PathBuf, SystemTime)> {
    fn walk(path: &Path, newest: &mut Option<(PathBuf, SystemTime)>) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Some(changed) = modified(path)
            && newest.as_ref().is_none_or(|(_, before)| changed > *before)
        {
            *newest = Some((path.to_path_buf(), changed));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let mut newest = None;
    for source in sources {
        walk(&root.join(source), &mut newest);
    }
    newest
}

/// A running agent, killed (and its directory removed) when dropped.
pub struct Agent {
    /// Its directory: configuration, socket, log.
    pub dir: Scratch,
    /// Its Unix socket.
    pub socket: PathBuf,
    /// Its HTTP address (`host:port`).
    pub http: String,
    /// The process, until it is stopped.
    pub child: Option<Child>,
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports for agents to listen on later.
///
/// They come from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), never from it: a port the kernel hands
/// out for `bind(:0)` may be handed out again, between this call and the
/// agent's `listen`, as the source port of some other test's outgoing
/// connection, and the agent then fails with "Address already in use" (seen
/// in CI). Ports below that range are only ever taken by explicit binds, and
/// a process-wide counter keeps this process from giving one out twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = fixed_port_range();
    let span = u32::from(high - low);
    // Processes that run at the same time (a bench beside a test) start far apart.
    let start = (std::process::id().wrapping_mul(7919)) % span;
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(k < span, "no free port left in {low}..{high}");
        let port = low + ((start + k) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// Ports that the kernel never picks for an unbound or `:0` socket.
fn fixed_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse::<u16>().ok()))
        .unwrap_or(32768);
    let high = ephemeral_low.min(32768);
    assert!(high > 12000, "the ephemeral port range starts at {high}: no room for fixed test ports");
    (10000, high)
}

impl Agent {
    /// Starts an agent with the given extra TOML configuration.
    pub fn start(tag: &str, config: &str) -> Agent {
        Agent::start_with_env(tag, config, &[])
    }

    /// Starts an agent with extra configuration and environment variables.
    /// Its eBPF programs stay off unless `env` sets `DLM_NO_EBPF` (tests that
    /// are not about eBPF do not pay for it, nor see its effects).
    pub fn start_with_env(tag: &str, config: &str, env: &[(&str, String)]) -> Agent {
        let http = format!("127.0.0.1:{}", free_port());
        Agent::start_full(tag, config, env, &http, &[])
    }

    /// Starts an agent inside a network namespace (`ip netns exec NS`),
    /// serving HTTP on `http` (an address reachable from the test).
    pub fn start_in_netns(tag: &str, config: &str, netns: &str, http: &str) -> Agent {
        Agent::start_in_netns_through(tag, config, netns, http, &[])
    }

    /// As [`Agent::start_in_netns`], through `wrapper` (run outside the
    /// namespace, where `/sys` is the host's; it execs the rest, which
    /// begins with `ip netns exec NETNS`).
    pub fn start_in_netns_through(tag: &str, config: &str, netns: &str, http: &str, wrapper: &[&str]) -> Agent {
        let wrapper: Vec<&str> = wrapper.iter().copied().chain(["ip", "netns", "exec", netns]).collect();
        Agent::start_full(tag, config, &[], http, &wrapper)
    }

    /// Starts an agent through `wrapper` (a command that execs the rest),
    /// such as `setpriv` to run it as another user with fewer privileges.
    pub fn start_wrapped(tag: &str, config: &str, env: &[(&str, String)], wrapper: &[&str]) -> Agent {
        let http = format!("127.0.0.1:{}", free_port());
        Agent::start_full(tag, config, env, &http, wrapper)
    }

    /// Starts an agent keeping its generation in `state_dir` (by default
    /// each agent has its own, in its directory).
    pub fn start_with_state_dir(tag: &str, config: &str, state_dir: &Path) -> Agent {
        let http = format!("127.0.0.1:{}", free_port());
        Agent::start_full(tag, config, &[("DLM_STATE_DIR", path_str(state_dir).to_string())], &http, &[])
    }

    fn start_full(tag: &str, config: &str, env: &[(&str, String)], http: &str, wrapper: &[&str]) -> Agent {
        let mut env = env.to_vec();
        if !env.iter().any(|(key, _)| *key == "DLM_NO_EBPF") {
            env.push(("DLM_NO_EBPF", "true".into()));
        }
        let dir = Scratch::new(tag);
        if !wrapper.is_empty() {
            // A wrapped agent may run as another user: it makes its socket here.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod temp dir");
        }
        let socket = dir.join("dlm.sock");
        let http = http.to_string();
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config).expect("write config");
        if !env.iter().any(|(key, _)| *key == "DLM_STATE_DIR") && !config.contains("state_dir") {
            env.push(("DLM_STATE_DIR", path_str(&dir.join("state")).to_string()));
        }
        let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(bin());
                command
            }
            None => Command::new(bin()),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--socket")
            .arg(&socket)
            .args(["--http", &http, "--node", "test"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dlm-agent");
        let agent = Agent { dir, socket, http, child: Some(child) };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get(&self.http, "/readyz").is_some_and(|(status, _)| status == 200) && self.socket.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent not ready; log:\n{}", self.log());
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Where a client reaches it.
    pub fn target(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    /// A client connected to it.
    pub async fn client(&self) -> Client {
        Client::connect(&self.target()).await.expect("connect")
    }

    /// `dlm-agent ARGS…` against this agent.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(bin());
        command.env("DLM_SOCKET", &self.socket);
        command
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, body) = http_get(&self.http, "/metrics").expect("metrics answer");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        wait_with_timeout(&mut child, Duration::from_secs(10)).expect("agent exits after SIGTERM")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its directory goes with the field (kept if the test panicked).
    }
}

/// The exit status of `child`, if it exits within `limit`.
pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A minimal HTTP/1.0 GET: (status, body). `None` if nothing answers.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Waits until `check` holds, polling.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// `path` as text (the tests' paths are UTF-8).
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Whether this runs under CI (`CI=true`), where a skip is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether this test may load eBPF programs. Without root (or CAP_BPF and
/// CAP_PERFMON) it says why and the test returns early; under CI
/// (`CI=true`) that is a failure instead, so the check always runs there.
pub fn ebpf_available(test: &str) -> bool {
    match dlm_agent::ebpf::Probes::load(&dlm_agent::ebpf::Settings::default()) {
        Ok(_) => true,
        Err(error) => {
            assert!(!under_ci(), "{test}: eBPF is required under CI=true, but: {error}");
            eprintln!("skipping {test}: needs root or CAP_BPF+CAP_PERFMON to load eBPF programs ({error})");
            false
        }
    }
}

/// A CA for a test cluster, in a directory of its own (removed on drop),
/// issuing each member's certificate and its `[tls]` section.
pub struct TestPki {
    /// The CA's directory, where certificates are issued too.
    pub dir: Scratch,
    ca: dlm_agent::pki::Authority,
}

impl TestPki {
    /// A new CA.
    pub fn new(tag: &str) -> TestPki {
        let dir = Scratch::new(&format!("{tag}-pki"));
        let ca = dlm_agent::pki::Authority::open_or_create(&dir, &format!("{tag} CA")).expect("a CA");
        TestPki { dir, ca }
    }

    /// The CA certificate's file.
    pub fn ca(&self) -> PathBuf {
        self.ca.certificate()
    }

    /// A certificate for `name`: (certificate, key) files.
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        self.ca.issue(name).expect("a certificate")
    }

    /// The `[tls]` section of an agent whose certificate names `name`.
    pub fn tls_section(&self, name: &str) -> String {
        let (cert, key) = self.issue(name);
        format!(
            "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.ca().display(),
            cert.display(),
            key.display()
        )
    }
}

/// A TLS connection to `address` trusting `ca`, as `identity` if given.
pub async fn tls_connect(
    address: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("a certificate")).expect("a CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert).expect("cert").map(|c| c.expect("cert")).collect();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).expect("key")).expect("identity")
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let name = ServerName::try_from(name.to_string()).expect("a name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await
}

/// `[[cluster.member]]` entries: node `i + 1` at `addresses[i]`.
pub fn members_section(addresses: &[String]) -> String {
    addresses
        .iter()
        .enumerate()
        .map(|(i, a)| format!("[[cluster.member]]\nid = {}\naddress = \"{a}\"\n", i + 1))
        .collect()
}

/// Agents forming one cluster on loopback.
pub struct Cluster {
    /// Node `i + 1`'s agent at index `i`.
    pub agents: Vec<Agent>,
    /// Each node's peer address.
    pub peer_addresses: Vec<String>,
    /// Each node's configuration, to start it again.
    pub configs: Vec<String>,
    /// The cluster's name (and the agents' directory tag).
    pub tag: String,
    /// The CA of the members' certificates.
    pub pki: TestPki,
}

impl Cluster {
    /// Starts `n` agents (node ids 1..=n) with `extra` added to each
    /// `[cluster]` section, and waits until every link is up. The links are
    /// TLS, each member with a certificate of the cluster's CA.
    pub fn start(tag: &str, n: usize, extra: &str) -> Cluster {
        let pki = TestPki::new(tag);
        let peer_addresses: Vec<String> = free_ports(n).into_iter().map(|port| format!("127.0.0.1:{port}")).collect();
        let members = members_section(&peer_addresses);
        let configs: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "[[lockspace]]\nname = \"default\"\n[[lockspace]]\nname = \"other\"\n\
                     [cluster]\nname = \"{tag}\"\nnode_id = {}\n{extra}\n{members}{}",
                    i + 1,
                    pki.tls_section(&format!("node{}", i + 1))
                )
            })
            .collect();
        let agents: Vec<Agent> =
            configs.iter().enumerate().map(|(i, config)| Agent::start(&format!("{tag}-n{}", i + 1), config)).collect();
        let cluster = Cluster { agents, peer_addresses, configs, tag: tag.to_string(), pki };
        cluster.wait_links_up();
        cluster
    }

    /// Starts node `i` (0-based) again with its configuration, as a new process.
    pub fn restart(&mut self, i: usize) {
        self.agents[i].terminate();
        self.agents[i] = Agent::start(&format!("{}-n{}-again", self.tag, i + 1), &self.configs[i]);
    }

    /// Waits until every agent has every peer link up.
    pub fn wait_links_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for agent in &self.agents {
            loop {
                let metrics = agent.metrics();
                let down = metrics.lines().any(|l| l.starts_with("dlm_cluster_peer_up{") && l.ends_with(" 0"));
                if !down {
                    break;
                }
                assert!(Instant::now() < deadline, "links not up; log:\n{}", agent.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The sum of a metric (all its series) over every agent.
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.agents.iter().map(|a| metric_value(&a.metrics(), name)).sum()
    }
}

/// The sum of every series of a metric in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
