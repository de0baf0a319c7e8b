//! A session's reader spins briefly before it sleeps while an answer is due.
//!
//! An answer that finds the client asleep pays for waking it: on a VM a
//! cross-CPU wake-up costs tens of microseconds, more than the agent's work
//! on a lock. So while a request waits for its answer, whoever reads the
//! session's frames (the requester itself, `incoming`) reads the connection
//! without sleeping, for up to the session's spin, before it parks as usual.
//! One reader of the process spins at a time, and only for an answer likely
//! to come within the spin:
//! - while its session is the process's only one with an answer due and
//!   its last spin did not miss: with several, the runtime's threads have
//!   other sessions' work to do, and a spin would hold one of them from it
//!   (measured: 8 clients in one process fell from 81.5k to 39.1k pairs/s
//!   when each spun); a lock queued behind a holder answers late, so after
//!   a spin that caught nothing it sits out [`MISSES_SIT_OUT`] requests;
//! - or for an unlock's answer, which waits for no other holder, on a
//!   session whose frames come through shared-memory rings, whatever else
//!   is due: it stops as soon as another ring session of the process has
//!   frames waiting, so that the runtime takes them. This is the hand-off
//!   of a contended lock: the holder's unlock is answered, and the next
//!   waiter granted, within the agent's one pass, while the process's
//!   other sessions wait for grants that come one a hand-off; without the
//!   spin, every hand-off put the client process to sleep and woke it
//!   across CPUs (peer benchmark, 8 clients on one lock, unpinned, side by
//!   side: 39.8-42.6k hand-offs/s at 25.8-27.7k per CPU-second became
//!   89-95k at 45.7-48.3k; the uncontended rows and one CPU unchanged).
//!
//! Nor does it spin when this thread may run on one CPU only (the spin
//! would only keep the agent off that CPU). The CPU it burns is the
//! client's; the peer benchmark counts it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dlm_proto::framing;
use dlm_proto::framing::ring::{Registration, Watched};
use tokio::io::{AsyncRead, ReadBuf};

/// How long a framed session's reader spins for a due answer, unless
/// [`Client::with_answer_spin`](crate::Client::with_answer_spin) or
/// `DLM_CLIENT_SPIN_US` says otherwise. Measured with the peer benchmark
/// (unpinned, one client, 2-CPU VM whose cross-CPU round trip was 39 µs):
/// a pair's p50 84.5 µs without it, 69.0 µs with 50 µs, 44.5 µs with the
/// agent spinning too (`DLM_SPIN_US=50`); the client's CPU per pair 37.2,
/// 48.1 and 32.1 µs.
pub const DEFAULT_ANSWER_SPIN: Duration = Duration::from_micros(50);

/// The spin a new [`Client`](crate::Client) takes: `DLM_CLIENT_SPIN_US` (0:
/// none), else [`DEFAULT_ANSWER_SPIN`].
#[must_use]
pub fn answer_spin() -> Duration {
    std::env::var("DLM_CLIENT_SPIN_US")
        .ok()
        .and_then(|us| us.trim().parse::<u64>().ok())
        .map_or(DEFAULT_ANSWER_SPIN, Duration::from_micros)
}

/// Requests sent without spinning after a spin that caught nothing.
const MISSES_SIT_OUT: u32 = 64;

/// How often the reader checks how many CPUs it may run on: every this many
/// reads it may spin for (counted, not timed: a clock read per read cost
/// one CPU's 128 clients 5-8 % of their pairs).
const CPUS_RECHECK_READS: u32 = 1024;

/// Sessions of this process with an answer due.
static SESSIONS_DUE: AtomicUsize = AtomicUsize::new(0);

/// A reader of this process spins now.
static SPINNING: AtomicBool = AtomicBool::new(false);

/// The process's sessions through rings, by number: what a spin for an
/// unlock's answer watches, to stop when another session's frames come.
static RINGS: Watched = Watched::new();
const NO_RING: u64 = u64::MAX;

/// What the requesting side and the reader share: whether an answer is due,
/// and how to wake the reader to spin for it.
pub(crate) struct AnswerDue {
    spin: Duration,
    due: AtomicUsize,
    /// Requests still to go without a spin (after one that caught nothing).
    sitting_out: AtomicU32,
    /// What the reader last found: this thread may run on one CPU only.
    one_cpu: AtomicBool,
    /// The last request's answer waits for no other holder (an unlock's).
    soon: AtomicBool,
    /// The session's number in [`RINGS`] ([`NO_RING`]: on its socket), set
    /// by its reader.
    ring: AtomicU64,
}

