//! `dlm-agent trace dlm`: live DLM waits and holds with their kernel
//! attribution, polled from a running agent.

use std::process::ExitCode;

use clap::Args;

use super::AgentAddress;

/// Options of `dlm-agent trace dlm`.
#[derive(Args, Debug)]
pub struct TraceDlmArgs {
    #[command(flatten)]
    agent: AgentAddress,
}

pub async fn run(_args: &TraceDlmArgs) -> ExitCode {
    ExitCode::from(super::EXIT_SOFTWARE)
}
