//! The write side of a framed connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::Message;
use tokio::sync::Notify;

use super::{DRAIN_TIMEOUT, FrameKind, FramedWrite, encode_control, encode_message};

/// The write side of a framed connection, shared by whoever sends on it
/// (clones share it).
///
/// Senders append frames ([`FrameSink::push_message`]) and then
/// [`FrameSink::flush`]: when no earlier bytes are still waiting, the flush
/// writes at once, from the sender's own task, without blocking. That saves
/// the hand-off to a writer task, which on a small machine is a good part
/// of a lock request's latency. What the socket does not take at once is
/// written by a task spawned for it, which ends when the bytes are out (or,
/// once every other handle is gone, after at most [`DRAIN_TIMEOUT`]).
/// When the last handle and that task are gone, the write side is shut
/// down, which the other end reads as the end of the session.
#[derive(Clone)]
pub struct FrameSink {
    inner: Arc<SinkInner>,
}

struct SinkInner {
    stream: FramedWrite,
    /// Where flush tasks run: a flush may come from outside the runtime
    /// (a lock guard dropped on another thread).
    runtime: tokio::runtime::Handle,
    state: Mutex<SinkState>,
    /// Wakes senders waiting for the pending frames to go out.
    room: Notify,
}

#[derive(Default)]
struct SinkState {
    /// Bytes not yet written.
    pending: Vec<u8>,
    /// Where each frame not yet wholly written ends, counted in bytes
    /// appended since the sink was made: their number is the frames waiting.
    frame_ends: VecDeque<u64>,
    /// Bytes appended since the sink was made.
    appended: u64,
    /// Bytes written since the sink was made.
    written: u64,
    /// A flush task owns the writing until `pending` is empty.
    flushing: bool,
    /// The connection failed: nothing more is written.
    broken: bool,
}

/// The connection failed; the frame was not sent.
#[derive(Debug, thiserror::Error)]
#[error("the connection is closed")]
pub struct SinkClosed;

/// How a push left the sink.
#[derive(Clone, Copy, Debug)]
pub struct Pushed {
    /// Frames waiting to be written, this one included.
    pub frames: usize,
    /// The sink needs a [`FrameSink::flush`] for this frame to go out (no
    /// earlier frame is waiting for one, and no flush task is running).
    pub needs_flush: bool,
}

impl FrameSink {
    /// A sink writing to `stream`.
    ///
    /// # Panics
    /// Outside a tokio runtime (as the stream itself would).
    #[must_use]
    pub fn new(stream: FramedWrite) -> FrameSink {
        let runtime = tokio::runtime::Handle::current();
        FrameSink { inner: Arc::new(SinkInner { stream, runtime, state: Mutex::default(), room: Notify::new() }) }
    }

    fn state(&self) -> MutexGuard<'_, SinkState> {
        // Every update leaves the state consistent; a panic elsewhere while
        // it was held does not make it unusable.
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a frame holding `message`; it goes out at the next flush.
    ///
    /// # Errors
    /// The connection failed earlier.
    pub fn push_message(&self, message: &impl Message) -> Result<Pushed, SinkClosed> {
        self.push(|out| encode_message(message, out))
    }

    /// Appends a ping or pong frame.
    ///
    /// # Errors
    /// The connection failed earlier.
    pub fn push_control(&self, kind: FrameKind) -> Result<Pushed, SinkClosed> {
        self.push(|out| encode_control(kind, out))
    }

