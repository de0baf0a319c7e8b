//! The access policy against the real agent: the attacks of a local user
//! without rights, replayed as uid 65534 through the CLI, each refused as
//! `permission_denied` with nothing changed; and a configured policy that
//! gives rights to that user.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Output};

use dlm_agent::client::{LockOptions, SessionEvent};
use dlm_agent::proto;
use dlm_core::Mode;
use support::{Agent, metric_value, under_ci};

const EXIT_NO_PERMISSION: i32 = 77;
const NOBODY: u32 = 65534;

/// Whether this process can run commands as another user; says why not.
fn can_switch_users(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if !root {
        assert!(!under_ci(), "{test}: needs root under CI=true, to run clients as uid {NOBODY}");
        eprintln!("skipping {test}: needs root to run clients as uid {NOBODY}");
    }
    root
}

/// A copy of the agent binary that uid 65534 may run (the build tree may
/// be under a directory it cannot enter).
fn binary_for_nobody(agent: &Agent) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let copy = agent.dir.join("dlm-agent-nobody");
    std::fs::copy(support::bin(), &copy).expect("copy the binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    copy
}

/// `dlm-agent ARGS…` as uid and gid 65534, no supplementary groups.
///
/// A binary just written can be "busy" for a moment: another test thread
/// that forks while the copy's file is open hands its child that write
/// descriptor until the child execs. So ETXTBSY is retried, briefly.
fn as_nobody(binary: &PathBuf, agent: &Agent, args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let run = Command::new(binary).args(args).env("DLM_SOCKET", &agent.socket).uid(NOBODY).gid(NOBODY).output();
        match run {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            run => return run.expect("run as nobody"),
        }
    }
}

fn refused(output: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(EXIT_NO_PERMISSION), "{what}: {stderr}");
    assert!(stderr.contains("permission_denied") && stderr.contains("uid 65534"), "{what}: {stderr}");
}

#[tokio::test]
async fn a_local_user_without_rights_cannot_release_create_dump_or_lock_and_nothing_changes() {
    if !can_switch_users("access") {
        return;
    }
    let agent = Agent::start("access", "[[lockspace]]\nname = \"default\"\n[[lockspace]]\nname = \"app\"\n");
    let client = agent.client().await;
    let session = client.session().await.expect("session");
    let mut events = session.events();
    let held = session.lock("app", b"R", Mode::Ex, LockOptions::default()).await.expect("root locks in app");
    let token = held.fencing_token();
    let nobody = binary_for_nobody(&agent);

    // Issue 17's attack: release the lockspace with force, create it again,
    // take the lock a second time with a token that went backwards.
    refused(&as_nobody(&nobody, &agent, &["lockspace", "release", "app", "--force"]), "release --force");
    refused(&as_nobody(&nobody, &agent, &["lockspace", "create", "junk"]), "create");
    refused(&as_nobody(&nobody, &agent, &["lock", "--try", "--lockspace", "app", "R", "--", "true"]), "lock");
    refused(&as_nobody(&nobody, &agent, &["dump", "--lockspace", "app"]), "dump");
    refused(&as_nobody(&nobody, &agent, &["fence-ack", "2"]), "fence-ack");
    // What anyone on the node may do by default: lock in `default`, and look.
    let locked = as_nobody(&nobody, &agent, &["lock", "x", "--", "true"]);
    assert!(locked.status.success(), "{}", String::from_utf8_lossy(&locked.stderr));
    assert!(as_nobody(&nobody, &agent, &["ls"]).status.success());
    assert!(as_nobody(&nobody, &agent, &["status"]).status.success());

    // Nothing changed: the same lockspaces, root's lock held with its token.
    let mut names: Vec<String> =
        client.lockspaces().await.expect("ls").lockspaces.into_iter().map(|l| l.name).collect();
    names.sort();
    assert_eq!(names, ["app", "default"]);
    let dump =
        client.dump(proto::DumpRequest { lockspace: "app".into(), ..Default::default() }).await.expect("root dumps");
    let locks: Vec<u64> = dump.resources.iter().flat_map(|r| r.granted.iter().map(|l| l.fencing_token)).collect();
    assert_eq!(locks, [token]);
    while let Ok(event) = events.try_recv() {
        assert!(!matches!(event, SessionEvent::Revoked { .. }), "root's lock was revoked: {event:?}");
    }

    let metrics = agent.metrics();
    assert_eq!(metric_value(&metrics, "dlm_access_denied_total{right=\"admin\"}"), 3.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "dlm_access_denied_total{right=\"dump\"}"), 1.0);
    assert_eq!(metric_value(&metrics, "dlm_access_denied_total{right=\"lock\"}"), 1.0);
    held.unlock().await.expect("unlock");
}

#[tokio::test]
async fn a_configured_policy_gives_a_user_its_rights_and_no_more() {
    if !can_switch_users("access_configured") {
        return;
    }
    let config = "[[lockspace]]\nname = \"default\"\n[[lockspace]]\nname = \"app\"\n[[lockspace]]\nname = \"other\"\n\
                  [access.lockspace.app]\nlock = [\"uid:65534\"]\ndump = [\"gid:65534\"]\n\
                  [access.lockspace.default]\nlock = []\n";
    let agent = Agent::start("access-configured", config);
    let nobody = binary_for_nobody(&agent);
    let locked = as_nobody(&nobody, &agent, &["lock", "--lockspace", "app", "R", "--", "true"]);
    assert!(locked.status.success(), "{}", String::from_utf8_lossy(&locked.stderr));
    assert!(as_nobody(&nobody, &agent, &["dump", "--lockspace", "app"]).status.success());
    refused(&as_nobody(&nobody, &agent, &["lock", "--lockspace", "other", "R", "--", "true"]), "other lockspace");
    refused(&as_nobody(&nobody, &agent, &["lock", "R", "--", "true"]), "default, closed by the file");
    refused(&as_nobody(&nobody, &agent, &["lockspace", "create", "mine"]), "create");
}
