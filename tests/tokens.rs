//! Fencing tokens only grow on a node: through a lockspace released and
//! created again, and through agent restarts, clean (SIGTERM) or not
//! (kill -9), since each start raises the generation kept in the state
//! directory before anything is granted.

use dlm_agent::client::LockOptions;
use dlm_core::Mode;
use support::Agent;

/// The token of a fresh EX lock on `name` in `default`, released at once.
async fn token_of(agent: &Agent, name: &str) -> u64 {
    let session = agent.client().await.session().await.expect("session");
    let guard = session.lock("default", name, Mode::Ex, LockOptions::default()).await.expect("granted");
    let token = guard.fencing_token();
    guard.unlock().await.expect("unlock");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grow_through_a_lockspace_recreated_and_restarts_clean_or_killed() {
    let state = std::env::temp_dir().join(format!("dlm-tokens-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut tokens = Vec::new();

    let agent = Agent::start_with_state_dir("tokens-1", "", &state);
    tokens.push(token_of(&agent, "r").await);
    tokens.push(token_of(&agent, "r").await);
    // Killed: no clean stop, nothing written on the way out.
    drop(agent);

    let mut agent = Agent::start_with_state_dir("tokens-2", "", &state);
    tokens.push(token_of(&agent, "r").await);
    let client = agent.client().await;
    client.release_lockspace("default", true).await.expect("released");
    client.create_lockspace("default", 32).await.expect("created again");
    tokens.push(token_of(&agent, "r").await);
    assert!(agent.terminate().success());

    let agent = Agent::start_with_state_dir("tokens-3", "", &state);
    // A SIGHUP (which reloads TLS files) does not stop an agent without them.
    let hangup = std::process::Command::new("kill").args(["-HUP", &agent.pid().to_string()]).status();
    assert!(hangup.expect("kill").success());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tokens.push(token_of(&agent, "r").await);
    assert!(tokens.windows(2).all(|pair| pair[0] < pair[1]), "tokens went back: {tokens:?}");
    let generation = std::fs::read_to_string(state.join("generation")).expect("the generation file");
    assert_eq!(generation, "generation 3\n");
    drop(agent);

    // A generation file that does not parse stops the start, rather than
    // being reset (which would let tokens go back).
    std::fs::write(state.join("generation"), "zero").expect("break it");
    let output = std::process::Command::new(support::bin())
        .args(["run", "--http", "off", "--socket"])
        .arg(state.join("dlm.sock"))
        .env("DLM_STATE_DIR", &state)
        .env("DLM_NO_EBPF", "true")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("not reset"), "{stderr}");
    let _ = std::fs::remove_dir_all(&state);
}
