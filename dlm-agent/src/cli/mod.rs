//! The subcommands of `dlm-agent`.

use std::path::PathBuf;

use clap::Args;
use dlm_agent::client::{Client, Target};

pub mod cluster;
pub mod inspect;
pub mod lock;
pub mod lockspace;
pub mod run;
pub mod trace;
pub mod trace_dlm;

/// Exit status: the command line was wrong, or the agent refused the request (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit status: the access policy refused the request (EX_NOPERM).
pub const EXIT_NO_PERMISSION: u8 = 77;
/// Exit status: the agent could not be reached (EX_UNAVAILABLE).
pub const EXIT_UNREACHABLE: u8 = 69;
/// Exit status: an internal error (EX_SOFTWARE).
pub const EXIT_SOFTWARE: u8 = 70;
/// Exit status: the configuration is invalid (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// Exit status: the lock was not acquired (held with --try, timed out, deadlock) (EX_TEMPFAIL).
pub const EXIT_NOT_ACQUIRED: u8 = 75;

/// How to reach the agent.
#[derive(Args, Clone, Debug)]
pub struct AgentAddress {
    /// The agent's Unix socket [default: $XDG_RUNTIME_DIR/dlm/dlm.sock, or /run/dlm/dlm.sock as root]
    #[arg(long, env = "DLM_SOCKET", global = true)]
    pub socket: Option<PathBuf>,
    /// Reach the agent over TCP instead (HOST:PORT)
    #[arg(long, env = "DLM_CONNECT", global = true, conflicts_with = "socket")]
    pub connect: Option<String>,
}

impl AgentAddress {
    pub fn target(&self) -> Target {
        match &self.connect {
            Some(address) => Target::Tcp(address.clone()),
            None => Target::Unix(self.socket.clone().unwrap_or_else(dlm_agent::config::default_socket)),
        }
    }

    /// Connects, or says why not on stderr.
    pub async fn connect(&self) -> Result<Client, u8> {
        Client::connect(&self.target()).await.map_err(|error| {
            eprintln!("dlm-agent: {error}");
            EXIT_UNREACHABLE
        })
    }
}

/// Prints a call's error and picks the exit status.
pub fn call_failed(error: &dlm_agent::client::ClientError) -> u8 {
    eprintln!("dlm-agent: {error}");
    match error {
        dlm_agent::client::ClientError::Call(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ) =>
        {
            EXIT_USAGE
        }
        dlm_agent::client::ClientError::Call(status) if status.code() == tonic::Code::PermissionDenied => {
            EXIT_NO_PERMISSION
        }
        _ => EXIT_UNREACHABLE,
    }
}
