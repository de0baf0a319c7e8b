//! The framed session protocol: a client session on the agent's Unix socket
//! without HTTP/2, carrying the same `dlm.v1` messages as the gRPC
//! `Session` stream. It exists because a lock request is small and its
//! latency is mostly the hops between processes and tasks: HTTP/2 framing,
//! flow control and header compression cost more than the lock itself.
//! The client library uses it for Unix-socket sessions; gRPC stays the API
//! for other languages, for TCP and for the admin calls.
//!
//! # Wire format, version 1
//!
//! On the agent's Unix socket a connection whose first byte is `P` is gRPC
//! (the HTTP/2 preface is `PRI * HTTP/2.0…`); any other first byte starts a
//! framed session, which must open with the 8-byte [`PREFACE`]
//! (`DLMS`, then the version as a little-endian `u32`). Then frames flow in
//! both directions:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | body length, little-endian `u32`, at most [`FRAME_BODY_LEN_MAX`] |
//! | 1 | kind: 0 message, 1 ping, 2 pong |
//! | length | body: a protobuf `ClientMessage` (client to agent) or `ServerMessage` (agent to client); empty for ping and pong |
//!
//! The agent's first frame is the `Welcome`, or a `Rejected` with handle 0
//! when it refuses the session (then it closes). A client may send requests
//! right after the preface; they are read once the session is open. The
//! agent answers a ping with a pong,
//! and pings a client silent for its keepalive; a client that then stays
//! silent for another keepalive loses its session (so does one whose
//! socket closes). A bad preface, an oversized or unknown frame, or a body
//! that does not decode closes the connection, and with it the session; so
//! does leaving more than `session_queue_max` of the agent's frames unread
//! (pongs included).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

/// Opens a framed session: `DLMS` and the protocol version (1, little-endian).
pub const PREFACE: [u8; 8] = *b"DLMS\x01\x00\x00\x00";

/// The first byte of an HTTP/2 connection preface (`PRI * HTTP/2.0`).
pub const HTTP2_FIRST_BYTE: u8 = b'P';

const _: () = assert!(PREFACE[0] != HTTP2_FIRST_BYTE, "the preface must not look like HTTP/2");

/// Largest frame body: the same bound as a gRPC client message (names are
/// 64 bytes and value blocks 256, so anything near this is garbage).
pub const FRAME_BODY_LEN_MAX: usize = crate::server::CLIENT_MESSAGE_LEN_MAX;

/// Bytes before a frame's body.
pub const FRAME_HEADER_LEN: usize = 5;

