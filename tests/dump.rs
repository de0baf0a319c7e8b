//! `dump` of a resource with a million locks works, from the CLI and from
//! a gRPC client with the default 4 MiB message limit, page by page; and
//! while it runs, other clients' locks are still granted promptly (each
//! page is a bounded slice of the engine's time).

use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dlm_agent::client::{LockGuard, LockOptions, Session};
use dlm_agent::proto;
use dlm_core::Mode;
use support::Agent;

/// Locks on the hot resource.
const LOCKS: usize = 1 << 20;
/// Tasks taking them, each one request at a time.
const TAKERS: usize = 64;

async fn take(session: Session, count: usize) -> Vec<LockGuard> {
    let mut guards = Vec::with_capacity(count);
    for _ in 0..count {
        guards.push(session.lock("default", "hot", Mode::Pr, LockOptions::default()).await.expect("PR granted"));
    }
    guards
}

/// Locks and unlocks `probe` until told to stop; the slowest round trip.
async fn probe(session: Session, stop: tokio::sync::watch::Receiver<bool>) -> (Duration, usize) {
    let (mut slowest, mut rounds) = (Duration::ZERO, 0);
    while !*stop.borrow() {
        let begun = Instant::now();
        let guard = session.lock("default", "probe", Mode::Ex, LockOptions::default()).await.expect("probe lock");
        guard.unlock().await.expect("probe unlock");
        slowest = slowest.max(begun.elapsed());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (slowest, rounds)
}

/// The agent's resident memory.
fn resident_bytes(agent: &Agent) -> f64 {
    let pid = agent.child.as_ref().expect("running").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_with_a_million_locks_is_dumped_page_by_page_from_the_cli_and_over_grpc() {
    let agent = Agent::start("bigdump", "[limits]\nlocks_per_session_max = 1048576\n");
    let client = agent.client().await;
    let resident_before = resident_bytes(&agent);
    let begun = Instant::now();
    let mut takers = tokio::task::JoinSet::new();
    let sessions: Vec<Session> = {
        let mut sessions = Vec::new();
        for _ in 0..4 {
            sessions.push(client.session().await.expect("session"));
        }
        sessions
    };
    for t in 0..TAKERS {
        takers.spawn(take(sessions[t % sessions.len()].clone(), LOCKS / TAKERS));
    }
    let mut held = Vec::with_capacity(LOCKS);
    while let Some(guards) = takers.join_next().await {
        held.extend(guards.expect("taker"));
    }
    let per_lock = (resident_bytes(&agent) - resident_before) / held.len() as f64;
    eprintln!(
        "{} PR locks taken in {:?}; the agent's memory grew {per_lock:.0} B per lock",
        held.len(),
        begun.elapsed()
    );
    // 627 B before the records were slimmed (776 B in the release build).
    assert!(per_lock <= 320.0, "{per_lock:.0} B of agent memory per held lock");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn(probe(client.session().await.expect("probe session"), stopped));

    // Over gRPC, page by page, each within the default 4 MiB message limit
    // (the client library's tonic channel keeps tonic's default).
    let begun = Instant::now();
    let (mut page_token, mut pages, mut locks, mut parts) = (Vec::new(), 0, 0, 0);
    loop {
        let request = proto::DumpRequest {
            lockspace: "default".into(),
            name: Some(b"hot".to_vec()),
            page_token,
            ..proto::DumpRequest::default()
        };
        let page = client.dump(request).await.expect("a page of the dump");
        pages += 1;
        for resource in &page.resources {
            assert_eq!(resource.name, b"hot");
            assert_eq!(resource.continued, parts > 0, "only the first part is not a continuation");
            parts += 1;
            locks += resource.granted.len() + resource.converting.len() + resource.waiting.len();
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    eprintln!("gRPC: {locks} locks in {pages} pages, {:?}", begun.elapsed());
    assert_eq!(locks, LOCKS, "every lock of the hot resource, once");
    assert!(pages > 100, "{pages} pages");

    // From the CLI: the resource whole, every lock a line.
    let begun = Instant::now();
    let mut cli = agent.cli().args(["dump", "hot"]).stdout(Stdio::piped()).spawn().expect("dump CLI");
    let stdout = std::io::BufReader::new(cli.stdout.take().expect("stdout"));
    let lines = tokio::task::spawn_blocking(move || {
        stdout.lines().map(|l| l.expect("utf-8 line")).filter(|l| l.trim_start().starts_with("session ")).count()
    })
    .await
    .expect("reader");
    let status = cli.wait().expect("CLI exit");
    eprintln!("CLI: {lines} lock lines in {:?}", begun.elapsed());
    assert!(status.success(), "{status:?}");
    assert_eq!(lines, LOCKS, "the CLI shows every lock");

    stop.send(true).expect("stop the probe");
    let (slowest, rounds) = prober.await.expect("probe");
    eprintln!("probe: {rounds} lock/unlock rounds during the dumps, slowest {slowest:?}");
    assert!(rounds > 10, "the probe ran alongside ({rounds} rounds)");
    // A page holds the engine for a few milliseconds; the old single-reply
    // dump held it for about a second.
    assert!(slowest < Duration::from_millis(250), "a lock took {slowest:?} during a dump");
    drop(held);
}
