//! TLS on the agent's TCP listeners, attacked as issue 17 did: a peer
//! without a certificate of the cluster's CA, or with one naming another
//! member, is refused and counted; a second connection of a member replaces
//! the first; a TCP client without TLS is refused and one with a
//! certificate has that identity, and with `client_certificates =
//! "required"` one without is turned away; a TCP listener without `[tls]` does not
//! start; certificates rotate on SIGHUP without dropping sessions.

use std::time::Duration;

use dlm_agent::client::{Client, ClientTls, LockOptions, Target};
use dlm_agent::proto;
use dlm_core::Mode;
use dlm_core::cluster::NodeId;
use dlm_core::cluster::wire::{self, Hello};
use support::{Agent, TestPki, metric_value, path_str, tls_connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn hello(cluster: &str, node: u16) -> Vec<u8> {
    let cluster = cluster.as_bytes().to_vec();
    wire::encode_hello(&Hello { version: wire::VERSION, cluster, node: NodeId(node), epoch: 1, incarnation: 7 })
}

/// Whether the agent closes `stream` within 10 s (after a TLS alert, if
/// it sends one).
async fn closed<S: AsyncReadExt + Unpin>(stream: &mut S) -> bool {
    let mut buffer = [0u8; 256];
    let until_closed = async {
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), until_closed).await.is_ok()
}

/// Says `hello` over `stream`; true if the agent answered with its own hello.
async fn answered<S: AsyncReadExt + AsyncWriteExt + Unpin>(stream: &mut S, hello: &[u8]) -> bool {
    if stream.write_all(hello).await.is_err() || stream.flush().await.is_err() {
        return false;
    }
    let mut prefix = [0u8; 7];
    matches!(tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut prefix)).await, Ok(Ok(_)))
}