/// A reader's buffer: many small frames per read system call under load.
pub const READ_BUFFER_LEN: usize = 16 * 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A protobuf message.
    Message = 0,
    /// Are you there? Answered with a pong.
    Ping = 1,
    /// The answer to a ping.
    Pong = 2,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        match byte {
            0 => Some(FrameKind::Message),
            1 => Some(FrameKind::Ping),
            2 => Some(FrameKind::Pong),
            _ => None,
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or ended (cleanly between frames: `UnexpectedEof`).
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The length is over [`FRAME_BODY_LEN_MAX`].
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    /// The kind byte is not one of [`FrameKind`]'s.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A ping or pong with a body.
    #[error("{0:?} frame with a body")]
    UnexpectedBody(FrameKind),
    /// The body is not the expected protobuf message.
    #[error("message does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// A frame read from the connection.
#[derive(Debug, PartialEq)]
pub enum Frame<M> {
    /// A message.
    Message(M),
    /// A ping, to be answered.
    Ping,
    /// A pong.
    Pong,
}

/// Appends a frame holding `message` to `out`.
pub fn encode_message(message: &impl Message, out: &mut Vec<u8>) {
    let len = message.encoded_len();
    out.reserve(FRAME_HEADER_LEN + len);
    // Messages built by this crate are far below the bound: a longer one
    // is refused by the reader, not truncated here.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    out.push(FrameKind::Message as u8);
    // Encoding into a Vec cannot run out of room.
    let _ = message.encode(out);
}

/// Appends a ping or pong frame to `out`.
pub fn encode_control(kind: FrameKind, out: &mut Vec<u8>) {
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(kind as u8);
}

/// Reads one frame; `body` is a scratch buffer reused across calls.
///
/// # Errors
/// The connection failed or ended, or the frame breaks the format.
pub async fn read_frame<M: Message + Default>(
    reader: &mut (impl AsyncRead + Unpin),
    body: &mut Vec<u8>,
) -> Result<Frame<M>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    reader.read_exact(&mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > FRAME_BODY_LEN_MAX {
        return Err(FrameError::TooLong(len));
    }
    let kind = FrameKind::from_byte(header[4]).ok_or(FrameError::UnknownKind(header[4]))?;
    if kind != FrameKind::Message && len != 0 {
        return Err(FrameError::UnexpectedBody(kind));
    }
    body.clear();
    body.resize(len, 0);
    reader.read_exact(body).await?;
    Ok(match kind {
        FrameKind::Message => Frame::Message(M::decode(body.as_slice())?),
        FrameKind::Ping => Frame::Ping,
        FrameKind::Pong => Frame::Pong,
    })
}

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
    stream: OwnedWriteHalf,
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

/// How long a flush task goes on once no one else holds the sink (the
/// session is over): a client that has not read its last messages by then
/// loses them, and its connection.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

impl FrameSink {
    /// A sink writing to `stream`.
    ///
    /// # Panics
    /// Outside a tokio runtime (as the stream itself would).
    #[must_use]
    pub fn new(stream: OwnedWriteHalf) -> FrameSink {
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
    use crate::proto;

    async fn read(bytes: &[u8]) -> Result<Frame<proto::ClientMessage>, FrameError> {
        let mut reader = bytes;
        read_frame(&mut reader, &mut Vec::new()).await
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let message =
            proto::ClientMessage { body: Some(proto::client_message::Body::Cancel(proto::Cancel { handle: 7 })) };
        let mut out = Vec::new();
        encode_message(&message, &mut out);
        encode_control(FrameKind::Ping, &mut out);
        encode_control(FrameKind::Pong, &mut out);
        let mut reader = out.as_slice();
        let mut body = Vec::new();
        assert_eq!(read_frame(&mut reader, &mut body).await.unwrap(), Frame::Message(message));
        assert_eq!(read_frame::<proto::ClientMessage>(&mut reader, &mut body).await.unwrap(), Frame::Ping);
        assert_eq!(read_frame::<proto::ClientMessage>(&mut reader, &mut body).await.unwrap(), Frame::Pong);
        assert!(matches!(read_frame::<proto::ClientMessage>(&mut reader, &mut body).await, Err(FrameError::Io(_))));
    }

    #[tokio::test]
    async fn malformed_frames_are_refused() {
        let over = u32::try_from(FRAME_BODY_LEN_MAX + 1).unwrap().to_le_bytes();
        assert!(matches!(read(&[over[0], over[1], over[2], over[3], 0]).await, Err(FrameError::TooLong(_))));
        assert!(matches!(read(&[0, 0, 0, 0, 9]).await, Err(FrameError::UnknownKind(9))));
        assert!(matches!(read(&[1, 0, 0, 0, 1, 0]).await, Err(FrameError::UnexpectedBody(FrameKind::Ping))));
        // Truncated header, truncated body, a body that is not a message.
        assert!(matches!(read(&[3, 0]).await, Err(FrameError::Io(_))));
        assert!(matches!(read(&[3, 0, 0, 0, 0, 8]).await, Err(FrameError::Io(_))));
        assert!(matches!(read(&[2, 0, 0, 0, 0, 0xff, 0xff]).await, Err(FrameError::Decode(_))));
    }

    #[tokio::test]
    async fn a_sink_keeps_order_when_the_socket_is_full_and_shuts_down_when_dropped() {
        let (ours, theirs) = tokio::net::UnixStream::pair().expect("pair");
        let (_read_half, write_half) = ours.into_split();
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
