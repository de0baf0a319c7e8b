//! Three agents, each in its own network namespace joined by veth pairs to
//! a bridge, so that one node's link can really be cut. Needs root (to make
//! namespaces); elsewhere it says so and skips, and under `CI=true` a skip
//! is a failure.

use std::process::Command;
use std::time::{Duration, Instant};

use dlm_agent::client::{LockError, LockOptions};
use dlm_agent::proto;
use dlm_core::Mode;
use dlm_core::cluster::{Member, Membership, NodeId};
use support::{Agent, metric_value};

/// Namespaces, veth pairs and a bridge made for one test, removed on drop.
struct Hosts {
    bridge: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
    subnet: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl Hosts {
    fn make(n: usize) -> Hosts {
        let id = std::process::id() % 10_000;
        let subnet = format!("10.79.{}", id % 250);
        let hosts = Hosts {
            bridge: format!("dlmb{id}"),
            namespaces: (1..=n).map(|i| format!("dlmt{id}-{i}")).collect(),
            veths: (1..=n).map(|i| format!("dlmv{id}-{i}")).collect(),
            subnet,
        };
        ip(&["link", "add", &hosts.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}.254/24", hosts.subnet), "dev", &hosts.bridge]);
        ip(&["link", "set", &hosts.bridge, "up"]);
        for (i, (ns, veth)) in hosts.namespaces.iter().zip(&hosts.veths).enumerate() {
            ip(&["netns", "add", ns]);
            ip(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            ip(&["link", "set", veth, "master", &hosts.bridge, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{}.{}/24", hosts.subnet, i + 1), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    fn address(&self, i: usize, port: u16) -> String {
        format!("{}.{}:{port}", self.subnet, i + 1)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

fn can_make_namespaces() -> bool {
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let has_ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    if root && has_ip {
        return true;
    }
    let reason = if root { "the ip command (iproute2) is missing" } else { "making network namespaces needs root" };
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true and this test cannot run: {reason}");
    eprintln!("skipped: {reason}");
    false
}

fn peer_up(agent: &Agent, peer: u16) -> bool {
    metric_value(&agent.metrics(), &format!("dlm_cluster_peer_up{{peer=\"{peer}\"}}")) == 1.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_fails_requests_that_need_the_node_and_healing_it_restores_them() {
    if !can_make_namespaces() {
        return;
    }
    let hosts = Hosts::make(3);
    let members: String = (0..3)
        .map(|i| format!("[[cluster.member]]\nid = {}\naddress = \"{}\"\n", i + 1, hosts.address(i, 7400)))
        .collect();
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let config = format!(
                "[cluster]\nname = \"netns\"\nnode_id = {}\npeer_timeout = \"500ms\"\ndeadlock_interval = \"100ms\"\n{members}",
                i + 1
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

    ip(&["link", "set", &hosts.veths[2], "down"]);
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

    ip(&["link", "set", &hosts.veths[2], "up"]);
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
