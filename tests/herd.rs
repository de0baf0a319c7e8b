//! A thundering herd on one hot lock is an ordinary workload: while 4,000
//! sessions queue for one held resource (each new waiter a deadlock search),
//! a client locking an unrelated resource is still served within 50 ms.

use std::time::{Duration, Instant};

use dlm_agent::client::{LockOptions, Session};
use dlm_core::Mode;
use support::Agent;

const WAITERS: usize = 4_000;

/// Locks and unlocks `cold` until told to stop; every round trip's time.
async fn probe(session: Session, stop: tokio::sync::watch::Receiver<bool>) -> Vec<Duration> {
    let mut rounds = Vec::new();
    while !*stop.borrow() {
        let begun = Instant::now();
        let guard = session.lock("default", "cold", Mode::Ex, LockOptions::default()).await.expect("probe lock");
        guard.unlock().await.expect("probe unlock");
        rounds.push(begun.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_is_served_within_50ms_while_4000_waiters_queue_on_one_hot_lock() {
    let agent = Agent::start("herd", "[limits]\nconnections_per_client_max = 8192\nwaiters_per_resource_max = 4096\n");
    let client = agent.client().await;
    let holder = client.session().await.expect("holder session");
    let hot = holder.lock("default", "hot", Mode::Ex, LockOptions::default()).await.expect("hot");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn(probe(client.session().await.expect("probe session"), stopped));

    let begun = Instant::now();
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..WAITERS {
        let session = client.session().await.expect("waiter session");
        waiters.spawn(async move {
            let granted = session.lock("default", "hot", Mode::Ex, LockOptions::default()).await;
            granted.map(|guard| guard.fencing_token()).map_err(|e| e.to_string())
        });
    }
    // Every waiter queued.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client.status().await.expect("status");
        if status.waiting as usize >= WAITERS {
            break;
        }
        assert!(Instant::now() < deadline, "only {} of {WAITERS} waiting", status.waiting);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queued_in = begun.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).expect("stop the probe");
    let mut rounds = prober.await.expect("probe");
    rounds.sort_unstable();
    let slowest = *rounds.last().expect("rounds");
    let median = rounds[rounds.len() / 2];
    eprintln!(
        "{WAITERS} waiters queued in {queued_in:?}; probe: {} rounds, median {median:?}, slowest {slowest:?}",
        rounds.len()
    );
    assert!(rounds.len() >= 20, "the probe ran alongside the herd ({} rounds)", rounds.len());
    assert!(slowest < Duration::from_millis(50), "a lock on an unrelated resource took {slowest:?}");

    // The herd drains in order once the holder lets go.
    hot.unlock().await.expect("unlock hot");
    let begun = Instant::now();
    let mut tokens = Vec::new();
    while let Some(granted) = waiters.join_next().await {
        tokens.push(granted.expect("waiter task").expect("granted"));
    }
    eprintln!("the herd drained in {:?}", begun.elapsed());
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), WAITERS, "every waiter granted once, each with its own token");
}
