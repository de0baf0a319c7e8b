//! The subcommands of `dlm-agent`.

use std::path::PathBuf;

use clap::Args;
use dlm_client::{Client, ClientTls, Target};

pub mod certs;
mod child;
pub mod cluster;
pub mod inspect;
pub mod lock;
pub mod lockspace;
pub mod run;
pub mod trace;
pub mod trace_dlm;

/// Exit status: the command line was wrong, or the agent refused the request (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit status: the access policy refused the request, or the agent lacks a
/// privilege its configuration requires (EX_NOPERM).
pub const EXIT_NO_PERMISSION: u8 = 77;
/// Exit status: the agent could not be reached (EX_UNAVAILABLE).
pub const EXIT_UNREACHABLE: u8 = 69;
/// Exit status: an internal error (EX_SOFTWARE).
pub const EXIT_SOFTWARE: u8 = 70;
/// Exit status: the configuration is invalid (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// Exit status: the lock was not acquired (held with --try, timed out, deadlock) (EX_TEMPFAIL).
pub const EXIT_NOT_ACQUIRED: u8 = 75;
/// Exit status of `lock -- CMD`: the lock was lost while the command ran,
/// and the command was stopped. Not a sysexits code: none means "a lease
/// was lost", and scripts must tell it from the command's own failures.
pub const EXIT_LOCK_LOST: u8 = 79;

/// How to reach the agent.
#[derive(Args, Clone, Debug)]
pub struct AgentAddress {
    /// The agent's Unix socket [default: $XDG_RUNTIME_DIR/dlm/dlm.sock, or /run/dlm/dlm.sock as root]
    #[arg(long, env = "DLM_SOCKET", global = true)]
    pub socket: Option<PathBuf>,
    /// Reach the agent over TCP instead (HOST:PORT); over TLS with --tls-ca
    #[arg(long, env = "DLM_CONNECT", global = true, conflicts_with = "socket")]
    pub connect: Option<String>,
    /// With --connect: the CA (PEM) that signed the agent's certificate; without it the connection is plain TCP
    #[arg(long, env = "DLM_TLS_CA", global = true, requires = "connect")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca: this client's certificate (PEM), its identity for the agent's access policy
    #[arg(long, env = "DLM_TLS_CERT", global = true, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// With --tls-cert: its private key (PEM)
    #[arg(long, env = "DLM_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --tls-ca: the name the agent's certificate must be valid for [default: the host of --connect]
    #[arg(long, env = "DLM_TLS_NAME", global = true, requires = "tls_ca")]
    pub tls_name: Option<String>,
}

impl AgentAddress {
    /// Where to connect, reading the TLS files if any.
    pub fn target(&self) -> Result<Target, String> {
        let Some(address) = &self.connect else {
            return Ok(Target::Unix(self.socket.clone().unwrap_or_else(dlm_agent::config::default_socket)));
        };
        let Some(ca) = &self.tls_ca else { return Ok(Target::Tcp(address.clone())) };
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        let host = address.rsplit_once(':').map_or(address.as_str(), |(host, _)| host);
        let server_name = self.tls_name.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
        Ok(Target::Tls(address.clone(), ClientTls { ca: read(ca)?, identity, server_name }))
    }

    /// Connects, or says why not on stderr.
    pub async fn connect(&self) -> Result<Client, u8> {
        let target = self.target().map_err(|error| {
            eprintln!("dlm-agent: {error}");
            EXIT_USAGE
        })?;
        Client::connect(&target).await.map_err(|error| {
            eprintln!("dlm-agent: {error}");
            EXIT_UNREACHABLE
        })
    }
}

/// Prints a call's error and picks the exit status.
pub fn call_failed(error: &dlm_client::ClientError) -> u8 {
    eprintln!("dlm-agent: {error}");
    match error {
        dlm_client::ClientError::Call(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ) =>
        {
            EXIT_USAGE
        }
        dlm_client::ClientError::Call(status) if status.code() == tonic::Code::PermissionDenied => EXIT_NO_PERMISSION,
        _ => EXIT_UNREACHABLE,
    }
}
