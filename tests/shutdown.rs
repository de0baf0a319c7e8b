//! SIGTERM under load: every request a client has in flight gets an answer
//! (granted, cancelled, or refused as `shutting_down`), no connection is
//! reset, and the agent exits 0 within its bound.

use std::time::{Duration, Instant};

use dlm_agent::client::{Client, LockError, LockOptions, Session};
use dlm_agent::proto;
use dlm_core::Mode;
use support::Agent;

/// Sessions of each protocol.
const SESSIONS: usize = 24;

/// How one session's loop ended.
#[derive(Debug)]
enum End {
    /// The agent answered its last request: cancelled, or refused as shutting down.
    Answered(String),
    /// The session ended with a request unanswered.
    Unanswered(String),
}

/// Locks and unlocks until the agent stops it; how that went.
async fn churn(session: Session, resource: String, protocol: &'static str) -> (usize, End) {
    let mut rounds = 0;
    loop {
        let options = LockOptions { timeout: Some(Duration::from_secs(5)), ..LockOptions::default() };
        let guard = match session.lock("default", resource.as_str(), Mode::Ex, options).await {
            Ok(guard) => guard,
            Err(LockError::NotGranted(proto::Status::Cancelled)) => {
                return (rounds, End::Answered("cancelled".into()));
            }
            Err(LockError::Rejected { code, .. }) if code == "shutting_down" => {
                return (rounds, End::Answered(code));
            }
            Err(other) => return (rounds, End::Unanswered(format!("{protocol} lock: {other}"))),
        };
        match guard.unlock().await {
            Ok(()) => rounds += 1,
            // Revoked at shutdown: the unlock is refused, which is an answer.
            Err(LockError::Rejected { code, .. }) => return (rounds, End::Answered(code)),
            Err(LockError::NotGranted(status)) => return (rounds, End::Answered(format!("{status:?}"))),
            Err(other) => return (rounds, End::Unanswered(format!("{protocol} unlock: {other}"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_sigterm_under_load_every_request_in_flight_is_answered() {
    let mut agent = Agent::start("sigterm", "");
    let framed = agent.client().await;
    let grpc = Client::connect(&agent.target()).await.expect("connect").with_grpc_sessions();
    let mut churners = tokio::task::JoinSet::new();
    for i in 0..SESSIONS * 2 {
        let (client, protocol) = if i % 2 == 0 { (&framed, "framed") } else { (&grpc, "gRPC") };
        let session = client.session().await.expect("session");
        // Few resources: many requests wait at any moment.
        churners.spawn(churn(session, format!("r{}", i % 6), protocol));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = agent.child.as_ref().expect("running").id();
    let begun = Instant::now();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    let mut answered = std::collections::BTreeMap::<String, usize>::new();
    let mut rounds = 0;
    let mut unanswered = Vec::new();
    while let Some(ended) = churners.join_next().await {
        let (done, end) = ended.expect("churn task");
        rounds += done;
        match end {
            End::Answered(how) => *answered.entry(how).or_default() += 1,
            End::Unanswered(why) => unanswered.push(why),
        }
    }
    let status = support::wait_with_timeout(agent.child.as_mut().expect("running"), Duration::from_secs(10))
        .expect("the agent exits");
    eprintln!(
        "{rounds} lock/unlock rounds before SIGTERM; sessions answered {answered:?}, {} not, in {:?}",
        unanswered.len(),
        begun.elapsed()
    );
    assert!(status.success(), "exit: {status:?}\n{}", agent.log());
    assert!(rounds > 100, "the load was real: {rounds} rounds");
    assert!(unanswered.is_empty(), "requests left without an answer: {unanswered:?}");
    agent.child = None;
}