    fn push(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<Pushed, SinkClosed> {
        let mut state = self.state();
        if state.broken {
            return Err(SinkClosed);
        }
        let needs_flush = state.pending.is_empty() && !state.flushing;
        let before = state.pending.len();
        encode(&mut state.pending);
        state.appended += (state.pending.len() - before) as u64;
        let end = state.appended;
        state.frame_ends.push_back(end);
        Ok(Pushed { frames: state.frame_ends.len(), needs_flush })
    }

    /// Frames appended and not yet wholly written.
    #[must_use]
    pub fn frames_waiting(&self) -> usize {
        self.state().frame_ends.len()
    }

    /// Appends a frame and flushes.
    ///
    /// # Errors
    /// The connection failed, earlier or on this write.
    pub fn send_message(&self, message: &impl Message) -> Result<(), SinkClosed> {
        self.push_message(message)?;
        self.flush();
        if self.state().broken { Err(SinkClosed) } else { Ok(()) }
    }

    /// Appends a ping or pong frame and flushes.
    ///
    /// # Errors
    /// The connection failed, earlier or on this write.
    pub fn send_control(&self, kind: FrameKind) -> Result<(), SinkClosed> {
        self.push_control(kind)?;
        self.flush();
        if self.state().broken { Err(SinkClosed) } else { Ok(()) }
    }

    /// Writes what is pending, at once as far as the socket takes it; the
    /// rest goes to a flush task.
    pub fn flush(&self) {
        let mut state = self.state();
        if state.flushing || state.broken || state.pending.is_empty() {
            return;
        }
        if write_some(&self.inner, &mut state) {
            return;
        }
        state.flushing = true;
        drop(state);
        self.inner.runtime.spawn(flush_task(self.inner.clone()));
    }

    /// Waits until at most `frames_max` frames are waiting (or the
    /// connection failed): a sender's back-pressure.
    pub async fn room(&self, frames_max: usize) {
        loop {
            let notified = self.inner.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state();
                if state.frame_ends.len() <= frames_max || state.broken {
                    return;
                }
            }
            notified.await;
        }
    }
}

/// One non-blocking write of `state.pending`; true when nothing is left.
fn write_some(inner: &SinkInner, state: &mut SinkState) -> bool {
    loop {
        match inner.stream.try_write(&state.pending) {
            Ok(0) => {
                fail(inner, state);
                return true;
            }
            Ok(written) => {
                state.pending.drain(..written);
                state.written += written as u64;
                let done = state.written;
                while state.frame_ends.front().is_some_and(|&end| end <= done) {
                    state.frame_ends.pop_front();
                }
                inner.room.notify_waiters();
                if state.pending.is_empty() {
                    return true;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                fail(inner, state);
                return true;
            }
        }
    }
}

fn fail(inner: &SinkInner, state: &mut SinkState) {
    state.broken = true;
    state.pending = Vec::new();
    state.frame_ends.clear();
    inner.room.notify_waiters();
}

/// Writes what a flush left, as the socket makes room.
async fn flush_task(inner: Arc<SinkInner>) {
    // Set once this task holds the last handle: the session is over.
    let mut alone_since: Option<tokio::time::Instant> = None;
    loop {
        if Arc::strong_count(&inner) == 1 {
            let since = *alone_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= DRAIN_TIMEOUT {
                return;
            }
        }
        // Waits are bounded so that the session's end is noticed.
        match tokio::time::timeout(DRAIN_TIMEOUT / 4, inner.stream.writable()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                fail(&inner, &mut inner.state.lock().unwrap_or_else(PoisonError::into_inner));
                return;
            }
            Err(_) => continue,
        }
        let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
        if write_some(&inner, &mut state) {
            state.flushing = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{Frame, FrameError, read_frame};
    use crate::proto;

    #[tokio::test]
    async fn a_sink_keeps_order_when_the_socket_is_full_and_shuts_down_when_dropped() {
        let (ours, theirs) = tokio::net::UnixStream::pair().expect("pair");
        let (_read_half, write_half) = crate::framing::split(ours).expect("split");
        let sink = FrameSink::new(write_half);
        // Far more than a socket buffer holds, written without a reader:
        // the rest goes to a flush task, in order.
        let count = 20_000u64;
        for handle in 0..count {
            let message =
                proto::ClientMessage { body: Some(proto::client_message::Body::Cancel(proto::Cancel { handle })) };
            sink.send_message(&message).expect("sent");
        }
        assert!(sink.frames_waiting() > 0, "the socket took everything: the test proves nothing");
        let waiting = {
            let sink = sink.clone();
            tokio::spawn(async move { sink.room(0).await })
        };
        drop(sink);
        let mut reader = tokio::io::BufReader::new(theirs);
        let mut body = Vec::new();
        for handle in 0..count {
            let frame = read_frame::<proto::ClientMessage>(&mut reader, &mut body).await.expect("a frame");
            let expected =
                proto::ClientMessage { body: Some(proto::client_message::Body::Cancel(proto::Cancel { handle })) };
            assert_eq!(frame, Frame::Message(expected));
        }
        waiting.await.expect("room once everything is written");
        // Every handle gone and everything written: the write side is shut.
        assert!(matches!(
            read_frame::<proto::ClientMessage>(&mut reader, &mut body).await,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
    }
}