impl AnswerDue {
    pub(crate) fn new(spin: Duration) -> Arc<AnswerDue> {
        Arc::new(AnswerDue {
            spin,
            due: AtomicUsize::new(0),
            sitting_out: AtomicU32::new(0),
            one_cpu: AtomicBool::new(false),
            soon: AtomicBool::new(false),
            ring: AtomicU64::new(NO_RING),
        })
    }

    /// Whether a reader would spin for the answer now due, as far as the
    /// session knows (the reader checks again): then the requester reads
    /// for it itself (`incoming`).
    pub(crate) fn would_spin(&self) -> bool {
        !self.spin.is_zero() && !self.one_cpu.load(Ordering::Relaxed) && self.answer_likely_within_spin()
    }

    /// The answer due is one to spin for (see [`SpinKind`]).
    fn answer_likely_within_spin(&self) -> bool {
        self.spin_kind().is_some_and(SpinKind::spin_now)
    }

    /// The spin the answer due may have, before the other sessions are
    /// looked at.
    fn spin_kind(&self) -> Option<SpinKind> {
        if SESSIONS_DUE.load(Ordering::Acquire) <= 1 && self.sitting_out.load(Ordering::Relaxed) == 0 {
            return Some(SpinKind::Alone);
        }
        let ring = self.ring.load(Ordering::Relaxed);
        (self.soon.load(Ordering::Relaxed) && ring != NO_RING).then_some(SpinKind::Soon { ring })
    }

    /// The request about to be sent: whether its answer waits for no other
    /// holder (an unlock). Several requests of one session in flight share
    /// the flag: the last one's says.
    pub(crate) fn expect_soon(&self, soon: bool) {
        self.soon.store(soon, Ordering::Relaxed);
    }

