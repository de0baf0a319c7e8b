//! `dlm-agent run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dlm_agent::config::{Config, Overrides};

/// Options of `dlm-agent run`; each also has a `DLM_*` variable.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// A TOML configuration file (keys: node, socket, tcp, http, state_dir, keepalive, session_queue_max, [limits], [[lockspace]], [ebpf], [cluster], [tls], [access], [memory])
    #[arg(long, short, env = "DLM_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name [default: the host name]
    #[arg(long, env = "DLM_NODE")]
    node: Option<String>,
    /// Serve the client API on this Unix socket
    #[arg(long, env = "DLM_SOCKET")]
    socket: Option<PathBuf>,
    /// Also serve the client API on this TCP address (HOST:PORT, or "off")
    #[arg(long, env = "DLM_TCP")]
    tcp: Option<String>,
    /// Serve /metrics, /healthz and /readyz on this address (HOST:PORT, or "off") [default: 127.0.0.1:9420]
    #[arg(long, env = "DLM_HTTP")]
    http: Option<String>,
    /// Where the agent keeps its generation, which keeps fencing tokens growing across restarts [default: /var/lib/dlm as root, else $XDG_STATE_HOME/dlm]
    #[arg(long, env = "DLM_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Do not load the eBPF programs (kernel metrics and attribution off)
    #[arg(long, env = "DLM_NO_EBPF")]
    no_ebpf: bool,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive)
    #[arg(long, env = "DLM_LOG", default_value = "info")]
    log: String,
}

pub async fn run(args: RunArgs) -> ExitCode {
    let telemetry = match dlm_agent::telemetry::init(&args.log) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("dlm-agent: {error}");
            return ExitCode::from(super::EXIT_USAGE);
        }
    };
    let overrides = Overrides {
        node: args.node,
        socket: args.socket,
        tcp: args.tcp,
        http: args.http,
        state_dir: args.state_dir,
        no_ebpf: args.no_ebpf,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => Config { lock_spans: telemetry.spans_enabled(), ..config },
        Err(error) => {
            eprintln!("dlm-agent: configuration: {error}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let socket = config.socket.clone();
    let served = dlm_agent::server::serve(config, shutdown_signal()).await;
    telemetry.shutdown().await;
    match served {
        Ok(()) => {
            tracing::info!(socket = %socket.display(), "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("dlm-agent: {error}");
            // Refused a capability it was told to require: a permission, not
            // an outage; a setting the engine or the cluster refused (a grace
            // below what corosync needs): the configuration.
            ExitCode::from(match error {
                dlm_agent::server::ServeError::Resident(_) => super::EXIT_NO_PERMISSION,
                dlm_agent::server::ServeError::Config(_) => super::EXIT_CONFIG,
                _ => super::EXIT_UNREACHABLE,
            })
        }
    }
}

/// SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
