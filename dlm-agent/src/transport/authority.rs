//! gRPC clients built on grpc-core (Python, C++, Ruby, C#, PHP) send the
//! socket path, percent-encoded, as the `:authority` of every request on a
//! Unix socket (`run%2Fdlm%2Fdlm.sock`), and grpc-java sends the path as
//! is. The HTTP/2 server under tonic refuses such a request as malformed
//! (its authority is not a valid URI authority), so those clients could not
//! make a single call. The authority means nothing on a Unix socket; this
//! layer replaces one that is not valid with `localhost` (what grpc-go
//! sends there) before the server reads it.
//!
//! Header blocks are HPACK-compressed against a table that the client and
//! the server keep in step, so a block cannot be edited in place. Every
//! block the client sends is decoded here (this layer keeps the client's
//! table) and encoded again with literals that are never indexed: the
//! server's table stays empty and nothing can get out of step. All other
//! frames pass through untouched; the server still checks everything.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A frame header's length in HTTP/2.
const FRAME_HEADER_LEN: usize = 9;
/// The frame types this layer looks into.
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
/// HEADERS flags.
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame the server accepts (HTTP/2's default, which tonic
/// keeps): frames written here are cut to it, and a longer one read is
/// passed on for the server to refuse.
const FRAME_LEN_MAX: usize = 16_384;
/// The largest header block taken (compressed, over all its frames), and the
/// most its headers may take once decoded.
const BLOCK_LEN_MAX: usize = 64 * 1024;
const DECODED_LEN_MAX: usize = 256 * 1024;
/// The server's HPACK table size (HTTP/2's default, which tonic keeps): the
/// most a client may make its table.
const TABLE_SIZE_MAX: usize = 4096;
/// What replaces an authority that is not valid.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// A header block being received: its stream, its HEADERS flags and
/// priority fields, and the fragments so far.
struct Block {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// A client connection whose requests get a valid `:authority`.
pub struct AuthorityFixed<S> {
    stream: S,
    /// Bytes read from the client, not yet a whole frame.
    input: Vec<u8>,
    /// Bytes ready for the server, from `ready_at` on.
    ready: Vec<u8>,
    ready_at: usize,
    block: Option<Block>,
    decoder: Decoder<'static>,
    /// The client broke the framing this layer relies on: everything else
    /// passes through as it comes, for the server to refuse.
    raw: bool,
    eof: bool,
}

impl<S> AuthorityFixed<S> {
    /// `stream`, from just after the client's first SETTINGS frame.
    pub fn new(stream: S) -> AuthorityFixed<S> {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE_MAX);
        AuthorityFixed {
            stream,
            input: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            block: None,
            decoder,
            raw: false,
            eof: false,
        }
    }

    /// Turns the whole frames read so far into bytes for the server.
    fn process(&mut self) -> io::Result<()> {
        let mut at = 0;
        while !self.raw {
            let Some(header) = self.input.get(at..at + FRAME_HEADER_LEN) else { break };
            let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (kind, flags) = (header[3], header[4]);
            let stream: [u8; 4] = header[5..9].try_into().expect("four bytes");
            if len > FRAME_LEN_MAX {
                self.raw = true;
                break;
            }
            let end = at + FRAME_HEADER_LEN + len;
            if self.input.len() < end {
                break;
            }
            let payload = &self.input[at + FRAME_HEADER_LEN..end];
            match (kind, self.block.is_some()) {
                (HEADERS, false) => {
                    let block = start_block(stream, flags, payload)?;
                    self.block = Some(block);
                }
                (CONTINUATION, true) => {
                    let block = self.block.as_mut().expect("checked");
                    if block.stream != stream {
                        return Err(invalid("a CONTINUATION frame on another stream"));
                    }
                    block.fragment.extend_from_slice(payload);
                }
                (_, true) => return Err(invalid("a header block interrupted by another frame")),
                (_, false) => self.ready.extend_from_slice(&self.input[at..end]),
            }
            if self.block.as_ref().is_some_and(|b| b.fragment.len() > BLOCK_LEN_MAX) {
                return Err(invalid("a header block longer than 64 KiB"));
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                let block = self.block.take().expect("a block is open");
                self.rewrite(&block)?;
            }
            at = end;
        }
        self.input.drain(..at);
        if self.raw {
            self.ready.append(&mut self.input);
        }
        Ok(())
    }

    /// Decodes a whole header block, fixes its authority, and writes it out
    /// again as HEADERS and CONTINUATION frames.
    fn rewrite(&mut self, block: &Block) -> io::Result<()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded = decoded.saturating_add(name.len() + value.len());
                if decoded <= DECODED_LEN_MAX {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| invalid(&format!("a header block that does not decode: {e:?}")))?;
        if decoded > DECODED_LEN_MAX {
            return Err(invalid("headers longer than 256 KiB"));
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &headers {
            let value = if name == b":authority" && !valid_authority(value) { LOCAL_AUTHORITY } else { value };
            encode_literal(&mut encoded, name, value);
        }
        let mut chunks: Vec<&[u8]> = encoded.chunks(FRAME_LEN_MAX - 5).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let (first, last) = (i == 0, i + 1 == count);
            let mut flags = if last { END_HEADERS } else { 0 };
            let mut payload_len = chunk.len();
            let kind = if first {
                if block.end_stream {
                    flags |= END_STREAM;
                }
                if block.priority.is_some() {
                    flags |= PRIORITY;
                    payload_len += 5;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            let len = u32::try_from(payload_len).expect("a frame is short").to_be_bytes();
            self.ready.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            self.ready.extend_from_slice(&block.stream);
            if first && let Some(priority) = block.priority {
                self.ready.extend_from_slice(&priority);
            }
            self.ready.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// The start of a header block, from its HEADERS frame (padding dropped).
fn start_block(stream: [u8; 4], flags: u8, payload: &[u8]) -> io::Result<Block> {
    let mut fragment = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = fragment.split_first().ok_or_else(|| invalid("a padded HEADERS frame with no length"))?;
        let keep = rest.len().checked_sub(usize::from(pad)).ok_or_else(|| invalid("padding longer than its frame"))?;
        fragment = &rest[..keep];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let fields = fragment.get(..5).ok_or_else(|| invalid("a HEADERS frame too short for its priority"))?;
        priority = Some(fields.try_into().expect("five bytes"));
        fragment = &fragment[5..];
    }
    Ok(Block { stream, end_stream: flags & END_STREAM != 0, priority, fragment: fragment.to_vec() })
}

/// Whether the server takes `value` as an authority.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A header as a literal that is never indexed, name and value as plain
/// strings (RFC 7541 §6.2.3).
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x10);
    encode_string(out, name);
    encode_string(out, value);
}

/// A plain (not Huffman-coded) string: its length on a 7-bit prefix, then
/// its bytes (RFC 7541 §5.1, §5.2).
fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(bytes);
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

impl<S: Connected> Connected for AuthorityFixed<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_at);
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The client is gone: what it left unfinished goes on
                    // as it is, for the server to see cut short.
                    this.eof = true;
                    this.ready.append(&mut this.input);
                    if let Some(block) = this.block.take() {
                        this.ready.extend_from_slice(&block.fragment);
                    }
                }
                Poll::Ready(Ok(())) if this.raw => this.ready.extend_from_slice(read.filled()),
                Poll::Ready(Ok(())) => {
                    this.input.extend_from_slice(read.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFixed<S> {
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
    use loona_hpack::Encoder;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Splits what the layer gave the server into frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn through(sent: &[u8]) -> io::Result<Vec<u8>> {
        let mut fixed = AuthorityFixed::new(sent);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn request(authority: &[u8], path: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", path.to_vec()),
            (b":authority", authority.to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
        ]
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_a_fresh_decoder_reads_every_block() {
        // The client's encoder indexes as it goes: the second and third
        // requests refer to entries the first one added.
        let mut encoder = Encoder::new();
        let mut sent = Vec::new();
        for (i, authority) in [&b"run%2Fdlm%2Fdlm.sock"[..], b"run%2Fdlm%2Fdlm.sock", b"node-1:7400"].iter().enumerate()
        {
            let headers = request(authority, format!("/dlm.v1.Dlm/Status{i}").as_bytes());
            let block = encoder.encode(headers.iter().map(|(n, v)| (*n, v.as_slice())));
            sent.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i as u32, &block));
            sent.extend(frame(0x0, END_STREAM, 1 + 2 * i as u32, b"data"));
        }
        let out = through(&sent).await.expect("passes");
        let frames = frames(&out);
        assert_eq!(frames.len(), 6);
        // The server's decoder, which never saw the client's table.
        let mut server = Decoder::new();
        for (i, expected) in [&b"localhost"[..], b"localhost", b"node-1:7400"].iter().enumerate() {
            let (kind, flags, stream, block) = &frames[2 * i];
            assert_eq!((*kind, *flags, *stream), (HEADERS, END_HEADERS, 1 + 2 * i as u32));
            let headers = server.decode(block).expect("decodes");
            let authority = headers.iter().find(|(n, _)| n == b":authority").expect("authority");
            assert_eq!(authority.1, expected.to_vec());
            let path = headers.iter().find(|(n, _)| n == b":path").expect("path");
            assert_eq!(path.1, format!("/dlm.v1.Dlm/Status{i}").into_bytes());
            assert_eq!(frames[2 * i + 1], (0x0, END_STREAM, 1 + 2 * i as u32, b"data".to_vec()));
        }
    }

    #[tokio::test]
    async fn padding_priority_and_continuation_frames_are_handled() {
        let mut encoder = Encoder::new();
        let long = vec![b'x'; 20_000];
        let mut headers = request(b"/run/dlm.sock", b"/dlm.v1.Dlm/Session");
        headers.push((b"x-long", long.clone()));
        let block = encoder.encode(headers.iter().map(|(n, v)| (*n, v.as_slice())));
        let (a, b) = block.split_at(100);
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut sent = frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload);
        let (b1, b2) = b.split_at(b.len() / 2);
        sent.extend(frame(CONTINUATION, 0, 5, b1));
        sent.extend(frame(CONTINUATION, END_HEADERS, 5, b2));
        let frames = frames(&through(&sent).await.expect("passes"));
        assert_eq!(frames[0].0, HEADERS);
        assert_eq!(frames[0].1, END_STREAM | PRIORITY);
        assert_eq!(&frames[0].3[..5], &[0, 0, 0, 0, 16]);
        assert!(frames[1..].iter().all(|f| f.0 == CONTINUATION && f.2 == 5));
        assert_eq!(frames.last().unwrap().1, END_HEADERS);
        let mut block = frames[0].3[5..].to_vec();
        for f in &frames[1..] {
            block.extend_from_slice(&f.3);
        }
        let decoded = Decoder::new().decode(&block).expect("decodes");
        assert!(decoded.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
        assert!(decoded.contains(&(b"x-long".to_vec(), long)));
    }

    #[tokio::test]
    async fn broken_blocks_close_the_connection_and_other_frames_pass_untouched() {
        let ping = frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(through(&ping).await.expect("passes"), ping);
        let garbage = frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]);
        assert!(through(&garbage).await.is_err());
        let interrupted = [frame(HEADERS, 0, 1, &[0x82]), ping.clone()].concat();
        assert!(through(&interrupted).await.is_err());
        // A frame longer than the server takes goes through for it to refuse.
        let huge = frame(0x0, 0, 1, &vec![0; FRAME_LEN_MAX + 1]);
        assert_eq!(through(&huge).await.expect("passes"), huge);
    }
}
