//! Admission of clients: one user (or one address) that opens connections
//! and says nothing, or half an HTTP/2 preface, or opens every session it
//! can, does not lock other users out. Other users are played by the CLI
//! run as `nobody` (uid 65534), which needs root; without root these tests
//! say why and skip (under `CI=true` that is a failure).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::{Duration, Instant};

use dlm_agent::client::{Client, ClientError, ClientTls, LockOptions, Target};
use dlm_core::Mode;
use support::{Agent, http_get, under_ci};

const NOBODY: u32 = 65534;
/// Threads flooding the socket: one keeps one CPU of this 2-CPU machine busy.
const STORM_THREADS: usize = 1;

fn is_root(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    if !root {
        assert!(!under_ci(), "{test}: CI=true needs root, to run a client as another user");
        eprintln!("skipping {test}: playing a second user needs root");
    }
    root
}

/// `dlm-agent ARGS…` run as `nobody`, and how long it took.
fn as_nobody(agent: &Agent, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = agent.cli().args(args).uid(NOBODY).gid(NOBODY).output().expect("run the CLI as nobody");
    (output, started.elapsed())
}

/// What an attacker's connection sends before it goes quiet.
const HALF_STARTS: [&[u8]; 4] = [
    b"",                                 // nothing at all
    b"P",                                // the first byte of an HTTP/2 preface
    b"PRI * HTTP/2.0\r\n\r\n",           // part of the preface
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", // the preface, never its SETTINGS
];

/// Opens connections as fast as it can until `stop`, each sending one of
/// [`HALF_STARTS`] and then nothing; keeps up to `held` of them open,
/// replacing the oldest, as an attacker recycling its slots would.
fn storm(socket: std::path::PathBuf, held: usize, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> usize {
    let mut open = std::collections::VecDeque::new();
    let mut opened = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok(mut stream) = UnixStream::connect(&socket) else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let _ = stream.write_all(HALF_STARTS[opened % HALF_STARTS.len()]);
        opened += 1;
        open.push_back(stream);
        if open.len() > held {
            open.pop_front();
        }
    }
    opened
}

