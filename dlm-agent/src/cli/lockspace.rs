//! `dlm-agent lockspace create|release`: administer lockspaces (the
//! `admin` right of the access policy; root and the agent's own user by
//! default).

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::AgentAddress;

/// `dlm-agent lockspace …`.
#[derive(Subcommand, Debug)]
pub enum LockspaceCommand {
    /// Create a lockspace.
    Create(CreateArgs),
    /// Release a lockspace (refused while it has locks, unless --force).
    Release(ReleaseArgs),
}

/// Options of `dlm-agent lockspace create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// Its name (1 to 64 bytes).
    name: String,
    /// Its value block length in bytes (a multiple of 8, 8 to 256).
    #[arg(long, default_value_t = 32)]
    lvb_len: u32,
}

/// Options of `dlm-agent lockspace release`.
#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// Its name.
    name: String,
    /// Release it with its locks: their holders are told they lost them.
    #[arg(long)]
    force: bool,
}

/// Runs `dlm-agent lockspace …`.
pub async fn run(command: LockspaceCommand) -> ExitCode {
    let agent = match &command {
        LockspaceCommand::Create(args) => &args.agent,
        LockspaceCommand::Release(args) => &args.agent,
    };
    let client = match agent.connect().await {
        Ok(client) => client,
        Err(code) => return ExitCode::from(code),
    };
    let (done, result) = match &command {
        LockspaceCommand::Create(args) => {
            (format!("lockspace {:?} created", args.name), client.create_lockspace(&args.name, args.lvb_len).await)
        }
        LockspaceCommand::Release(args) => {
            (format!("lockspace {:?} released", args.name), client.release_lockspace(&args.name, args.force).await)
        }
    };
    match result {
        Ok(()) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(error) => ExitCode::from(super::call_failed(&error)),
    }
}
