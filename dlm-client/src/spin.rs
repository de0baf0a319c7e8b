//! A session's reader spins briefly before it sleeps while an answer is due.
//!
//! An answer that finds the client asleep pays for waking it: on a VM a
//! cross-CPU wake-up costs tens of microseconds, more than the agent's work
//! on a lock. So while a request waits for its answer, whoever reads the
//! session's frames (the requester itself, `incoming`) reads the connection
//! without sleeping, for up to the session's spin, before it parks as usual.
//! It spins only while its session is the process's only one with an answer
//! due: with several, the runtime's threads have other sessions' work to
//! do, and a spin would hold one of them from it (measured: 8 clients in one
//! process fell from 81.5k to 39.1k pairs/s when each spun). Nor does it
//! spin when this thread may run on one CPU only (the spin would only keep
//! the agent off that CPU), nor right after a spin that caught nothing (a
//! lock queued behind a holder answers late): then it sits out
//! [`MISSES_SIT_OUT`] requests. The CPU it burns is the client's; the peer
//! benchmark counts it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dlm_proto::framing;
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

/// How often the reader checks how many CPUs it may run on.
const CPUS_RECHECK: Duration = Duration::from_millis(50);

/// Sessions of this process with an answer due.
static SESSIONS_DUE: AtomicUsize = AtomicUsize::new(0);

/// What the requesting side and the reader share: whether an answer is due,
/// and how to wake the reader to spin for it.
pub(crate) struct AnswerDue {
    spin: Duration,
    due: AtomicUsize,
    /// Requests still to go without a spin (after one that caught nothing).
    sitting_out: AtomicU32,
    /// What the reader last found: this thread may run on one CPU only.
    one_cpu: AtomicBool,
}

impl AnswerDue {
    pub(crate) fn new(spin: Duration) -> Arc<AnswerDue> {
        Arc::new(AnswerDue {
            spin,
            due: AtomicUsize::new(0),
            sitting_out: AtomicU32::new(0),
            one_cpu: AtomicBool::new(false),
        })
    }

    /// Whether a reader would spin for the answer now due, as far as the
    /// session knows (the reader checks again): then the requester reads
    /// for it itself (`incoming`).
    pub(crate) fn would_spin(&self) -> bool {
        !self.spin.is_zero()
            && SESSIONS_DUE.load(Ordering::Acquire) <= 1
            && self.sitting_out.load(Ordering::Relaxed) == 0
            && !self.one_cpu.load(Ordering::Relaxed)
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

/// The read half of a framed session, spinning as [`AnswerDue`] says.
pub(crate) struct SpinRead {
    half: framing::FramedRead,
    due: Arc<AnswerDue>,
    many_cpus: Option<(Instant, bool)>,
}

impl SpinRead {
    pub(crate) fn new(half: framing::FramedRead, due: Arc<AnswerDue>) -> SpinRead {
        SpinRead { half, due, many_cpus: None }
    }

    fn may_spin(&mut self) -> bool {
        if self.due.spin.is_zero()
            || self.due.due.load(Ordering::Acquire) == 0
            || SESSIONS_DUE.load(Ordering::Acquire) > 1
            || self.due.sitting_out.load(Ordering::Relaxed) > 0
        {
            return false;
        }
        let now = Instant::now();
        match self.many_cpus {
            Some((at, many)) if now.duration_since(at) < CPUS_RECHECK => many,
            _ => {
                let many = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
                self.many_cpus = Some((now, many));
                self.due.one_cpu.store(!many, Ordering::Relaxed);
                many
            }
        }
    }

    /// Reads what the socket has without waiting, for up to the spin.
    fn spin(&self, buf: &mut ReadBuf<'_>) -> Option<std::io::Result<()>> {
        let start = Instant::now();
        loop {
            match self.half.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Some(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() >= self.due.spin {
                        // The next request's `sent` counts the first of those sat out.
                        self.due.sitting_out.store(MISSES_SIT_OUT + 1, Ordering::Relaxed);
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

impl AsyncRead for SpinRead {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.may_spin()
            && let Some(read) = self.spin(buf)
        {
            return Poll::Ready(read);
        }
        Pin::new(&mut self.half).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlm_proto::framing::FramedWrite;
    use std::sync::{Mutex, PoisonError};
    use std::task::Waker;
    use tokio::net::UnixStream;

    /// The tests share [`SESSIONS_DUE`]: one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// Our read half (and write half, kept open), the agent's end, and the
    /// shared state.
    fn pair(spin: Duration) -> (SpinRead, FramedWrite, std::os::unix::net::UnixStream, Arc<AnswerDue>) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("non-blocking");
        let (read, write) = framing::split(UnixStream::from_std(ours).expect("tokio stream")).expect("split");
        let due = AnswerDue::new(spin);
        (SpinRead::new(read, due.clone()), write, theirs, due)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_written_during_the_spin_is_read_by_the_spin() {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
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
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
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
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
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
