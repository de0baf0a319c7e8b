//! dlm as the peer benchmark measures it: the lock system driven through
//! the client library, the agent it starts, and its dead-holder cell.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dlm_agent::client::{Client, LockOptions, Target};
use dlm_core::Mode;

use super::Result;
use super::services::{LockHeld, LockSystem, Server, free_port, wait_for_port};

pub struct Dlm {
    pub name: &'static str,
    pub target: Target,
    /// Sessions as gRPC streams even on the Unix socket (as other
    /// languages' clients open them), instead of framed sessions.
    pub grpc_sessions: bool,
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

pub const BIN: &str = env!("CARGO_BIN_EXE_dlm-agent");

pub struct DlmAgent {
    _server: Server,
    pub pid: u32,
    pub socket: PathBuf,
    pub tcp: String,
}

/// How long the measured agent spins before it parks while requests flow
/// (`DLM_SPIN_US`, the agent's own default is 0): 50 µs here unless the
/// environment says otherwise. Spinning pays only together with the
/// client's spin for a due answer (the client library's default): measured
/// side by side, unpinned, at 1 client, p50 84.5 µs with neither, 69.0 µs
/// with the client's alone, 44.5 µs with both. The CPU both burn is in the
/// CPU rows.
pub fn agent_spin_us() -> String {
    std::env::var("DLM_SPIN_US").unwrap_or_else(|_| "50".into())
}

pub async fn start_dlm(dir: &Path) -> Result<DlmAgent> {
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
        .env("DLM_SPIN_US", agent_spin_us())
        .stderr(std::fs::File::create(dir.join("dlm.log"))?)
        .spawn()?;
    let pid = child.id();
    let server = Server { child };
    wait_for_port(port, "dlm-agent").await?;
    Ok(DlmAgent { _server: server, pid, socket, tcp })
}

/// A dlm holder is a real process (`dlm-agent lock … -- sleep`) killed with
/// SIGKILL; the time is from the kill to the waiter's grant.
pub async fn dlm_killed_holder(agent: &DlmAgent) -> Result<Duration> {
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
