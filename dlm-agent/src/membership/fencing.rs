//! Fencing a lost node, run by the leader of a quorate group when the
//! agreement asks for it: the configured command, retried with a growing
//! pause until it succeeds, or the self-fencing grace, after which the lost
//! node is taken to have fenced itself. Either way the outcome reaches the
//! membership task as [`Event::Fenced`], which multicasts it.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::sync::mpsc;

use super::corosync::Event;
use crate::config::FencingSettings;

/// The longest pause between two attempts of the fencing command.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(30);
/// How long one attempt may run before it counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Fences `nodeid` (peer address `address`) as `settings` say, or waits
/// `grace` without a command, then reports it.
pub async fn fence(
    settings: FencingSettings,
    grace: Duration,
    nodeid: u32,
    address: Option<SocketAddr>,
    events: mpsc::Sender<Event>,
    attempts: IntCounterVec,
) {
    let address = address.map(|a| a.ip().to_string()).unwrap_or_default();
    match &settings.command {
        None => {
            tracing::warn!(
                node = nodeid,
                ?grace,
                "node lost: recovering its locks after the self-fencing grace (no fencing command configured)"
            );
            tokio::time::sleep(grace).await;
            attempts.with_label_values(&["grace"]).inc();
        }
        Some(command) => {
            let mut pause = Duration::from_secs(1);
            let mut attempt = 1u32;
            loop {
                tracing::warn!(node = nodeid, %address, attempt, ?command, "node lost: fencing it");
                match run(command, nodeid, &address).await {
                    Ok(()) => {
                        attempts.with_label_values(&["success"]).inc();
                        tracing::info!(node = nodeid, attempt, "fenced");
                        break;
                    }
                    Err(error) => {
                        attempts.with_label_values(&["failure"]).inc();
                        tracing::error!(node = nodeid, attempt, %error, retry_in = ?pause, "fencing failed; its locks stay unrecovered");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(RETRY_PAUSE_MAX);
                        attempt += 1;
                    }
                }
            }
        }
    }
    let _ = events.send(Event::Fenced(nodeid)).await;
}

/// Runs the fencing command once, with the node id and address as its last
/// two arguments (and as `DLM_FENCE_NODE`, `DLM_FENCE_ADDRESS`).
async fn run(command: &[String], nodeid: u32, address: &str) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("the fencing command is empty")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .arg(nodeid.to_string())
        .arg(address)
        .env("DLM_FENCE_NODE", nodeid.to_string())
        .env("DLM_FENCE_ADDRESS", address)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    match tokio::time::timeout(ATTEMPT_TIMEOUT, child.wait()).await {
        Err(_) => Err(format!("{program} ran for over {ATTEMPT_TIMEOUT:?}")),
        Ok(Err(error)) => Err(format!("{program}: {error}")),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} exited with {status}")),
    }
}