    /// How many requests wait for their answer (set by the session when its
    /// waiters change, under their lock).
    pub(crate) fn set_due(&self, due: usize) {
        let was = self.due.swap(due, Ordering::AcqRel);
        if was == 0 && due > 0 {
            SESSIONS_DUE.fetch_add(1, Ordering::AcqRel);
        } else if was > 0 && due == 0 {
            SESSIONS_DUE.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A request was sent: one fewer to sit out after a spin that missed.
    pub(crate) fn sent(&self) {
        let sitting_out = self.sitting_out.load(Ordering::Relaxed);
        if sitting_out > 0 {
            self.sitting_out.store(sitting_out - 1, Ordering::Relaxed);
        }
    }
}

impl Drop for AnswerDue {
    fn drop(&mut self) {
        self.set_due(0);
    }
}

/// Why an answer is spun for.
#[derive(Clone, Copy)]
enum SpinKind {
    /// The process's only answer due, after no miss to sit out.
    Alone,
    /// An unlock's, on ring session `ring`: while the process's other ring
    /// sessions have nothing to read.
    Soon { ring: u64 },
}

impl SpinKind {
    fn spin_now(self) -> bool {
        match self {
            SpinKind::Alone => true,
            SpinKind::Soon { ring } => !RINGS.any_unread(ring),
        }
    }
}

/// The read half of a framed session, spinning as [`AnswerDue`] says.
pub(crate) struct SpinRead {
    half: framing::FramedRead,
    due: Arc<AnswerDue>,
    /// Reads left before the next look at the CPUs, and what the last found.
    many_cpus: Option<(u32, bool)>,
    /// The session's place in [`RINGS`] (on its socket: none).
    _registration: Option<Registration>,
}

impl SpinRead {
    pub(crate) fn new(half: framing::FramedRead, due: Arc<AnswerDue>) -> SpinRead {
        let registration = half.ring_watch().map(|watch| RINGS.add(watch));
        if let Some(registration) = &registration {
            due.ring.store(registration.number(), Ordering::Relaxed);
        }
        SpinRead { half, due, many_cpus: None, _registration: registration }
    }

    fn may_spin(&mut self) -> bool {
        if self.due.spin.is_zero() || self.due.due.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some(kind) = self.due.spin_kind() else { return false };
        // Last: it may look at every ring session of the process.
        self.many_cpus() && kind.spin_now()
    }

    /// Whether this process may run on more than one CPU, looked at again
    /// every [`CPUS_RECHECK_READS`] asks.
    fn many_cpus(&mut self) -> bool {
        match self.many_cpus {
            Some((left, many)) if left > 0 => {
                self.many_cpus = Some((left - 1, many));
                many
            }
            _ => {
                let many = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
                self.many_cpus = Some((CPUS_RECHECK_READS, many));
                self.due.one_cpu.store(!many, Ordering::Relaxed);
                many
            }
        }
    }

    /// Reads what the connection has without waiting, for up to the spin,
    /// unless another reader of the process spins, or (with other sessions
    /// waiting) until another ring session has frames to read.
    fn spin(&self, buf: &mut ReadBuf<'_>) -> Option<std::io::Result<()>> {
        let _spinning = Spinning::take()?;
        let watch_others = SESSIONS_DUE.load(Ordering::Acquire) > 1;
        let own = self.due.ring.load(Ordering::Relaxed);
        let start = Instant::now();
        loop {
            match self.half.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Some(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if watch_others && RINGS.any_unread(own) {
                        return None;
                    }
                    if start.elapsed() >= self.due.spin {
                        if !self.due.soon.load(Ordering::Relaxed) {
                            // The next request's `sent` counts the first of those sat out.
                            self.due.sitting_out.store(MISSES_SIT_OUT + 1, Ordering::Relaxed);
                        }
                        return None;
                    }
                    std::hint::spin_loop();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The process's one spin, held while it runs.
struct Spinning;

impl Spinning {
    fn take() -> Option<Spinning> {
        (!SPINNING.swap(true, Ordering::Acquire)).then_some(Spinning)
    }
}

impl Drop for Spinning {
    fn drop(&mut self) {
        SPINNING.store(false, Ordering::Release);
    }
}

impl AsyncRead for SpinRead {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.may_spin()
            && let Some(read) = self.spin(buf)
        {
            return Poll::Ready(read);
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.half).poll_read(cx, buf);
        // On one CPU, a reader that got bytes wakes the process's other
        // ring sessions whose answers came in the same pass of the agent
        // (it rings their bells only after writing them all), so that they
        // run on this wake-up, before the agent runs again, and their bells
        // are not rung: each would be a switch to this process and back.
        if buf.filled().len() > before && SESSIONS_DUE.load(Ordering::Relaxed) > 1 && !self.many_cpus() {
            RINGS.wake_sleepers(self.due.ring.load(Ordering::Relaxed));
        }
        read
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlm_proto::framing::FramedWrite;
    use std::task::Waker;
    use tokio::net::UnixStream;

    /// The tests share [`SESSIONS_DUE`] and [`RINGS`]: one at a time.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Our read half (and write half, kept open), the agent's end, and the
    /// shared state.
    fn pair(spin: Duration) -> (SpinRead, FramedWrite, std::os::unix::net::UnixStream, Arc<AnswerDue>) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("non-blocking");
        let (read, write) = framing::split(UnixStream::from_std(ours).expect("tokio stream")).expect("split");
        let due = AnswerDue::new(spin);
        (SpinRead::new(read, due.clone()), write, theirs, due)
    }

    /// A session through rings: our reader over the agent's writer.
    async fn ring_pair(spin: Duration) -> (SpinRead, framing::FramedWrite, Arc<AnswerDue>) {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let (_agent_read, agent_write) = framing::split_offering_ring(theirs, true).expect("offer");
        let (read, _write) = framing::split_accepting_ring(ours).await.expect("accept");
        assert!(read.through_ring(), "no rings");
        let due = AnswerDue::new(spin);
        (SpinRead::new(read, due.clone()), agent_write, due)
    }

    /// One poll of `reader` with a waker nobody wakes: whether it read, and
    /// how long it took.
    fn poll_once(reader: &mut SpinRead) -> (bool, Duration) {
        let mut buffer = [0u8; 16];
        let started = Instant::now();
        let polled =
            Pin::new(reader).poll_read(&mut Context::from_waker(Waker::noop()), &mut ReadBuf::new(&mut buffer));
        (polled.is_ready(), started.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unlocks_answer_is_spun_for_while_other_sessions_wait_until_one_has_frames() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let (mut unlocking, agent_to_unlocking, due) = ring_pair(Duration::from_secs(5)).await;
        let (_waiting, agent_to_waiting, other) = ring_pair(Duration::from_secs(5)).await;
        other.set_due(1);
        due.set_due(1);
        // A lock's answer, with another session waiting: no spin.
        due.expect_soon(false);
        let (read, took) = poll_once(&mut unlocking);
        assert!(!read && took < Duration::from_secs(1), "spun for a lock while another session waits");
        // An unlock's: spun for, and caught.
        due.expect_soon(true);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            agent_to_unlocking.try_write(b"answer").expect("write");
            agent_to_unlocking
        });
        let (read, _) = poll_once(&mut unlocking);
        assert!(read, "the spin for an unlock's answer gave up before it came");
        // Kept open: a closed session reads as its end.
        let _agent_to_unlocking = writer.join().expect("writer");
        // The other session's frames come first: the spin stops for them.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            agent_to_waiting.try_write(b"grant").expect("write");
            agent_to_waiting
        });
        let (read, took) = poll_once(&mut unlocking);
        assert!(!read && took < Duration::from_secs(1), "spun on past another session's frames ({took:?})");
        // And with them unread, the next unlock does not spin at all.
        assert!(!due.would_spin(), "would spin with another session's frames unread");
        let _agent_to_waiting = writer.join().expect("writer");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_written_during_the_spin_is_read_by_the_spin() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let (mut reader, _write, mut theirs, due) = pair(Duration::from_secs(5));
        due.set_due(1);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            std::io::Write::write_all(&mut theirs, b"answer").expect("write");
            theirs
        });
        let mut buffer = [0u8; 16];
        // One poll, no waker that could run it again: only the spin can
        // have read the answer.
        let waker = Waker::noop();
        let mut read_buf = ReadBuf::new(&mut buffer);
        let polled = Pin::new(&mut reader).poll_read(&mut Context::from_waker(waker), &mut read_buf);
        assert!(polled.is_ready(), "the spin gave up before the answer came");
        assert_eq!(read_buf.filled(), b"answer");
        drop(writer.join());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_spin_without_an_answer_due_and_a_miss_sits_out_the_next_requests() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let (mut reader, _write, _theirs, due) = pair(Duration::from_millis(20));
        let waker = Waker::noop();
        let mut buffer = [0u8; 16];
        let mut poll = |reader: &mut SpinRead| {
            let started = Instant::now();
            let polled = Pin::new(reader).poll_read(&mut Context::from_waker(waker), &mut ReadBuf::new(&mut buffer));
            assert!(polled.is_pending());
            started.elapsed() >= Duration::from_millis(20)
        };
        // Nothing due: pending at once.
        assert!(!poll(&mut reader), "spun with nothing due");
        // Due, nothing comes: the spin runs its course and misses.
        due.set_due(1);
        due.sent();
        assert!(poll(&mut reader), "did not spin for a due answer");
        // The next requests are read without a spin, then one spins again.
        for _ in 0..MISSES_SIT_OUT {
            due.sent();
            assert!(!poll(&mut reader), "spun while sitting out");
        }
        due.sent();
        assert!(poll(&mut reader), "still sitting out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_spin_while_another_session_of_the_process_waits_too() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let (mut reader, _write, _theirs, due) = pair(Duration::from_millis(200));
        let other = AnswerDue::new(Duration::from_millis(200));
        due.set_due(1);
        other.set_due(2);
        let waker = Waker::noop();
        let mut buffer = [0u8; 16];
        let started = Instant::now();
        let polled = Pin::new(&mut reader).poll_read(&mut Context::from_waker(waker), &mut ReadBuf::new(&mut buffer));
        assert!(polled.is_pending() && started.elapsed() < Duration::from_millis(100), "it spun");
        // The other ends (dropped): this one is alone again, and spins.
        drop(other);
        let started = Instant::now();
        let polled = Pin::new(&mut reader).poll_read(&mut Context::from_waker(waker), &mut ReadBuf::new(&mut buffer));
        assert!(polled.is_pending() && started.elapsed() >= Duration::from_millis(200), "it did not spin");
    }
}
