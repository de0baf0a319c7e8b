//! A dump in pages gives every lock exactly once when nothing changes,
//! keeps each page within its bounds, and goes on sensibly when locks come
//! and go between pages.

use std::collections::BTreeSet;

use dlm_core::*;

fn lock(node: &mut Node, ls: LockspaceId, session: u64, handle: u64, name: &[u8], mode: Mode) {
    let request = LockRequest {
        handle: LockHandle(handle),
        lockspace: ls,
        name: name.to_vec(),
        mode,
        flags: LockFlags::EMPTY,
        timeout: None,
    };
    node.handle_client(Instant::ZERO, SessionId(session), ClientRequest::Lock(request)).expect("accepted");
}

/// Sessions 1..=`holders` hold `hot` in PR, sessions after them wait for
/// it in EX (up to 2,000), and session 1 also holds `cold-0`..`cold-{cold}`
/// in PR. (Holders rather than waiters make the bulk: each new waiter's
/// deadlock search walks the queue ahead of it, and this test is about
/// dumps.)
fn node_with(holders: u64, cold: u64) -> (Node, LockspaceId) {
    let waiters = 2_000.min(holders / 2);
    let mut config = NodeConfig::default();
    config.limits.waiters_per_resource_max = 1 << 20;
    let mut node = Node::new(config).expect("node");
    let ls = node.create_lockspace(b"pages", LockspaceConfig::default()).expect("lockspace");
    for session in 1..=holders + waiters {
        node.open_session(SessionId(session)).expect("session");
    }
    for session in 1..=holders + waiters {
        lock(&mut node, ls, session, 1, b"hot", if session <= holders { Mode::Pr } else { Mode::Ex });
    }
    for c in 0..cold {
        lock(&mut node, ls, 1, 100 + c, format!("cold-{c}").as_bytes(), Mode::Pr);
    }
    while node.poll_effect().is_some() {}
    (node, ls)
}

/// Every page, in order, with their bounds checked.
fn pages(node: &Node, ls: LockspaceId, name: Option<&[u8]>, bounds: PageBounds) -> Vec<DumpPage> {
    let mut pages: Vec<DumpPage> = Vec::new();
    let mut from = None;
    loop {
        let page = node.dump_page(ls, name, from.as_ref(), bounds).expect("dump page");
        let locks: usize = page.resources.iter().map(|r| r.granted.len() + r.converting.len() + r.waiting.len()).sum();
        assert!(locks <= bounds.locks, "{locks} locks in a page of at most {}", bounds.locks);
        assert!(page.resources.len() <= bounds.resources, "{} resources", page.resources.len());
        let next = page.next.map(|c| DumpCursor::from_bytes(&c.to_bytes()).expect("cursor round trip"));
        pages.push(page);
        match next {
            Some(cursor) => from = Some(cursor),
            None => return pages,
        }
        assert!(pages.len() < 100_000, "the dump does not end");
    }
}

/// (resource, queue, session, handle) of every lock in the pages.
fn locks_of(pages: &[DumpPage]) -> Vec<(Vec<u8>, u8, u64, u64)> {
    let mut all = Vec::new();
    for resource in pages.iter().flat_map(|p| &p.resources) {
        for (q, queue) in [&resource.granted, &resource.converting, &resource.waiting].into_iter().enumerate() {
            all.extend(queue.iter().map(|l| (resource.name.clone(), q as u8, l.session.0, l.handle.0)));
        }
    }
    all
}

#[test]
fn pages_give_the_whole_dump_once_within_their_bounds() {
    let (node, ls) = node_with(25_000, 300);
    let whole = node.dump(ls, None, usize::MAX).expect("dump");
    let bounds = PageBounds { resources: 50, locks: 1_000 };
    let paged = pages(&node, ls, None, bounds);
    let mut expected = locks_of(&[DumpPage { resources: whole, next: None }]);
    let mut got = locks_of(&paged);
    assert_eq!(got.len(), 25_000 + 2_000 + 300, "every lock once");
    // Queue order is kept within a resource, across pages.
    let hot: Vec<_> = got.iter().filter(|l| l.0 == b"hot").cloned().collect();
    let hot_expected: Vec<_> = expected.iter().filter(|l| l.0 == b"hot").cloned().collect();
    assert_eq!(hot, hot_expected, "the hot resource's queues, in order, across pages");
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    // The hot resource is split over pages: its later parts say so.
    let parts: Vec<bool> =
        paged.iter().flat_map(|p| &p.resources).filter(|r| r.name == b"hot").map(|r| r.continued).collect();
    assert!(parts.len() >= 25, "{} parts", parts.len());
    assert!(!parts[0] && parts[1..].iter().all(|&c| c), "only the first part is not a continuation");
}

