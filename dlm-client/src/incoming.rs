//! A framed session's incoming frames, read by whoever waits for them.
//!
//! A reader task that hands each answer to its requester costs two task
//! wake-ups a request when the reader spins for the answer: the requester
//! wakes the reader, the reader wakes the requester with the answer. In a
//! multi-thread runtime that ping-pong between two tasks is capped on one
//! worker (tokio runs three in a row, then queues the next and wakes another
//! worker to steal it, across CPUs). So while the reader would spin (see
//! `spin`: the process's only session with an answer due, or an unlock's
//! on a ring session while the process's other ring sessions have nothing
//! to read; more than one CPU), the requester reads the session's frames itself, spinning in its
//! own poll, and dispatches whatever comes (others' answers, callbacks,
//! pings); with no spin, it reads too while no other requester does, waking
//! directly on the connection. Otherwise (several sessions waiting for
//! answers that may be long, one CPU) the session's task reads and hands answers over, as before: there
//! requesters reading cost more than they saved (one CPU, 8 clients on one
//! lock: 57k hand-offs/s fell to 51k). Side by side with the task reading
//! (peer benchmark, `dlm-unix`, unpinned, clients on a 2-worker runtime, 2
//! alternations of 2 runs): 1 client 75.6-83.0k pairs/s became 104-110k,
//! p50 12 µs 8.4-8.5 µs, CPU per pair 11.8-12.4 (agent) and 11.3-11.6 µs
//! (client) 9.0-9.4 and 8.7-8.9 µs; the other rows unchanged.
//!
//! The session's task reads only while no requester does; a requester that
//! stops reading (answered, or dropped) wakes it to take over, so that
//! callbacks and pings are read while the application does something else.
//! One reads at a time (`frames`, locked only within a poll); the *role* of
//! the requester that reads lasts across its polls (`requester_reads`), so
//! that the task does not take the connection's wake-ups from it.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use dlm_proto::framing::{Frame, FrameError, FrameReader};
use dlm_proto::proto;
use tokio::io::BufReader;
use tokio::sync::oneshot::{self, error::TryRecvError};

use super::session::{Reply, SessionInner};
use super::spin::SpinRead;

type Frames = FrameReader<BufReader<SpinRead>>;

/// A framed session's read side, shared by its requesters and its task.
pub(crate) struct Incoming {
    frames: Mutex<Frames>,
    /// A requester has the reading role (from its first read until it is
    /// answered or dropped).
    requester_reads: AtomicBool,
    /// The reader task's waker, woken when a requester gives the role back.
    task: Mutex<Option<Waker>>,
    /// The connection ended (or broke): nothing more is read.
    ended: AtomicBool,
}

impl Incoming {
    pub(crate) fn new(frames: Frames) -> Arc<Incoming> {
        Arc::new(Incoming {
            frames: Mutex::new(frames),
            requester_reads: AtomicBool::new(false),
            task: Mutex::new(None),
            ended: AtomicBool::new(false),
        })
    }

    fn frames(&self) -> MutexGuard<'_, Frames> {
        // A panic while reading leaves at worst a half-read frame, which the
        // next read goes on with or refuses.
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads and dispatches frames until one read would wait (`Pending`,
    /// `cx` to be woken) or the connection ends (`Ready`), or `done` says so.
    /// The task (`by_task`) reads nothing while a requester has the role:
    /// looked at with the frames locked, so that a requester that took the
    /// role meanwhile reads after it, and is the one the connection wakes
    /// (the last to poll the connection is the one woken).
    fn read(
        &self,
        session: &SessionInner,
        cx: &mut Context<'_>,
        by_task: bool,
        mut done: impl FnMut() -> bool,
    ) -> Poll<()> {
        let mut frames = self.frames();
        if by_task && self.requester_reads.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        loop {
            if self.ended.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            match frames.poll_frame::<proto::ServerMessage>(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => {
                    if !self.dispatch(session, frame) {
                        return Poll::Ready(());
                    }
                }
            }
            if done() {
                return Poll::Ready(());
            }
        }
    }

    /// Hands one frame to the session; false once the connection ended.
    fn dispatch(&self, session: &SessionInner, frame: Result<Frame<proto::ServerMessage>, FrameError>) -> bool {
        match frame {
            Ok(Frame::Message(message)) => session.dispatch(message),
            Ok(Frame::Ping) => session.pong(),
            Ok(Frame::Pong) => {}
            Err(_) => {
                self.ended.store(true, Ordering::Release);
                session.close_waiters();
                self.wake_task();
                return false;
            }
        }
        true
    }

    fn wake_task(&self) {
        let waker = self.task.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits for `answer`; when `may_read` (its reader would spin for it), by
    /// reading the session's frames meanwhile if no other requester is
    /// (`Err`: the session ended).
    pub(crate) async fn wait(
        &self,
        session: &SessionInner,
        mut answer: oneshot::Receiver<Reply>,
        may_read: bool,
    ) -> Result<Reply, ()> {
        let mut role = Role { incoming: self, held: false };
        poll_fn(|cx| {
            if may_read && !role.held && !self.requester_reads.swap(true, Ordering::AcqRel) {
                role.held = true;
            }
            if !role.held {
                // Another requester reads, and hands this one its answer.
                return Pin::new(&mut answer).poll(cx).map_err(drop);
            }
            // Only this requester reads now, so only it can dispatch its
            // answer: the channel is looked at without a waker (one would
            // be this task's own, woken while it runs: a spurious poll,
            // which a multi-thread runtime queues and wakes another worker
            // for). Read until a read would wait (`cx` then woken by the
            // connection), the end, or the answer.
            let _ = self.read(session, cx, false, || !answer.is_empty());
            match answer.try_recv() {
                Ok(reply) => Poll::Ready(Ok(reply)),
                Err(TryRecvError::Closed) => Poll::Ready(Err(())),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }

    /// The session's reader task: reads while no requester does, until the
    /// connection ends or the session is gone.
    pub(crate) async fn serve(self: Arc<Incoming>, session: Weak<SessionInner>) {
        poll_fn(|cx| {
            // Stored before the role is looked at: a requester giving the
            // role back after that look wakes this waker.
            *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            let Some(session) = session.upgrade() else { return Poll::Ready(()) };
            self.read(&session, cx, true, || false)
        })
        .await;
    }
}

/// A requester's reading role, given back (and the task woken to take over)
/// when the requester is answered or dropped.
struct Role<'a> {
    incoming: &'a Incoming,
    held: bool,
}

impl Drop for Role<'_> {
    fn drop(&mut self) {
        if self.held {
            self.incoming.requester_reads.store(false, Ordering::Release);
            self.incoming.wake_task();
        }
    }
}
