//! The agent's fixed bounds on messages, frames and queues, in one place so
//! that the relations between them are checked where they are declared.
//! (Bounds an operator sets, such as `session_queue_max`, are in
//! [`crate::config`]; the lock engine's are `dlm_core::Limits`.) A leaf: it
//! imports nothing from the crate.

use std::time::Duration;

/// Largest client message accepted, over gRPC or in a frame (the wire's
/// bound, `dlm_proto`'s: clients know it too).
pub use dlm_proto::CLIENT_MESSAGE_LEN_MAX;
/// Largest frame body of a framed session.
pub use dlm_proto::framing::FRAME_BODY_LEN_MAX;

const _: () = assert!(FRAME_BODY_LEN_MAX == CLIENT_MESSAGE_LEN_MAX, "framed and gRPC sessions take the same messages");

/// Commands queued to the driver at most; senders wait beyond that
/// (back-pressure on every transport at once).
pub const COMMAND_QUEUE_MAX: usize = 16_384;

/// Commands the driver handles in a row before it routes effects: under
/// load, fewer wake-ups of the session streams.
pub const COMMAND_BATCH_MAX: usize = 64;

const _: () = assert!(COMMAND_BATCH_MAX <= COMMAND_QUEUE_MAX, "a batch is taken from what is queued");

/// Client connections still sending their first bytes, at most, on every
/// listener together; more are closed at once. The handshake timeout
/// bounds how long each holds its slot.
pub const HANDSHAKES_MAX: usize = 1024;

/// Of those, the most one client (a uid, or a TCP address) may hold: a
/// storm of silent connections from one user leaves the rest to others.
pub const HANDSHAKES_PER_CLIENT_MAX: usize = 64;

const _: () = assert!(HANDSHAKES_PER_CLIENT_MAX * 4 <= HANDSHAKES_MAX, "one client gets a small share");

/// HTTP/2 streams one gRPC connection may have open beyond its sessions:
/// room for unary calls beside them. A connection's stream limit is
/// `limits.sessions_max` plus this, so that a client multiplexing every
/// session on one connection (grpcio shares one connection between the
/// channels of a process) meets the agent's session quotas, which answer
/// with a typed refusal, and never HTTP/2's own limit, which makes the
/// client queue the stream silently.
pub const CALL_STREAMS_MAX: u32 = 1024;

/// Connections refused by a quota that are being told why, at most
/// (`transport::refuse`); more are closed at once. Each lasts at most
/// `transport::refuse::ANSWER_LIFETIME`.
pub const ANSWERING_MAX: usize = 64;

/// Of those, the most for one client.
pub const ANSWERING_PER_CLIENT_MAX: usize = 8;

const _: () = assert!(ANSWERING_PER_CLIENT_MAX * 4 <= ANSWERING_MAX, "one client gets a small share");

/// At shutdown, how long a session's requests still coming are answered
/// (refused as `shutting_down`) before its stream or connection is closed:
/// long enough for a client that pipelines to hear about what it sent,
/// short enough not to hold a restart up. Framed and gRPC sessions alike.
pub const SHUTDOWN_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// At shutdown, how long the agent waits for its connections (framed
/// sessions, the gRPC servers) to drain before it closes them: what was
/// queued to a client that reads goes out.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Fence acknowledgements (`dlm-agent fence-ack`) queued to the membership
/// at most: an operator types them one by one; more wait for room.
pub const FENCE_ACKS_QUEUED_MAX: usize = 16;

/// Resources a dump page gives when the request does not say.
pub const DUMP_RESOURCES_DEFAULT: usize = 1000;

/// Resources a dump page gives at most.
pub const DUMP_RESOURCES_MAX: usize = 2000;

/// Locks a dump page gives when the request does not say, and at most: a
/// page is built inside the lock engine, so this bounds how long one dump
/// request holds every client up (about a millisecond).
pub const DUMP_LOCKS_MAX: usize = 10_000;