#[test]
fn a_storm_of_silent_and_half_preface_connections_from_one_uid_leaves_another_uid_served() {
    if !is_root("admission storm") {
        return;
    }
    let agent = Agent::start("storm", "handshake_timeout = \"1s\"\n");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stormers: Vec<_> = (0..STORM_THREADS)
        .map(|_| {
            let (socket, stop) = (agent.socket.clone(), stop.clone());
            std::thread::spawn(move || storm(socket, 1500, stop))
        })
        .collect();
    // Let the storm fill what it can.
    std::thread::sleep(Duration::from_secs(2));
    let mut slowest = Duration::ZERO;
    let mut took_all = Vec::new();
    for round in 0..10 {
        let (status, took) = as_nobody(&agent, &["status"]);
        assert!(status.status.success(), "round {round}: status as nobody failed: {status:?}\n{}", agent.log());
        slowest = slowest.max(took);
        took_all.push(took);
        let (lock, took) = as_nobody(&agent, &["lock", "--try", "storm", "--", "true"]);
        assert!(lock.status.success(), "round {round}: a lock as nobody failed: {lock:?}\n{}", agent.log());
        slowest = slowest.max(took);
        took_all.push(took);
        let healthz = http_get(&agent.http, "/healthz");
        assert_eq!(healthz.map(|(code, _)| code), Some(200), "round {round}: /healthz");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened: usize = stormers.into_iter().map(|t| t.join().expect("storm thread")).sum();
    eprintln!("storm: {opened} connections opened; nobody's calls took {took_all:?}");
    assert!(opened > 3000, "the storm was real: {opened} connections");
    assert!(slowest < Duration::from_secs(1), "another user waited {slowest:?} (at most 1 s)");
}

#[test]
fn a_connection_that_stops_mid_preface_is_closed_after_the_handshake_timeout() {
    let agent = Agent::start("halfstart", "handshake_timeout = \"300ms\"\n");
    for start in HALF_STARTS {
        let mut stream = UnixStream::connect(&agent.socket).expect("connect");
        stream.write_all(start).expect("write");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let begun = Instant::now();
        let mut byte = [0u8; 1];
        let read = stream.read(&mut byte);
        let took = begun.elapsed();
        assert!(matches!(read, Ok(0)) || read.is_err(), "{start:?}: the agent closed the connection: {read:?}");
        assert!(took < Duration::from_secs(3), "{start:?}: closed after {took:?}, not within the timeout");
        assert!(took >= Duration::from_millis(250), "{start:?}: closed after {took:?}, before the timeout");
    }
    // An honest client still gets in.
    let status = agent.cli().arg("status").output().expect("status");
    assert!(status.status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tcp_connections_from_one_address_hold_only_its_share() {
    let address = format!("127.0.0.1:{}", support::free_port());
    let pki = support::TestPki::new("tcpstorm");
    let _agent = Agent::start(
        "tcpstorm",
        &format!(
            "tcp = \"{address}\"\nhandshake_timeout = \"1s\"\n[limits]\nconnections_per_client_max = 50\n{}",
            pki.tls_section("agent.test")
        ),
    );
    // 200 silent connections from 127.0.0.1 (not even a TLS hello): 50 are
    // admitted (and closed after the timeout), the rest at once.
    let silent: Vec<std::net::TcpStream> =
        (0..200).map(|_| std::net::TcpStream::connect(&address).expect("connect")).collect();
    let closed_at_once = silent
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
            matches!((&mut &**s).read(&mut [0u8; 1]), Ok(0))
        })
        .count();
    assert!(closed_at_once >= 140, "connections past the address's share closed at once: {closed_at_once} of 200");
    // Once the admitted ones have timed out, the address's slots are back.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let tls = ClientTls { ca: std::fs::read(pki.ca()).expect("ca"), identity: None, server_name: "agent.test".into() };
    let client = Client::connect(&Target::Tls(address.clone(), tls)).await.expect("a TCP client gets in again");
    client.status().await.expect("status over TCP");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_cannot_open_every_session() {
    let agent = Agent::start("uidquota", "[limits]\nsessions_per_uid_max = 3\n");
    let client = agent.client().await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(client.session().await.expect("within the uid's share"));
    }
    let Err(refused) = client.session().await else { panic!("a fourth session of the same uid was opened") };
    let text = refused.to_string();
    assert!(
        matches!(&refused, ClientError::Call(status) if status.code() == tonic::Code::ResourceExhausted),
        "{refused:?}"
    );
    assert!(text.contains("limit_exceeded") && text.contains("sessions_per_uid_max"), "{text}");
    // The same uid over gRPC streams counts against the same share.
    let grpc = agent.client().await.with_grpc_sessions();
    assert!(grpc.session().await.is_err(), "gRPC sessions share the uid's count");
    if is_root("sessions per uid, as another user") {
        let (lock, _) = as_nobody(&agent, &["lock", "--try", "q", "--", "true"]);
        assert!(lock.status.success(), "another uid still gets a session: {lock:?}");
    }
    // A session given back is a slot back.
    drop(sessions.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        match client.session().await {
            Ok(session) => break session,
            Err(error) => assert!(Instant::now() < deadline, "no session after one was given back: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let guard = again.lock("default", "q", Mode::Ex, LockOptions::default()).await.expect("lock");
    assert!(guard.fencing_token() > 0);
}

/// `opened`, or an error when it takes more than 5 s.
async fn within<T>(opened: impl Future<Output = T>) -> Result<T, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(5), opened).await
}

/// From the Rust client: sessions multiplexed on one gRPC connection go past
/// HTTP/2's stream limit of old (1,024, where the 1,025th waited for ever,
/// neither welcomed nor refused) up to the uid's quota, then are refused at
/// once; a framed session past the connection quota is told why in place
/// of its welcome, and so is a gRPC connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_a_quota_a_client_is_refused_at_once_naming_the_limit() {
    const SESSIONS: usize = 1100;
    const CONNECTIONS: usize = 8;
    let agent = Agent::start(
        "quotas",
        &format!("[limits]\nsessions_per_uid_max = {SESSIONS}\nconnections_per_client_max = {CONNECTIONS}\n"),
    );
    let refused_within = |what: &str, opened: Result<Result<_, ClientError>, tokio::time::error::Elapsed>| {
        let refusal = match opened {
            Ok(Err(refusal)) => refusal,
            Ok(Ok(_)) => panic!("{what}: opened past its quota"),
            Err(_) => panic!("{what}: neither opened nor refused within 5 s"),
        };
        assert!(
            matches!(&refusal, ClientError::Call(status) if status.code() == tonic::Code::ResourceExhausted),
            "{what}: {refusal:?}"
        );
        refusal.to_string()
    };

    let grpc = agent.client().await.with_grpc_sessions();
    let mut sessions = Vec::new();
    for n in 0..SESSIONS {
        let session = within(grpc.session()).await.unwrap_or_else(|_| panic!("session {} hangs", n + 1));
        sessions.push(session.unwrap_or_else(|e| panic!("session {} of {SESSIONS}: {e}", n + 1)));
    }
    let text = refused_within("a session past the uid's quota", within(grpc.session()).await);
    assert!(text.contains("limits.sessions_per_uid_max = 1100") && text.contains("raise"), "{text}");
    drop((sessions, grpc));

    // One connection is the client's own (its admin calls); framed
    // sessions are one each.
    let framed = agent.client().await;
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while held.len() < CONNECTIONS - 1 {
        match framed.session().await {
            Ok(session) => held.push(session),
            // The gRPC sessions just dropped end as the agent sees them go.
            Err(error) => assert!(Instant::now() < deadline, "no room after the sessions ended: {error}"),
        }
    }
    let logged = agent.log().len();
    let text = refused_within("a framed session past the connection quota", within(framed.session()).await);
    assert!(text.contains("limits.connections_per_client_max = 8") && text.contains("raise"), "{text}");
    let another = within(agent.client()).await.expect("a new connection is accepted, then told why");
    let text = refused_within("a gRPC connection past the quota", within(another.with_grpc_sessions().session()).await);
    assert!(text.contains("limits.connections_per_client_max"), "{text}");

    let (_, metrics) = http_get(&agent.http, "/metrics").expect("metrics");
    assert!(metrics.contains("dlm_client_refused_total{limit=\"sessions_per_uid_max\"} 1"), "{metrics}");
    let connections_refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dlm_client_refused_total{limit=\"connections_per_client_max\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(connections_refused >= Some(2), "both refused connections counted:\n{metrics}");
    // (The loop above may have met the quota before the gRPC client's
    // connection was gone: an episode of its own.)
    let log = &agent.log()[logged..];
    assert_eq!(log.matches("refusing new client connections").count(), 1, "one episode, one warning:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_past_the_node_wide_ceiling_are_refused_with_a_typed_error() {
    // Two lockspaces, one ceiling for the node: what bounds its memory.
    let agent = Agent::start(
        "locksmax",
        "[limits]\nlocks_max = 100\n[[lockspace]]\nname = \"default\"\n[[lockspace]]\nname = \"other\"\n",
    );
    let client = agent.client().await;
    let session = client.session().await.expect("session");
    let mut held = Vec::new();
    for n in 0..100 {
        let lockspace = if n % 2 == 0 { "default" } else { "other" };
        held.push(session.lock(lockspace, format!("r{n}"), Mode::Pr, LockOptions::default()).await.expect("within"));
    }
    let refused = session.lock("other", "one-too-many", Mode::Pr, LockOptions::default()).await;
    match refused {
        Err(dlm_agent::client::LockError::Rejected { code, message }) => {
            assert_eq!(code, "limit_exceeded");
            assert!(message.contains("locks_max"), "{message}");
        }
        other => panic!("the 101st lock: {:?}", other.map(|g| g.fencing_token())),
    }
    held.pop().expect("a lock").unlock().await.expect("unlock");
    let again = session.lock("other", "one-too-many", Mode::Pr, LockOptions::default()).await;
    assert!(again.is_ok(), "a lock given back makes room");
}
