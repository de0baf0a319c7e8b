//! A worker spins briefly before it parks, while requests are flowing.
//!
//! A request that finds the agent's worker asleep pays for waking it: on a
//! VM a cross-CPU wake-up costs tens of microseconds, several times the
//! lock engine's work. When the worker's last sleep was short (requests are
//! arriving back to back), it spins for up to `DLM_SPIN_US` microseconds
//! (default [`DEFAULT_SPIN`]: off) before parking, watching the runtime's epoll
//! instance: a request arriving meanwhile is taken at once, with no
//! wake-up. An idle agent does not spin (its sleeps are long), and neither
//! does one whose threads may run on one CPU only (spinning there would
//! only keep the client that is to send the next request off the CPU).
//! The CPU it burns is the agent's, and the benchmarks count it.
//!
//! The check is `poll(2)` on the runtime's epoll descriptors (the process's
//! epoll instances when the runtime was just built), which reports one
//! readable when any of its events is ready without taking the event (epoll
//! hands it out only from `epoll_wait`): the runtime's own park then finds
//! it. Sessions through shared-memory rings are looked at directly, with
//! their clients told not to ring while the worker spins
//! ([`dlm_proto::framing::ring::Watched::hush`]): a request there costs
//! the client no system call and the agent no `epoll_wait`.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use dlm_proto::framing::ring::{Hush, Watched};
use prometheus::IntCounter;

/// How long a worker spins at most, unless `DLM_SPIN_US` says otherwise:
/// not at all. Measured with the peer benchmark on a 2-CPU VM whose
/// cross-CPU round trip was 7 µs at the time, 50 µs of spin bought nothing
/// it could show (one client: 38.5k pairs/s against 40.9k without; 32
/// clients: +7 %; contended hand-offs per CPU-second: −6 %), so it is
/// offered, not imposed. It pays with the client's spin for a due answer
/// (`dlm_client::DEFAULT_ANSWER_SPIN`): then neither side sleeps between a
/// request and its answer (one client, unpinned, cross-CPU round trip
/// 39 µs: a pair's p50 69.0 µs with the client's spin alone, 44.5 µs with
/// both); the peer benchmark runs with 50 µs.
pub const DEFAULT_SPIN: Duration = Duration::ZERO;

/// A sleep longer than this means requests are not flowing: no spin next time.
const FLOWING: Duration = Duration::from_micros(500);

/// How often a worker checks how many CPUs it may run on: every this many
/// parks (counted, not timed: a clock read per park was one of the agent's
/// ten per request).
const CPUS_RECHECK_PARKS: u32 = 1024;

/// The most epoll instances watched (a runtime makes one or two).
const EPOLL_MAX: usize = 4;

/// The agent's sessions through shared-memory rings, looked at while a
/// worker spins (on a current-thread runtime only: [`enable`]).
pub static RINGS: Watched = Watched::new();

/// Whether a spinning worker looks at [`RINGS`] in their clients' place.
static HUSH_RINGS: AtomicBool = AtomicBool::new(false);

/// `dlm_agent_spin_ring_catches_total`: spins that ended on a ring
/// session's bytes, each a request taken with no wake-up and no bell rung.
pub static RING_CATCHES: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "dlm_agent_spin_ring_catches_total",
        "Spins of the agent's worker before it parks that ended on a ring session's bytes: requests taken with no \
         wake-up and no bell rung by their client.",
    )
    .expect("valid metric")
});

/// The runtime's epoll descriptors (-1: none): none, no spinning.
static EPOLL_FDS: [AtomicI32; EPOLL_MAX] = [const { AtomicI32::new(-1) }; EPOLL_MAX];
static SPIN_NS: AtomicU64 = AtomicU64::new(0);
/// What [`enable`] found, for the agent's log.
static STATE: OnceLock<String> = OnceLock::new();

thread_local! {
    static PARKED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
    static LAST_SLEEP: Cell<Duration> = const { Cell::new(Duration::MAX) };
    /// Parks left before the next check, and what the last one found.
    static MANY_CPUS: Cell<Option<(u32, bool)>> = const { Cell::new(None) };
}

/// The spin asked for: `DLM_SPIN_US` (0 turns it off), else [`DEFAULT_SPIN`].
#[must_use]
pub fn configured() -> Duration {
    std::env::var("DLM_SPIN_US")
        .ok()
        .and_then(|us| us.trim().parse::<u64>().ok())
        .map_or(DEFAULT_SPIN, Duration::from_micros)
}

