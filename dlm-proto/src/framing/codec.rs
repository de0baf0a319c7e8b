//! Frames: a length, a kind and a body (the format is in [`super`]).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::{FRAME_BODY_LEN_MAX, FRAME_HEADER_LEN};

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
    let (kind, len) = parse_header(header)?;
    body.clear();
    body.resize(len, 0);
    reader.read_exact(body).await?;
    decode_body(kind, body)
}

/// [`read_frame`] for a blocking reader (a client without an async runtime,
/// such as the libdlm-compatible library).
///
/// # Errors
/// The connection failed or ended, or the frame breaks the format.
pub fn read_frame_blocking<M: Message + Default>(
    reader: &mut impl std::io::Read,
    body: &mut Vec<u8>,
) -> Result<Frame<M>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    reader.read_exact(&mut header)?;
    let (kind, len) = parse_header(header)?;
    body.clear();
    body.resize(len, 0);
    reader.read_exact(body)?;
    decode_body(kind, body)
}

/// Frames read from `source` by polling, resumable: a frame half read when
/// a poll returns `Pending` goes on at the next poll, whichever task polls
/// (the client's requesters and its session reader take turns reading one
/// connection; [`read_frame`] would lose a half-read frame if its future
/// were dropped).
pub struct FrameReader<R> {
    source: R,
    header: [u8; FRAME_HEADER_LEN],
    /// Header bytes read of the frame under way.
    header_read: usize,
    /// The frame under way's body, once its header is read.
    body: Vec<u8>,
    /// The frame under way's kind and body length, once its header is read.
    kind: Option<FrameKind>,
    body_read: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames from `source`.
    pub fn new(source: R) -> FrameReader<R> {
        FrameReader {
            source,
            header: [0; FRAME_HEADER_LEN],
            header_read: 0,
            body: Vec::new(),
            kind: None,
            body_read: 0,
        }
    }

    /// The next frame, or `Pending` (with `cx` woken when more bytes come).
    ///
    /// # Errors
    /// As [`read_frame`]'s; the reader is then of no further use.
    pub fn poll_frame<M: Message + Default>(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame<M>, FrameError>> {
        loop {
            let kind = match self.kind {
                Some(kind) => kind,
                None if self.header_read < FRAME_HEADER_LEN => {
                    self.header_read += ready!(poll_some(&mut self.source, cx, &mut self.header[self.header_read..]))?;
                    continue;
                }
                None => {
                    let (kind, len) = parse_header(self.header)?;
                    self.body.clear();
                    self.body.resize(len, 0);
                    self.body_read = 0;
                    self.kind = Some(kind);
                    kind
                }
            };
            if self.body_read < self.body.len() {
                self.body_read += ready!(poll_some(&mut self.source, cx, &mut self.body[self.body_read..]))?;
                continue;
            }
            self.kind = None;
            self.header_read = 0;
            return Poll::Ready(decode_body(kind, &self.body));
        }
    }
}

/// Reads some bytes into `buf` (not empty); the end of the stream is an
/// error here, in the middle of a frame or before one.
fn poll_some(
    source: &mut (impl AsyncRead + Unpin),
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<std::io::Result<usize>> {
    let mut buf = ReadBuf::new(buf);
    ready!(Pin::new(source).poll_read(cx, &mut buf))?;
    match buf.filled().len() {
        0 => Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into())),
        read => Poll::Ready(Ok(read)),
    }
}

/// A frame header's kind and body length, checked.
fn parse_header(header: [u8; FRAME_HEADER_LEN]) -> Result<(FrameKind, usize), FrameError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > FRAME_BODY_LEN_MAX {
        return Err(FrameError::TooLong(len));
    }
    let kind = FrameKind::from_byte(header[4]).ok_or(FrameError::UnknownKind(header[4]))?;
    if kind != FrameKind::Message && len != 0 {
        return Err(FrameError::UnexpectedBody(kind));
    }
    Ok((kind, len))
}

fn decode_body<M: Message + Default>(kind: FrameKind, body: &[u8]) -> Result<Frame<M>, FrameError> {
    Ok(match kind {
        FrameKind::Message => Frame::Message(M::decode(body)?),
        FrameKind::Ping => Frame::Ping,
        FrameKind::Pong => Frame::Pong,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    async fn read(bytes: &[u8]) -> Result<Frame<proto::ClientMessage>, FrameError> {
        let mut reader = bytes;
        read_frame(&mut reader, &mut Vec::new()).await
    }

    /// A message, and the bytes of its frame followed by a ping's.
    fn message_and_ping() -> (proto::ClientMessage, Vec<u8>) {
        let message =
            proto::ClientMessage { body: Some(proto::client_message::Body::Cancel(proto::Cancel { handle: 7 })) };
        let mut out = Vec::new();
        encode_message(&message, &mut out);
        encode_control(FrameKind::Ping, &mut out);
        (message, out)
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let (message, mut out) = message_and_ping();
        encode_control(FrameKind::Pong, &mut out);
        let mut reader = out.as_slice();
        let mut body = Vec::new();
        assert_eq!(read_frame(&mut reader, &mut body).await.unwrap(), Frame::Message(message.clone()));
        assert_eq!(read_frame::<proto::ClientMessage>(&mut reader, &mut body).await.unwrap(), Frame::Ping);
        assert_eq!(read_frame::<proto::ClientMessage>(&mut reader, &mut body).await.unwrap(), Frame::Pong);
        assert!(matches!(read_frame::<proto::ClientMessage>(&mut reader, &mut body).await, Err(FrameError::Io(_))));
        let mut blocking = out.as_slice();
        assert_eq!(read_frame_blocking(&mut blocking, &mut body).unwrap(), Frame::Message(message));
        assert_eq!(read_frame_blocking::<proto::ClientMessage>(&mut blocking, &mut body).unwrap(), Frame::Ping);
    }

    #[tokio::test]
    async fn a_frame_reader_goes_on_where_the_last_poll_stopped() {
        let (message, out) = message_and_ping();
        // The bytes come one at a time, each poll taking what there is and
        // returning `Pending` in between (a new future each time).
        let (mut writer, source) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(source);
        let mut frames = Vec::new();
        for byte in &out {
            tokio::io::AsyncWriteExt::write_all(&mut writer, &[*byte]).await.expect("write");
            let polled = std::future::poll_fn(|cx| Poll::Ready(reader.poll_frame::<proto::ClientMessage>(cx))).await;
            if let Poll::Ready(frame) = polled {
                frames.push(frame.expect("frame"));
            }
        }
        assert_eq!(frames, [Frame::Message(message), Frame::Ping]);
        drop(writer);
        let end = std::future::poll_fn(|cx| reader.poll_frame::<proto::ClientMessage>(cx)).await;
        assert!(matches!(end, Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof));
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
}
