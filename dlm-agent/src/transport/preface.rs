//! The first bytes of a client connection, read by the agent under a
//! deadline before the connection is handed to gRPC (tonic), so that a
//! client which connects and then says nothing, or half an HTTP/2 preface,
//! is closed within the deadline instead of holding its memory and
//! descriptor for ever: hyper would wait for the rest without a bound.
//!
//! An HTTP/2 client starts with a fixed 24-byte preface and then a
//! SETTINGS frame (RFC 9113 §3.4). Both are read here, checked, and given
//! back to tonic untouched by [`Replayed`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::admission::Ticket;

/// The HTTP/2 client connection preface.
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A frame header's length in HTTP/2.
const FRAME_HEADER_LEN: usize = 9;
/// The SETTINGS frame type.
const SETTINGS: u8 = 0x4;
/// The longest first SETTINGS frame taken: a setting is 6 bytes and a client
/// sends a handful; anything longer is not a client worth serving.
const SETTINGS_LEN_MAX: usize = 6 * 64;

/// Reads the rest of an HTTP/2 client's start (preface and first SETTINGS
/// frame), `first` being the byte already read; returns every byte read,
/// `first` included, to be replayed.
///
/// # Errors
/// The connection closed, or what came is not an HTTP/2 client's start.
pub async fn read_http2_start<S: AsyncRead + Unpin>(stream: &mut S, first: u8) -> io::Result<Vec<u8>> {
    let mut start = vec![0; HTTP2_PREFACE.len() + FRAME_HEADER_LEN];
    start[0] = first;
    stream.read_exact(&mut start[1..]).await?;
    let (preface, header) = start.split_at(HTTP2_PREFACE.len());
    if preface != HTTP2_PREFACE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 connection preface"));
    }
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let (kind, flags, stream_id) = (header[3], header[4], &header[5..9]);
    if kind != SETTINGS || flags != 0 || stream_id != [0; 4] || len % 6 != 0 || len > SETTINGS_LEN_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the preface is not followed by a SETTINGS frame"));
    }
    let at = start.len();
    start.resize(at + len, 0);
    stream.read_exact(&mut start[at..]).await?;
    Ok(start)
}

/// A connection whose first bytes were read by the agent, given back to
/// its reader before anything else; it holds the connection's admission
/// ticket, so the slot is free once tonic drops the connection.
pub struct Replayed<S> {
    start: Vec<u8>,
    at: usize,
    stream: S,
    _ticket: Ticket,
}

impl<S> Replayed<S> {
    /// `stream`, whose first bytes `start` were already read.
    pub fn new(start: Vec<u8>, stream: S, ticket: Ticket) -> Replayed<S> {
        Replayed { start, at: 0, stream, _ticket: ticket }
    }
}

impl<S: Connected> Connected for Replayed<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.start.len() {
            let n = buf.remaining().min(self.start.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.start[at..at + n]);
            self.at += n;
            if self.at == self.start.len() {
                self.start = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::admission::{Key, Quota};

    fn settings(len: usize) -> Vec<u8> {
        let mut bytes = HTTP2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, len as u8, SETTINGS, 0, 0, 0, 0, 0]);
        bytes.extend(std::iter::repeat_n(7, len));
        bytes
    }

    #[tokio::test]
    async fn a_client_start_is_read_whole_and_replayed_byte_for_byte() {
        let sent = [settings(12), b"then the rest".to_vec()].concat();
        let mut reader = &sent[1..];
        let start = read_http2_start(&mut reader, sent[0]).await.expect("a valid start");
        assert_eq!(start, settings(12));
        let ticket = Quota::new(1, 1).admit(Key::Unknown).expect("room");
        let mut replayed = Replayed::new(start, reader, ticket);
        let mut all = Vec::new();
        replayed.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, sent);
    }

    #[tokio::test]
    async fn anything_but_a_preface_and_settings_is_refused() {
        let mut wrong_preface = settings(0);
        wrong_preface[5] = b'x';
        let mut not_settings = settings(0);
        not_settings[24 + 3] = 0x1;
        let mut too_long = settings(0);
        too_long[24..27].copy_from_slice(&[0, 0x10, 0]);
        for bytes in [wrong_preface, not_settings, too_long, settings(6)[..30].to_vec()] {
            let mut reader = &bytes[1..];
            assert!(read_http2_start(&mut reader, bytes[0]).await.is_err(), "{bytes:?}");
        }
    }
}
