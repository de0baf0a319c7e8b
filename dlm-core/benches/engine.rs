//! Criterion benchmarks of the engine on one thread: uncontended lock+unlock
//! pairs, and an EX hand-off between sessions on one contended resource.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dlm_core::{
    ClientRequest, Effect, Instant, LockFlags, LockHandle, LockRequest, LockspaceConfig, LockspaceId, Mode, Node,
    NodeConfig, SessionId, UnlockFlags, UnlockRequest,
};

fn setup(sessions: u64) -> (Node, LockspaceId) {
    let mut node = Node::new(NodeConfig::default()).expect("config");
    let ls = node.create_lockspace(b"bench", LockspaceConfig::default()).expect("lockspace");
    for s in 0..sessions {
        node.open_session(SessionId(s)).expect("session");
    }
    (node, ls)
}

fn lock(ls: LockspaceId, handle: u64, name: &[u8]) -> ClientRequest {
    ClientRequest::Lock(LockRequest {
        handle: LockHandle(handle),
        lockspace: ls,
        name: name.to_vec(),
        mode: Mode::Ex,
        flags: LockFlags::EMPTY,
        timeout: None,
    })
}

fn unlock(handle: u64) -> ClientRequest {
    ClientRequest::Unlock(UnlockRequest { handle: LockHandle(handle), flags: UnlockFlags::EMPTY, lvb: None })
}

/// Drains the effects as a driver would, returning how many there were.
fn drain(node: &mut Node) -> usize {
    let mut n = 0;
    while let Some(effect) = node.poll_effect() {
        black_box(&effect);
        n += 1;
    }
    n
}

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("uncontended");
    group.throughput(Throughput::Elements(1));
    // One session locking and unlocking one resource: the resource is
    // created and freed every time, as on an idle lock.
    group.bench_function("lock_unlock_pair", |b| {
        let (mut node, ls) = setup(1);
        let now = Instant::ZERO;
        b.iter(|| {
            node.handle_client(now, SessionId(0), lock(ls, 1, b"orders/42")).expect("lock");
            drain(&mut node);
            node.handle_client(now, SessionId(0), unlock(1)).expect("unlock");
            drain(&mut node);
        });
    });
    // The same with another lock keeping the resource alive (NL holder), so
    // only the lock is created and freed.
    group.bench_function("lock_unlock_pair_resource_kept", |b| {
        let (mut node, ls) = setup(2);
        let now = Instant::ZERO;
        let mut keep = lock(ls, 1, b"orders/42");
        if let ClientRequest::Lock(request) = &mut keep {
            request.mode = Mode::Nl;
        }
        node.handle_client(now, SessionId(1), keep).expect("keeper");
        drain(&mut node);
        b.iter(|| {
            node.handle_client(now, SessionId(0), lock(ls, 1, b"orders/42")).expect("lock");
            drain(&mut node);
            node.handle_client(now, SessionId(0), unlock(1)).expect("unlock");
            drain(&mut node);
        });
    });
    group.finish();
}

fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("contended");
    group.throughput(Throughput::Elements(1));
    // Two sessions alternate EX on one resource: each iteration is one
    // hand-off (unlock by the holder grants the waiter, which then queues
    // behind the new holder again).
    group.bench_function("ex_handoff_2_sessions", |b| {
        let (mut node, ls) = setup(2);
        let now = Instant::ZERO;
        node.handle_client(now, SessionId(0), lock(ls, 1, b"hot")).expect("lock");
        node.handle_client(now, SessionId(1), lock(ls, 1, b"hot")).expect("lock");
        drain(&mut node);
        let mut holder = 0u64;
        b.iter(|| {
            node.handle_client(now, SessionId(holder), unlock(1)).expect("unlock");
            node.handle_client(now, SessionId(holder), lock(ls, 1, b"hot")).expect("lock");
            let effects = drain(&mut node);
            debug_assert!(effects >= 2);
            holder ^= 1;
        });
    });
    // Eight sessions queue on one resource; each hand-off passes EX to the
    // next in FIFO order.
    group.bench_function("ex_handoff_8_sessions", |b| {
        let (mut node, ls) = setup(8);
        let now = Instant::ZERO;
        for s in 0..8 {
            node.handle_client(now, SessionId(s), lock(ls, 1, b"hot")).expect("lock");
        }
        drain(&mut node);
        let mut holder = 0u64;
        b.iter(|| {
            node.handle_client(now, SessionId(holder), unlock(1)).expect("unlock");
            node.handle_client(now, SessionId(holder), lock(ls, 1, b"hot")).expect("lock");
            drain(&mut node);
            holder = (holder + 1) % 8;
        });
    });
    group.finish();
}

fn effect_size(c: &mut Criterion) {
    // Not a timing: records the size of what every event allocates in the
    // effect queue, so a regression shows next to the figures.
    let _ = c;
    eprintln!("size_of::<Effect>() = {} bytes", std::mem::size_of::<Effect>());
}

criterion_group!(benches, uncontended, contended, effect_size);
criterion_main!(benches);