fn rejected(agent: &Agent, reason: &str) -> f64 {
    metric_value(&agent.metrics(), &format!("dlm_cluster_peer_rejected_total{{reason=\"{reason}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_needs_a_certificate_of_the_cluster_naming_the_member_it_claims() {
    let pki = TestPki::new("peertls");
    let rogue = TestPki::new("peertls-rogue");
    let peers: Vec<String> = support::free_ports(3).into_iter().map(|port| format!("127.0.0.1:{port}")).collect();
    let members = support::members_section(&peers);
    let config = format!("[cluster]\nname = \"peertls\"\nnode_id = 1\n{members}{}", pki.tls_section("node1"));
    let agent = Agent::start("peertls", &config);
    assert_eq!(metric_value(&agent.metrics(), "dlm_tls_insecure"), 0.0);
    let port = &peers[0];
    let (node2_cert, node2_key) = pki.issue("node2");
    let (node3_cert, node3_key) = pki.issue("node3");
    let (rogue_cert, rogue_key) = rogue.issue("node2");

    // A plain hello, as before TLS: the handshake fails.
    let mut plain = TcpStream::connect(port).await.expect("connect");
    plain.write_all(&hello("peertls", 2)).await.expect("write");
    assert!(closed(&mut plain).await, "a plain hello is refused");
    // No client certificate, or one another CA signed: refused in the handshake.
    let anonymous = tls_connect(port, &pki.ca(), None, "node1").await;
    assert!(anonymous.is_err() || closed(&mut anonymous.expect("connected")).await, "no certificate");
    let forged = tls_connect(port, &pki.ca(), Some((&rogue_cert, &rogue_key)), "node1").await;
    assert!(forged.is_err() || closed(&mut forged.expect("connected")).await, "another CA's certificate");
    support::eventually("three TLS refusals counted", async || rejected(&agent, "tls") >= 3.0).await;

    // Node 3's certificate claiming to be node 2: the hello is refused.
    let mut node3 = tls_connect(port, &pki.ca(), Some((&node3_cert, &node3_key)), "node1").await.expect("TLS");
    assert!(!answered(&mut node3, &hello("peertls", 2)).await, "node 3's certificate passes as node 2");
    assert_eq!(rejected(&agent, "wrong_certificate"), 1.0);

    // Node 2 proven by its certificate is let in; a second connection of
    // node 2 replaces the first, which is closed.
    let mut first = tls_connect(port, &pki.ca(), Some((&node2_cert, &node2_key)), "node1").await.expect("TLS");
    assert!(answered(&mut first, &hello("peertls", 2)).await, "node 2 is let in");
    let mut second = tls_connect(port, &pki.ca(), Some((&node2_cert, &node2_key)), "node1").await.expect("TLS");
    assert!(answered(&mut second, &hello("peertls", 2)).await, "node 2 again is let in");
    assert!(closed(&mut first).await, "the older connection of node 2 is closed");
    support::eventually("the replaced connection counted", async || rejected(&agent, "replaced") == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_need_tls_and_their_certificate_is_their_identity() {
    let pki = TestPki::new("clienttls");
    let address = format!("127.0.0.1:{}", support::free_port());
    let config = format!(
        "tcp = \"{address}\"\n[access.lockspace.default]\nlock = [\"*\"]\ndump = [\"cert:app.client\"]\n{}",
        pki.tls_section("agent.test")
    );
    let agent = Agent::start("clienttls", &config);
    // Plain gRPC to a TLS listener gets nowhere.
    let plain = tokio::time::timeout(Duration::from_secs(5), async {
        Client::connect(&Target::Tcp(address.clone())).await?.status().await
    })
    .await;
    assert!(!matches!(plain, Ok(Ok(_))), "a plain TCP client was served: {plain:?}");

    let ca = std::fs::read(pki.ca()).expect("ca");
    let (cert, key) = pki.issue("app.client");
    let with_cert = ClientTls {
        ca: ca.clone(),
        identity: Some((std::fs::read(cert).expect("cert"), std::fs::read(key).expect("key"))),
        server_name: "agent.test".into(),
    };
    let without_cert = ClientTls { ca, identity: None, server_name: "agent.test".into() };
    let dump = proto::DumpRequest { lockspace: "default".into(), ..Default::default() };
    let app = Client::connect(&Target::Tls(address.clone(), with_cert)).await.expect("TLS client");
    app.dump(dump.clone()).await.expect("cert:app.client may dump");
    let anonymous = Client::connect(&Target::Tls(address.clone(), without_cert)).await.expect("TLS client");
    let refused = anonymous.dump(dump).await.expect_err("an anonymous TCP client may not dump");
    assert!(refused.to_string().contains("permission_denied"), "{refused}");
    // Issue 17 filled `lockspaces_max` with junk lockspaces over TCP.
    let refused = anonymous.create_lockspace("junk", 32).await.expect_err("an anonymous TCP client may not create");
    assert!(refused.to_string().contains("permission_denied"), "{refused}");
    let names: Vec<String> =
        app.lockspaces().await.expect("lockspaces").lockspaces.into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["default"]);
    let session = anonymous.session().await.expect("a session over TLS");
    session.lock("default", "r", Mode::Ex, LockOptions::default()).await.expect("anyone may lock in default");
    drop(agent);

    // A TCP listener without [tls]: the agent does not start, and says why.
    let dir = support::Scratch::new("notls");
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("tcp = \"{address}\"\n")).expect("config");
    let output = std::process::Command::new(support::bin())
        .args(["run", "--http", "off", "--config", path_str(&config), "--socket"])
        .arg(dir.join("dlm.sock"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("insecure = true") && stderr.contains("tls"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_turn_away_clients_without_one_of_the_ca() {
    let (pki, other) = (TestPki::new("required"), TestPki::new("required-other"));
    let address = format!("127.0.0.1:{}", support::free_port());
    let config = format!(
        "tcp = \"{address}\"\n[access.lockspace.default]\nlock = [\"*\"]\n{}client_certificates = \"required\"\n",
        pki.tls_section("agent.test")
    );
    let agent = Agent::start("required", &config);
    let ca = std::fs::read(pki.ca()).expect("ca");
    let identity = |of: &TestPki, name: &str| {
        let (cert, key) = of.issue(name);
        Some((std::fs::read(cert).expect("cert"), std::fs::read(key).expect("key")))
    };
    let tls = |identity| ClientTls { ca: ca.clone(), identity, server_name: "agent.test".into() };
    // Served within five seconds, or not at all.
    let served = async |tls: ClientTls| {
        let status = async { Client::connect(&Target::Tls(address.clone(), tls)).await?.status().await };
        matches!(tokio::time::timeout(Duration::from_secs(5), status).await, Ok(Ok(_)))
    };
    assert!(!served(tls(None)).await, "a client without a certificate was served");
    assert!(!served(tls(identity(&other, "app.client"))).await, "a certificate of another CA was accepted");
    assert!(served(tls(identity(&pki, "app.client"))).await, "a certificate of the CA was refused");
    let session = Client::connect(&Target::Tls(address.clone(), tls(identity(&pki, "app.client"))))
        .await
        .expect("TLS client")
        .session()
        .await
        .expect("a session");
    session.lock("default", "r", Mode::Ex, LockOptions::default()).await.expect("lock");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_sighup_and_sessions_stay() {
    let (old, new) = (TestPki::new("rotate-old"), TestPki::new("rotate-new"));
    let address = format!("127.0.0.1:{}", support::free_port());
    let dir = old.dir.join("agent");
    std::fs::create_dir_all(&dir).expect("dir");
    let (files, install) = {
        let files = [dir.join("ca.pem"), dir.join("agent.pem"), dir.join("agent.key")];
        let install = move |pki: &TestPki, files: &[std::path::PathBuf; 3]| {
            let (cert, key) = pki.issue("agent.test");
            for (from, to) in [pki.ca(), cert, key].iter().zip(files) {
                std::fs::copy(from, to).expect("install a file");
            }
        };
        (files, install)
    };
    install(&old, &files);
    let config = format!(
        "tcp = \"{address}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        files[0].display(),
        files[1].display(),
        files[2].display()
    );
    let agent = Agent::start("rotate", &config);
    let trusting = |pki: &TestPki| {
        let tls =
            ClientTls { ca: std::fs::read(pki.ca()).expect("ca"), identity: None, server_name: "agent.test".into() };
        Target::Tls(address.clone(), tls)
    };
    let client = Client::connect(&trusting(&old)).await.expect("connects with the old CA");
    let session = client.session().await.expect("session");
    let held = session.lock("default", "kept", Mode::Ex, LockOptions::default()).await.expect("locked");

    install(&new, &files);
    let pid = agent.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    support::eventually("the reload counted", async || {
        metric_value(&agent.metrics(), "dlm_tls_reloads_total{outcome=\"success\"}") == 1.0
    })
    .await;
    // The session made before goes on; new connections get the new certificate.
    let again = session.lock("default", "after", Mode::Ex, LockOptions::default()).await.expect("the session goes on");
    assert!(Client::connect(&trusting(&new)).await.expect("the new CA").status().await.is_ok());
    let stale =
        tokio::time::timeout(Duration::from_secs(5), async { Client::connect(&trusting(&old)).await?.status().await })
            .await;
    assert!(!matches!(stale, Ok(Ok(_))), "a client trusting only the old CA still got in");

    // A broken key: the reload fails, counted, and the certificates in use stay.
    std::fs::write(&files[2], "not a key").expect("break the key");
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    support::eventually("the failed reload counted", async || {
        metric_value(&agent.metrics(), "dlm_tls_reloads_total{outcome=\"failure\"}") == 1.0
    })
    .await;
    assert!(Client::connect(&trusting(&new)).await.expect("still served").status().await.is_ok());
    held.unlock().await.expect("unlock");
    again.unlock().await.expect("unlock");
}
