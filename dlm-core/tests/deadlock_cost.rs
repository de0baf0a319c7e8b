//! Deadlock detection's work per event stays small however deep a queue
//! grows: a thundering herd on one hot lock is an ordinary workload.
//!
//! The work is counted, not timed: the wait-for edges the engine keeps for a
//! queue of N waiters (each new waiter's search walks them), which must grow
//! with N, not with N².

use dlm_core::*;

const WAITERS: u64 = 4_000;

fn lock(node: &mut Node, ls: LockspaceId, session: u64, handle: u64, name: &[u8]) {
    let request = LockRequest {
        handle: LockHandle(handle),
        lockspace: ls,
        name: name.to_vec(),
        mode: Mode::Ex,
        flags: LockFlags::EMPTY,
        timeout: None,
    };
    node.handle_client(Instant::ZERO, SessionId(session), ClientRequest::Lock(request)).expect("accepted");
}

/// Session 1 holds `hot` in EX and sessions 2..=N+1 queue behind it.
fn herd() -> (Node, LockspaceId) {
    let mut node = Node::new(NodeConfig::default()).expect("node");
    let ls = node.create_lockspace(b"herd", LockspaceConfig::default()).expect("lockspace");
    for session in 1..=WAITERS + 2 {
        node.open_session(SessionId(session)).expect("session");
    }
    for session in 1..=WAITERS + 1 {
        lock(&mut node, ls, session, 1, b"hot");
    }
    let _: Vec<Effect> = std::iter::from_fn(|| node.poll_effect()).collect();
    (node, ls)
}

#[test]
fn a_queue_of_4000_waiters_keeps_wait_for_edges_in_proportion_to_its_length() {
    let (node, _) = herd();
    let edges = node.wait_edges().len() as u64;
    // Each waiter waits for the holder and for the request ahead of it
    // (which waits, in turn, for the one ahead of it): 2 per waiter at most.
    // An edge to every request ahead would make N(N+1)/2, eight million here.
    assert!(edges <= 2 * WAITERS, "{edges} wait-for edges for {WAITERS} waiters");
}

#[test]
fn a_cycle_through_the_whole_queue_is_still_found_and_fails_the_youngest_wait() {
    let (mut node, ls) = herd();
    let last = WAITERS + 2;
    // The holder of `hot` waits for `cold`, whose holder then queues for
    // `hot` behind every waiter: a cycle through the whole queue.
    lock(&mut node, ls, last, 1, b"cold");
    let request = LockRequest {
        handle: LockHandle(2),
        lockspace: ls,
        name: b"cold".to_vec(),
        mode: Mode::Ex,
        flags: LockFlags::EMPTY,
        timeout: None,
    };
    node.handle_client(Instant::ZERO, SessionId(1), ClientRequest::Lock(request)).expect("accepted");
    let before: Vec<Effect> = std::iter::from_fn(|| node.poll_effect()).collect();
    assert!(!before.iter().any(|e| matches!(e, Effect::Complete(c) if c.status == Status::Deadlock)), "no cycle yet");
    lock(&mut node, ls, last, 2, b"hot");
    let effects: Vec<Effect> = std::iter::from_fn(|| node.poll_effect()).collect();
    let victims: Vec<&Completion> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Complete(c) if c.status == Status::Deadlock => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(victims.len(), 1, "{effects:?}");
    assert_eq!((victims[0].session, victims[0].handle), (SessionId(last), LockHandle(2)), "the youngest wait");
}
