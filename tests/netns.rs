//! Three agents, each in its own network namespace joined by veth pairs to
//! a bridge, so that one node's link can really be cut. Needs root (to make
//! namespaces); elsewhere it says so and skips, and under `CI=true` a skip
//! is a failure.

use std::time::{Duration, Instant};

use dlm_agent::client::{LockError, LockOptions};
use dlm_agent::proto;
use dlm_core::Mode;
use dlm_core::cluster::{Member, Membership, NodeId};
use support::corosync::Hosts;
use support::{Agent, metric_value};

fn peer_up(agent: &Agent, peer: u16) -> bool {
    metric_value(&agent.metrics(), &format!("dlm_cluster_peer_up{{peer=\"{peer}\"}}")) == 1.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_fails_requests_that_need_the_node_and_healing_it_restores_them() {
    if !support::corosync::can_run("a_cut_link_fails_requests", false) {
        return;
    }
    let hosts = Hosts::make(3);
    let members: String = (0..3)
        .map(|i| format!("[[cluster.member]]\nid = {}\naddress = \"{}\"\n", i + 1, hosts.address(i, 7400)))
        .collect();
    let pki = support::TestPki::new("netns");
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let config = format!(
                "[cluster]\nname = \"netns\"\nnode_id = {}\npeer_timeout = \"500ms\"\ndeadlock_interval = \"100ms\"\n{members}{}",
                i + 1,
                pki.tls_section(&format!("node{}", i + 1))
            );
            Agent::start_in_netns(&format!("netns-n{}", i + 1), &config, &hosts.namespaces[i], &hosts.address(i, 9420))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(peer_up(&agents[0], 2) && peer_up(&agents[0], 3) && peer_up(&agents[2], 1)) {
        assert!(Instant::now() < deadline, "links not up:\n{}", agents[0].log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let membership =
        Membership::new((1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect(), 1).expect("members");
    let on_node_3 = |prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|name| membership.directory(b"default", name.as_bytes()) == NodeId(3))
            .expect("a name whose directory is node 3")
    };
    let session = agents[0].client().await.session().await.expect("session");
    // Across the bridge, before the cut.
    let before = on_node_3("before");
    session
        .lock("default", before.as_str(), Mode::Ex, LockOptions::default())
        .await
        .expect("granted")
        .unlock()
        .await
        .expect("unlock");

    hosts.link(2, false);
    // Nothing is asked of node 3: its heartbeats going unanswered is what
    // tells node 1 that it is gone.
    let cut = Instant::now();
    while peer_up(&agents[0], 3) {
        assert!(cut.elapsed() < Duration::from_secs(10), "node 1 never noticed the cut:\n{}", agents[0].log());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("an idle link cut was noticed after {:?}", cut.elapsed());
    let during = on_node_3("during");
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        session.lock("default", during.as_str(), Mode::Ex, LockOptions::default()),
    )
    .await
    .expect("the request ends instead of hanging")
    .map(|g| g.fencing_token());
    assert!(matches!(outcome, Err(LockError::NotGranted(proto::Status::Unavailable))), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "known unreachable: it fails at once");
    eprintln!("a request needing the cut-off node failed after {:?}", started.elapsed());

    hosts.link(2, true);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !peer_up(&agents[0], 3) {
        assert!(Instant::now() < deadline, "link to node 3 not back:\n{}", agents[0].log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = tokio::time::timeout(
        Duration::from_secs(10),
        session.lock("default", during.as_str(), Mode::Ex, LockOptions::default()),
    )
    .await
    .expect("granted in time");
    after.expect("granted once the link is back");
    drop(agents);
}
