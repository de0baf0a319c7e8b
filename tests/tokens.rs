//! Fencing tokens only grow on a node: through a lockspace released and
//! created again, and through agent restarts, clean (SIGTERM) or not
//! (kill -9), since each start raises the generation kept in the state
//! directory before anything is granted; and through a restart of a node
//! that took over tokens from a later generation than its own, since the
//! agent raises its generation as its tokens grow.

use dlm_agent::client::LockOptions;
use dlm_core::Mode;
use support::{Agent, Cluster, TestPki, free_ports, members_section};

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
    let state = support::Scratch::new("tokens-state");
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
}

/// Node 1 starts in generation 5, node 2 in generation 1. Node 2 masters
/// `r` after node 1 did, so its tokens for `r` continue above node 1's
/// (above generation 5's floor): far ahead of its own generation. The agent
/// raises its generation on disk to match, so after a restart node 2's
/// tokens are above every one it handed out before (without that, they
/// would start above generation 2's floor, below `r`'s last token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_tokens_run_ahead_of_its_generation_raises_it() {
    let tag = "keepgen";
    let pki = TestPki::new(tag);
    let peer_addresses: Vec<String> = free_ports(2).into_iter().map(|port| format!("127.0.0.1:{port}")).collect();
    let members = members_section(&peer_addresses);
    let configs: Vec<String> = (1..=2)
        .map(|id| {
            format!(
                "[cluster]\nname = \"{tag}\"\nnode_id = {id}\nrelease_delay = \"50ms\"\n{members}{}",
                pki.tls_section(&format!("node{id}"))
            )
        })
        .collect();
    let states: Vec<_> = (1..=2).map(|id| pki.dir.join(format!("state{id}"))).collect();
    std::fs::create_dir_all(&states[0]).expect("state dir");
    std::fs::write(states[0].join("generation"), "generation 4\n").expect("generation");
    let start = |i: usize| Agent::start_with_state_dir(&format!("{tag}-n{}", i + 1), &configs[i], &states[i]);
    let agents = vec![start(0), start(1)];
    let mut cluster = Cluster { agents, peer_addresses, configs: configs.clone(), tag: tag.into(), pki };
    cluster.wait_links_up();
    let generation = |i: usize| std::fs::read_to_string(states[i].join("generation")).expect("generation file");
    assert_eq!((generation(0).as_str(), generation(1).as_str()), ("generation 5\n", "generation 1\n"));

    let first = token_of(&cluster.agents[0], "r").await;
    assert!(first > 5 << 40, "node 1's token {first}");
    // Once node 1 has let go of `r`, node 2 masters it, above node 1's tokens.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let second = token_of(&cluster.agents[1], "r").await;
    assert!(second > first, "{second} after {first}");
    support::eventually("node 2 raises its generation to 5", async || generation(1) == "generation 5\n").await;

    // Killed and started again (with node 1: a static cluster takes back no
    // single member): generation 6, above every token it handed out.
    cluster.agents.clear();
    cluster.agents = vec![start(0), start(1)];
    cluster.wait_links_up();
    assert_eq!(generation(1), "generation 6\n");
    let fresh = token_of(&cluster.agents[1], "s").await;
    assert!(fresh > second, "node 2 after its restart: {fresh}, {second} before");
}