#[test]
fn a_named_dump_is_paged_too() {
    let (node, ls) = node_with(5_000, 10);
    let bounds = PageBounds { resources: 10, locks: 700 };
    let paged = pages(&node, ls, Some(b"hot"), bounds);
    assert_eq!(paged.len(), 10, "7,000 locks in pages of 700");
    assert!(paged.iter().flat_map(|p| &p.resources).all(|r| r.name == b"hot"));
    assert_eq!(locks_of(&paged).len(), 7_000);
    let missing = node.dump_page(ls, Some(b"nothing"), None, bounds).expect("page");
    assert_eq!(missing, DumpPage::default());
}

#[test]
fn locks_that_go_between_pages_do_not_derail_the_dump() {
    let (mut node, ls) = node_with(3_000, 0);
    // Sessions 1..=3,000 hold `hot` (PR), 3,001..=4,500 wait (EX).
    let bounds = PageBounds { resources: 10, locks: 1_000 };
    let first = node.dump_page(ls, None, None, bounds).expect("page");
    let cursor = first.next.expect("more to come");
    // The cursor's lock (the 1,001st: session 1001's) and a few before it go.
    for session in 995..=1001 {
        node.end_session(Instant::ZERO, SessionId(session)).expect("end");
    }
    while node.poll_effect().is_some() {}
    let second = node.dump_page(ls, None, Some(&cursor), bounds).expect("page");
    let sessions: BTreeSet<u64> = locks_of(&[second]).iter().map(|l| l.2).collect();
    // Falling back to "after as many as were given", the page starts 1,000
    // locks into the queue as it now is: at session 1008.
    assert_eq!(sessions.first(), Some(&1008));
    assert!(!sessions.contains(&1001));

    // A cursor whose lock is still there continues from it exactly.
    let first = node.dump_page(ls, None, None, bounds).expect("page");
    let cursor = first.next.expect("more");
    node.end_session(Instant::ZERO, SessionId(5)).expect("end");
    while node.poll_effect().is_some() {}
    let second = node.dump_page(ls, None, Some(&cursor), bounds).expect("page");
    let last_given = locks_of(&[first]).last().cloned().expect("locks");
    let next_given = locks_of(&[second]).first().cloned().expect("locks");
    assert_eq!(next_given.2, last_given.2 + 1, "no lock skipped though one ahead went");
}

#[test]
fn a_page_looks_at_a_bounded_number_of_slots() {
    // 100,000 resources created, all but the last freed: the slots stay.
    let mut node = Node::new(NodeConfig::default()).expect("node");
    let ls = node.create_lockspace(b"sparse", LockspaceConfig::default()).expect("lockspace");
    node.open_session(SessionId(1)).expect("session");
    for r in 0..100_000u64 {
        lock(&mut node, ls, 1, r + 1, format!("r{r}").as_bytes(), Mode::Nl);
    }
    for r in 0..99_999u64 {
        let unlock = UnlockRequest { handle: LockHandle(r + 1), lvb: None, flags: UnlockFlags::EMPTY };
        node.handle_client(Instant::ZERO, SessionId(1), ClientRequest::Unlock(unlock)).expect("unlock");
    }
    while node.poll_effect().is_some() {}
    let paged = pages(&node, ls, None, PageBounds { resources: 1_000, locks: 1_000 });
    assert!(paged.len() >= 2, "100,000 slots take more than one page of {SLOTS_PER_PAGE_MAX}");
    assert_eq!(locks_of(&paged).len(), 1);
}