/// The most one resource of a dump takes on the wire, its locks aside (a
/// 64-byte name, a 256-byte value block, the token, field tags and lengths).
pub const DUMP_RESOURCE_LEN_MAX: usize = 400;

/// The most one lock of a dump takes on the wire: eleven fields of at most
/// a ten-byte varint and a tag, and the kernel attribution (six more).
pub const DUMP_LOCK_LEN_MAX: usize = 200;

/// What every gRPC client takes in one message by default (grpc-core,
/// grpc-go, grpc-js, tonic all say 4 MiB).
pub const CLIENT_RECEIVE_LEN_DEFAULT: usize = 4 * 1024 * 1024;

const _: () = assert!(DUMP_RESOURCES_DEFAULT <= DUMP_RESOURCES_MAX);
const _: () = assert!(
    DUMP_RESOURCES_MAX * DUMP_RESOURCE_LEN_MAX + DUMP_LOCKS_MAX * DUMP_LOCK_LEN_MAX
        <= CLIENT_RECEIVE_LEN_DEFAULT * 3 / 4,
    "the fullest dump page fits a default gRPC client's message limit, with room to spare"
);

/// Messages queued to one client session, the least and the most an
/// operator may set (`session_queue_max`): fewer would end busy sessions
/// as slow readers, more would let one stuck client hold much memory.
pub const SESSION_QUEUE_MAX_RANGE: std::ops::RangeInclusive<usize> = 16..=1 << 20;

/// Batches of envelopes queued to one peer's dialer at most, by default
/// (`[cluster] peer_queue_max`; a batch is what one pass of the driver has
/// for the peer, or one resend).
pub const PEER_QUEUE_MAX_DEFAULT: usize = 65_536;

/// The least and the most `peer_queue_max` may be.
pub const PEER_QUEUE_MAX_RANGE: std::ops::RangeInclusive<usize> = 1..=1 << 20;

const _: () = assert!(
    *PEER_QUEUE_MAX_RANGE.start() <= PEER_QUEUE_MAX_DEFAULT && PEER_QUEUE_MAX_DEFAULT <= *PEER_QUEUE_MAX_RANGE.end()
);

/// The real-time priority the membership's threads take unless configured
/// (`[cluster] realtime_priority`, see `membership::realtime`): above every
/// normal task, below corosync's (99) and the kernel's own real-time
/// threads (99).
pub const REALTIME_PRIORITY_DEFAULT: u8 = 10;

/// The priorities `realtime_priority` takes: 0 (off: normal priority) to 98.
pub const REALTIME_PRIORITY_RANGE: std::ops::RangeInclusive<u8> = 0..=98;

const _: () = assert!(REALTIME_PRIORITY_DEFAULT <= *REALTIME_PRIORITY_RANGE.end());

/// Queued batches a peer dialer writes in one go at most.
pub const PEER_WRITE_BATCHES_MAX: usize = 64;

/// A peer reader's buffer: a frame's length and body usually come in one read.
pub const PEER_READ_BUFFER_LEN: usize = 64 * 1024;

/// The kernel buffer of each TCP socket the agent opens or accepts (peer
/// links, TCP clients), each way, as asked with `SO_SNDBUF`/`SO_RCVBUF`
/// (the kernel doubles the figure for its own bookkeeping). Asking fixes it:
/// left alone, the kernel's autotuning grows a busy link's buffers up to
/// `tcp_wmem`/`tcp_rmem`'s maximum (4 and 6 MiB by default; a receive
/// buffer went from 128 KiB to 3.4 MiB in 64 MiB of loopback traffic on the
/// test machine, `transport::buffers`' test), fresh pages taken when the
/// link is busiest, which under memory pressure is when a node can least
/// afford them. 256 KiB covers a 2 Gbit/s link at a 1 ms
/// round trip; peer traffic is small messages in batches.
pub const TCP_BUFFER_BYTES: usize = 256 * 1024;
