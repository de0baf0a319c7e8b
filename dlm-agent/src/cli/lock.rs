//! `dlm-agent lock NAME -- CMD…`: run a command while holding a lock.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use dlm_client::{LockError, LockOptions};
use dlm_core::{LockFlags, Mode};

use super::{AgentAddress, EXIT_LOCK_LOST, EXIT_NOT_ACQUIRED, EXIT_SOFTWARE, EXIT_UNREACHABLE, EXIT_USAGE};

/// Options of `dlm-agent lock`.
///
/// Exit status: the command's; 75 when the lock was not acquired (held and
/// --try, timed out, chosen as a deadlock victim); 79 when the lock was lost
/// while the command ran (revoked, or the agent went away) and the command
/// was stopped; 69 when the agent cannot be reached; 64 when the request is
/// refused (unknown lockspace, bad name).
///
/// A lost lock ends the command: SIGTERM, then SIGKILL after --kill-after
/// (as `consul lock` does), since another client may hold the lock now. If
/// this process itself dies, the command gets SIGTERM from the kernel.
#[derive(Args, Debug)]
pub struct LockArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// Lock mode: nl, cr, cw, pr, pw or ex
    #[arg(long, short, default_value = "ex", value_parser = parse_mode)]
    mode: Mode,
    /// Fail at once (exit 75) instead of waiting when the lock is held
    #[arg(long = "try", short = 'n')]
    try_lock: bool,
    /// Give up (exit 75) if not granted within this time (250ms, 5s, 2m, …)
    #[arg(long, short, value_parser = dlm_agent::config::parse_duration)]
    timeout: Option<Duration>,
    /// The lockspace of the resource
    #[arg(long, short, default_value = "default")]
    lockspace: String,
    /// When the lock is lost, how long the command has between SIGTERM and SIGKILL
    #[arg(long, default_value = "5s", value_parser = dlm_agent::config::parse_duration)]
    kill_after: Duration,
    /// The resource to lock
    name: String,
    /// The command to run while holding the lock; it gets DLM_FENCING_TOKEN
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_mode(text: &str) -> Result<Mode, String> {
    Mode::parse(text).ok_or_else(|| format!("{text:?} is not a mode (nl, cr, cw, pr, pw, ex)"))
}

pub async fn run(args: LockArgs) -> ExitCode {
    let client = match args.agent.connect().await {
        Ok(client) => client,
        Err(code) => return ExitCode::from(code),
    };
    let session = match client.session().await {
        Ok(session) => session,
        Err(error) => return ExitCode::from(super::call_failed(&error)),
    };
    let flags = if args.try_lock { LockFlags::NOQUEUE } else { LockFlags::EMPTY };
    let options = LockOptions { flags, timeout: args.timeout, traceparent: std::env::var("TRACEPARENT").ok() };
    let guard = match session.lock(&args.lockspace, args.name.as_bytes(), args.mode, options).await {
        Ok(guard) => guard,
        Err(LockError::NotGranted(status)) => {
            let reason = status.as_str_name().trim_start_matches("STATUS_").to_lowercase();
            eprintln!("dlm-agent: {} not acquired: {reason}", args.name);
            return ExitCode::from(EXIT_NOT_ACQUIRED);
        }
        Err(LockError::Rejected { code, message }) => {
            eprintln!("dlm-agent: refused ({code}): {message}");
            let no_permission = code == dlm_proto::codes::RejectCode::PermissionDenied.as_str();
            return ExitCode::from(if no_permission { super::EXIT_NO_PERMISSION } else { EXIT_USAGE });
        }
        Err(LockError::SessionClosed) => {
            eprintln!("dlm-agent: the agent closed the session");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("DLM_FENCING_TOKEN", guard.fencing_token().to_string())
        .env("DLM_LOCK_NAME", &args.name)
        .env("DLM_LOCKSPACE", &args.lockspace);
    super::child::end_with_parent(command.as_std_mut());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("dlm-agent: cannot run {:?}: {error}", args.command[0]);
            return ExitCode::from(127);
        }
    };
    let status = tokio::select! {
        status = child.wait() => status,
        loss = guard.lost() => {
            eprintln!(
                "dlm-agent: the lock on {} was lost ({loss}); stopping the command (SIGTERM, SIGKILL after {:?})",
                args.name, args.kill_after
            );
            super::child::terminate(&mut child, args.kill_after).await;
            return ExitCode::from(EXIT_LOCK_LOST);
        }
    };
    let _ = guard.unlock().await;
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(error) => {
            eprintln!("dlm-agent: waiting for the command failed: {error}");
            ExitCode::from(EXIT_SOFTWARE)
        }
    }
}
