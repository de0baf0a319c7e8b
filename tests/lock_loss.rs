//! A holder learns first: a client whose lock is lost is told at once, and
//! `dlm-agent lock -- CMD` stops CMD, whatever ended the lock (its agent
//! killed, a revocation) or ended the CLI itself. Before, CMD ran on with
//! its old fencing token while another client was granted the lock.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dlm_agent::client::{LockOptions, Loss};
use dlm_core::Mode;
use support::{Agent, wait_with_timeout};

/// `lock -- CMD`'s exit status when the lock was lost and CMD stopped.
const EXIT_LOCK_LOST: i32 = 79;

/// Starts `dlm-agent lock EXTRA… NAME -- sh -c SCRIPT`; SCRIPT writes its
/// shell's pid to `pidfile` first. Returns the CLI and CMD's pid.
#[expect(clippy::zombie_processes, reason = "the CLI is returned: its caller waits for it")]
fn lock_running(agent: &Agent, extra: &[&str], name: &str, script: &str, pidfile: &Path) -> (Child, u32) {
    let script = format!("echo $$ > {}; {script}", pidfile.display());
    let mut cli = agent
        .cli()
        .arg("lock")
        .args(extra)
        .args([name, "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lock");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(pidfile).ok().and_then(|t| t.trim().parse().ok()) {
            return (cli, pid);
        }
        if Instant::now() > deadline {
            let _ = cli.kill();
            let _ = cli.wait();
            panic!("the command did not start under the lock");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a live process (not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn stderr_of(cli: &mut Child) -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(cli.stderr.as_mut().expect("piped"), &mut text).expect("stderr");
    text
}

fn kill(signal: &str, pid: u32) {
    assert!(Command::new("kill").args([signal, &pid.to_string()]).status().expect("kill").success());
}

#[test]
fn the_command_is_stopped_when_its_agent_is_killed() {
    let agent = Agent::start("loss-kill", "");
    let dir = support::Scratch::new("loss-kill");
    let pidfile = dir.join("pid");
    let (mut cli, command) = lock_running(&agent, &[], "r", "exec sleep 600", &pidfile);
    let killed_at = Instant::now();
    kill("-KILL", agent.pid());
    let status = wait_with_timeout(&mut cli, Duration::from_secs(10)).expect("the CLI exits when its agent dies");
    let stopped_in = killed_at.elapsed();
    let stderr = stderr_of(&mut cli);
    assert_eq!(status.code(), Some(EXIT_LOCK_LOST), "{stderr}");
    assert!(stderr.contains("was lost (the session with the agent ended)"), "{stderr}");
    assert!(gone_within(command, Duration::from_secs(1)), "the command runs on after its lock was lost");
    eprintln!("the command was stopped {stopped_in:?} after its agent was killed");
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_kill_after() {
    let agent = Agent::start("loss-revoke", "");
    let client = agent.cli().args(["lockspace", "create", "ls1"]).output().expect("create");
    assert!(client.status.success(), "{client:?}");
    let dir = support::Scratch::new("loss-revoke");
    let pidfile = dir.join("pid");
    let script = "trap '' TERM; while :; do sleep 0.05; done";
    let (mut cli, command) =
        lock_running(&agent, &["--lockspace", "ls1", "--kill-after", "300ms"], "r", script, &pidfile);
    // A forced release of the lockspace revokes every lock in it.
    let released = agent.cli().args(["lockspace", "release", "--force", "ls1"]).output().expect("release");
    assert!(released.status.success(), "{released:?}");
    let status = wait_with_timeout(&mut cli, Duration::from_secs(10)).expect("the CLI exits on the revocation");
    let stderr = stderr_of(&mut cli);
    assert_eq!(status.code(), Some(EXIT_LOCK_LOST), "{stderr}");
    assert!(stderr.contains("was lost (revoked by the agent"), "{stderr}");
    assert!(stderr.contains("SIGKILL"), "{stderr}");
    assert!(gone_within(command, Duration::from_secs(1)), "the command ignoring SIGTERM was not killed");
}

#[test]
fn killing_the_cli_stops_its_command() {
    let agent = Agent::start("loss-cli", "");
    let dir = support::Scratch::new("loss-cli");
    let pidfile = dir.join("pid");
    let (mut cli, command) = lock_running(&agent, &[], "r", "exec sleep 600", &pidfile);
    kill("-KILL", cli.id());
    let _ = cli.wait();
    assert!(gone_within(command, Duration::from_secs(5)), "the command outlived the CLI holding its lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_is_told_when_its_session_ends_or_its_lock_is_revoked() {
    let agent = Agent::start("loss-guard", "");
    let client = agent.client().await;
    client.create_lockspace("ls1", 0).await.expect("create");
    let session = client.session().await.expect("session");
    let kept = session.lock("default", "kept", Mode::Ex, LockOptions::default()).await.expect("granted");
    let revoked = session.lock("ls1", "r", Mode::Ex, LockOptions::default()).await.expect("granted");
    assert!(kept.is_held() && revoked.is_held());
    client.release_lockspace("ls1", true).await.expect("forced release");
    let loss = tokio::time::timeout(Duration::from_secs(5), revoked.lost()).await.expect("told of the revocation");
    assert!(matches!(&loss, Loss::Revoked { reason } if !reason.is_empty()), "{loss:?}");
    assert!(!revoked.is_held());
    assert!(kept.is_held(), "a revocation of one lock is not a loss of the others");
    // The agent is killed: the session ends, and the guard says so at once.
    let killed_at = Instant::now();
    kill("-KILL", agent.pid());
    let loss = tokio::time::timeout(Duration::from_secs(5), kept.lost()).await.expect("told of the session's end");
    assert_eq!(loss, Loss::SessionEnded);
    assert!(!kept.is_held());
    eprintln!("the guard was told {:?} after the kill", killed_at.elapsed());
}
