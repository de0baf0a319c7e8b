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
//!
//! A client on the agent's node may open with [`RING_PREFACE`] instead: the
//! agent then answers with one byte, `R` with a sealed memfd and two eventfds
//! passed alongside (`SCM_RIGHTS`), or `S` when it has no ring to spare. With
//! `R` the same frames flow through two byte rings in the memfd ([`ring`]),
//! and the socket carries nothing more: either side closing it ends the
//! session; with `S` the session goes on over the socket as above.
//!
//! Two parts, used by the client library and by the agent's framed
//! transport alike: the codec ([`encode_message`], [`read_frame`]) writes
//! and reads frames; [`FrameSink`] is the write side of a connection,
//! shared by the tasks that send on it; [`split`] gives a connection's
//! halves, its socket registered for reading only.

mod codec;
pub mod ring;
mod sink;
mod stream;

use std::time::Duration;

pub use self::codec::{
    Frame, FrameError, FrameKind, FrameReader, encode_control, encode_message, read_frame, read_frame_blocking,
};
pub use self::sink::{FrameSink, Pushed, SinkClosed};
pub use self::stream::{FramedRead, FramedWrite, split, split_accepting_ring, split_offering_ring};

/// Opens a framed session: `DLMS` and the protocol version (1, little-endian).
pub const PREFACE: [u8; 8] = *b"DLMS\x01\x00\x00\x00";

/// Opens a framed session that asks for shared-memory rings
/// ([`ring`]): the agent answers with one byte, `R` with the rings'
/// descriptors, or `S` to go on over the socket.
pub const RING_PREFACE: [u8; 8] = *b"DLMR\x01\x00\x00\x00";

/// The first byte of an HTTP/2 connection preface (`PRI * HTTP/2.0`).
pub const HTTP2_FIRST_BYTE: u8 = b'P';

const _: () = assert!(PREFACE[0] != HTTP2_FIRST_BYTE, "the preface must not look like HTTP/2");

/// Largest frame body: the same bound as a gRPC client message.
/// Largest frame body of a framed session: the same bound as a gRPC client
/// message, so both protocols accept exactly the same requests.
pub const FRAME_BODY_LEN_MAX: usize = crate::CLIENT_MESSAGE_LEN_MAX;

const _: () = assert!(FRAME_BODY_LEN_MAX <= u32::MAX as usize, "a frame's length prefix is a u32");

/// Bytes before a frame's body.
pub const FRAME_HEADER_LEN: usize = 5;

/// A reader's buffer: many small frames per read system call under load.
pub const READ_BUFFER_LEN: usize = 16 * 1024;

/// How long a flush task goes on once no one else holds the sink (the
/// session is over): a client that has not read its last messages by then
/// loses them, and its connection.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
