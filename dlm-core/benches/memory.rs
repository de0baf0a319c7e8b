//! Bytes of heap per resource and per lock, measured with a counting
//! allocator at one million of each (the figures the README quotes).
//!
//! `cargo bench -p dlm-core --bench memory` prints (and checks the target):
//! - bytes per resource holding one lock (1 M resources, one lock each);
//! - bytes per additional lock (1 M NL locks on one resource).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use dlm_core::{
    ClientRequest, Instant, LockFlags, LockHandle, LockRequest, LockspaceConfig, Mode, Node, NodeConfig, SessionId,
};

/// Counts live heap bytes (as requested by the program, not the allocator's
/// rounding).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

#[expect(unsafe_code, reason = "a global allocator is an unsafe trait; this one only counts and delegates")]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout, passed through to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const COUNT: u64 = 1_000_000;

fn main() {
    // The target is for a million resources (smaller counts pay relatively
    // more for half-empty tables), so that is measured under `cargo test
    // --benches` too. A million locks on one resource is for `cargo bench`
    // only: debug assertions check the whole resource after every request.
    let per_resource = measure(COUNT, |i| (format!("resource/{i:08}").into_bytes(), Mode::Ex));
    let lock_count = if std::env::args().any(|a| a == "--bench") { COUNT } else { 10_000 };
    let per_lock = measure(lock_count, |_| (b"one-resource".to_vec(), Mode::Nl));
    println!("resources with one lock: {COUNT}, {per_resource:.1} bytes per resource (target <= {RESOURCE_BYTES_MAX})");
    println!("locks on one resource:   {lock_count}, {per_lock:.1} bytes per lock");
    // The target is checked here so that `cargo test --benches` (the test
    // command) fails when a change makes resources fatter.
    assert!(per_resource <= RESOURCE_BYTES_MAX, "{per_resource:.1} bytes per resource exceeds {RESOURCE_BYTES_MAX}");
}

/// Heap bytes a resource holding one lock may cost, everything included.
const RESOURCE_BYTES_MAX: f64 = 256.0;

/// Takes `count` locks from one session, `request(i)` naming the resource and
/// mode of the i-th; returns live bytes per lock afterwards.
fn measure(count: u64, request: impl Fn(u64) -> (Vec<u8>, Mode)) -> f64 {
    let mut node = Node::new(NodeConfig::default()).expect("config");
    let ls = node.create_lockspace(b"memory", LockspaceConfig::default()).expect("lockspace");
    node.open_session(SessionId(1)).expect("session");
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..count {
        let (name, mode) = request(i);
        let lock = ClientRequest::Lock(LockRequest {
            handle: LockHandle(i),
            lockspace: ls,
            name,
            mode,
            flags: LockFlags::EMPTY,
            timeout: None,
        });
        node.handle_client(Instant::ZERO, SessionId(1), lock).expect("lock");
        while node.poll_effect().is_some() {}
    }
    let after = LIVE.load(Ordering::Relaxed);
    drop(node);
    (after - before) as f64 / count as f64
}