/// Turns spinning on, once the runtime is built and before anything else
/// opens an epoll instance: finds the runtime's. `one_worker`: the runtime
/// is a current-thread one, whose worker may look at the ring sessions in
/// their clients' place (see [`RINGS`]). Returns why it stays off.
///
/// # Errors
/// No single epoll descriptor in the process (then nothing spins).
pub fn enable(spin: Duration, one_worker: bool) -> Result<(), String> {
    let result = find_and_enable(spin);
    // A reader woken from the hook runs before the worker parks only on a
    // current-thread runtime: a multi-thread worker parks with the task
    // queued for whichever worker wakes next, and its client did not ring.
    HUSH_RINGS.store(result.is_ok() && one_worker, Ordering::Relaxed);
    let state = match &result {
        Ok(()) if spin.is_zero() => "off (DLM_SPIN_US=0)".to_string(),
        Ok(()) if one_worker => format!(
            "up to {} µs while requests flow, on more than one CPU, looking at ring sessions in their clients' place",
            spin.as_micros()
        ),
        Ok(()) => format!("up to {} µs while requests flow, on more than one CPU", spin.as_micros()),
        Err(why) => format!("off: {why}"),
    };
    let _ = STATE.set(state);
    result
}

/// How the workers spin, as [`enable`] set it ("off" if it never ran).
#[must_use]
pub fn state() -> &'static str {
    STATE.get().map_or("off", String::as_str)
}

fn find_and_enable(spin: Duration) -> Result<(), String> {
    if spin.is_zero() {
        return Ok(());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))? {
        let Ok(entry) = entry else { continue };
        let is_epoll =
            std::fs::read_link(entry.path()).is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]");
        if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            && is_epoll
        {
            found.push(fd);
        }
    }
    if found.is_empty() || found.len() > EPOLL_MAX {
        return Err(format!("{} epoll descriptors where the runtime's 1 or 2 were expected", found.len()));
    }
    SPIN_NS.store(u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    for (slot, fd) in EPOLL_FDS.iter().zip(found) {
        slot.store(fd, Ordering::Relaxed);
    }
    Ok(())
}

/// The runtime's hook before a worker parks. Where the worker will not
/// spin (spinning off, one CPU) it reads no clock: the sleeps are timed
/// only to tell whether requests flow, which only the spin asks.
pub fn before_park() {
    let spin = Duration::from_nanos(SPIN_NS.load(Ordering::Relaxed));
    if spin.is_zero() || !many_cpus() {
        PARKED_AT.set(None);
        return;
    }
    if LAST_SLEEP.get() < FLOWING {
        let start = Instant::now();
        // While it spins, the ring sessions' clients need not ring their
        // bells: it looks at their rings itself, and wakes a session's
        // reader whose ring got bytes (then the runtime runs it instead of
        // parking). Dropped, it puts the flags back and looks once more.
        let hush = if HUSH_RINGS.load(Ordering::Relaxed) { RINGS.hush(None) } else { None };
        loop {
            if hush.as_ref().is_some_and(Hush::wake_unread) {
                RING_CATCHES.inc();
                break;
            }
            if ready() || start.elapsed() >= spin {
                break;
            }
            std::hint::spin_loop();
        }
    }
    PARKED_AT.set(Some(Instant::now()));
}

/// The runtime's hook once a worker runs again.
pub fn after_unpark() {
    LAST_SLEEP.set(PARKED_AT.take().map_or(Duration::MAX, |at| at.elapsed()));
}

/// Whether one of the runtime's epoll instances has an event ready.
fn ready() -> bool {
    let mut polls = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; EPOLL_MAX];
    for (poll, fd) in polls.iter_mut().zip(&EPOLL_FDS) {
        // poll(2) skips a negative descriptor.
        poll.fd = fd.load(Ordering::Relaxed);
    }
    // SAFETY: `polls` is EPOLL_MAX valid pollfds; each descriptor is the
    // runtime's epoll instance, open as long as the runtime (the process's
    // life), or -1; a zero timeout.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), EPOLL_MAX as libc::nfds_t, 0) };
    n > 0
}

/// Whether this thread may run on more than one CPU (looked at again every
/// `CPUS_RECHECK_PARKS` asks: an operator may pin the agent while it runs).
pub fn many_cpus() -> bool {
    if let Some((left, many)) = MANY_CPUS.get()
        && left > 0
    {
        MANY_CPUS.set(Some((left - 1, many)));
        return many;
    }
    let many = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    MANY_CPUS.set(Some((CPUS_RECHECK_PARKS, many)));
    many
}
