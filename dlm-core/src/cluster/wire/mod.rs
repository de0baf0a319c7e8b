//! The peer protocol on the wire ([`VERSION`]): how [`Envelope`]s travel
//! between agents over TCP. Sans-IO: the agent reads and writes bytes, this
//! module turns them into values and back, and refuses anything malformed.
//!
//! ```text
//! connection = hello (each side, once) , frame*
//! hello      = "DLMP" , version:u16 , cluster:name8 , node:u16 , epoch:u64 , incarnation:u64
//! frame      = length:u32 , count:u16 , envelope{count}        (length counts what follows it,
//!                                                                at most FRAME_LEN_MAX)
//! envelope   = epoch:u64 , seq:u64 , ack:u64 , 0:u8 | 1:u8 message
//! message    = tag:u8 , fields (per tag, below)
//! name8      = len:u8 , bytes        name16 = len:u16 , bytes     (lengths bounded per field)
//! opt<T>     = 0:u8 | 1:u8 , T
//! ```
//!
//! All integers are big-endian. Tags and fields:
//!
//! | tag | message | fields |
//! |---|---|---|
//! | 1 | Lookup | `lockspace:name8, name:name8, stale:opt<node:u16, term:u64>` |
//! | 2 | LookupReply | `lockspace:name8, name:name8, master:opt<u16>, term:u64, token_floor:u64` |
//! | 3 | Remove | lockspace:name8, name:name8, term:u64, token_floor:u64 |
//! | 4 | Request | `lockspace:name8, session:u64, handle:u64, name:name8, mode:u8, flags:u32, timeout_ns:opt<u64>` |
//! | 5 | Convert | `session:u64, handle:u64, mode:u8, flags:u32, lvb:opt<name16>, timeout_ns:opt<u64>` |
//! | 6 | Unlock | `session:u64, handle:u64, flags:u32, lvb:opt<name16>, state:u8 (1 unlocking, 2 value block unsure)` |
//! | 7 | Cancel | session:u64, handle:u64 |
//! | 8 | NotMaster | session:u64, handle:u64 |
//! | 9 | Complete | `session:u64, handle:u64, op:u8, status:u8, mode:opt<u8>, token:opt<u64>, lvb:opt<name16>, status_flags:u32` |
//! | 10 | Blocking | session:u64, handle:u64, mode:u8 |
//! | 11 | EndSession | session:u64 |
//! | 12 | WaitEdges | edges |
//! | 13 | AbortWait | lockspace:u32, lock:u32, seq:u64 |
//! | 14 | Heartbeat | (none) |
//! | 15 | ConfirmEdges | probe:u64, edges |
//! | 16 | EdgesConfirmed | probe:u64, confirmed:u8 (0 or 1) |
//! | 17 | Barrier | phase:u8 (0 stop, 1 directory, 2 locks, 3 done) |
//! | 18 | Mastered | lockspace:name8, name:name8, term:u64 |
//! | 19 | RecoverLock | `lockspace:name8, name:name8, session:u64, handle:u64, mode:u8, token:u64, flags:u32, lvb:opt<name16>, state:u8 (1 unlocking, 2 value block unsure, 4 direct), or_modes:u8 (bit i: mode i)` |
//! | 20 | RecoverDigest | locks:u64, digest:u128 (big-endian) |
//! | 21 | RecoverListed | (none) |
//! | 22 | RecoverChecked | matched:u8 (0 or 1) |
//! | 23 | RecoverRefused | lockspace:name8, name:name8 |
//! | 24 | Pressure | memory_some:u16, memory_full:u16, cpu_some:u16 (‰ of the last 10 s, at most 1000) |
//!
//! `edges` = `count:u32, (from:u64, to:u64, lockspace:u32, lock:u32, seq:u64,
//! blocker_lock:u32, blocker_token:u64, blocker_seq:u64){count}`, at most
//! `WAIT_EDGES_MAX` (16,384 × 52 bytes, well inside a frame).
//!
//! Modes are 0 (NL) to 5 (EX); ops 0 lock, 1 convert, 2 unlock; statuses in
//! the order of [`crate::Status`]. A peer that sends anything else (an unknown tag,
//! a bad length, a name or value block over its bound, trailing bytes) has
//! its connection dropped.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

use decode::Reader;
use encode::{put_envelope, put_name8};

use crate::cluster::message::{Envelope, NodeId};

/// The protocol version this build speaks.
pub const VERSION: u16 = 4;
/// The first bytes of a hello.
pub const MAGIC: [u8; 4] = *b"DLMP";
/// The largest frame, after its length field.
pub const FRAME_LEN_MAX: usize = 4 << 20;
/// Envelopes in one frame at most.
pub const FRAME_ENVELOPES_MAX: usize = 4096;
/// The longest cluster name.
pub const CLUSTER_NAME_LEN_MAX: usize = 64;
/// The length of a hello with the longest cluster name.
pub const HELLO_LEN_MAX: usize = 4 + 2 + 1 + CLUSTER_NAME_LEN_MAX + 2 + 8 + 8;

/// What a peer says about itself when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Cluster name: both sides must agree.
    pub cluster: Vec<u8>,
    /// The sender's node id.
    pub node: NodeId,
    /// The sender's membership epoch.
    pub epoch: u64,
    /// Chosen at random when the sender's process started: a peer that
    /// comes back with another one has restarted and lost its state.
    pub incarnation: u64,
}

/// Bytes that are not a valid hello or frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes end in the middle of a field.
    #[error("truncated")]
    Truncated,
    /// A hello that does not start with the magic bytes.
    #[error("not a dlm peer (bad magic)")]
    BadMagic,
    /// A length over its bound.
    #[error("{what} of {len} bytes exceeds {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length given.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A value that no field takes (an unknown tag, mode, flag bit…).
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Bytes left after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

// ----- hello -----

/// Encodes a hello.
#[must_use]
pub fn encode_hello(hello: &Hello) -> Vec<u8> {
    let mut out = Vec::with_capacity(HELLO_LEN_MAX);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&hello.version.to_be_bytes());
    put_name8(&mut out, &hello.cluster);
    out.extend_from_slice(&hello.node.0.to_be_bytes());
    out.extend_from_slice(&hello.epoch.to_be_bytes());
    out.extend_from_slice(&hello.incarnation.to_be_bytes());
    out
}

/// The length of the hello that starts with these bytes (at least 7 of them), to read the rest.
///
/// # Errors
/// Not a hello, or a cluster name over its bound.
pub fn hello_len(prefix: &[u8; 7]) -> Result<usize, WireError> {
    if prefix[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let name = usize::from(prefix[6]);
    if name > CLUSTER_NAME_LEN_MAX {
        return Err(WireError::TooLong { what: "cluster name", len: name, max: CLUSTER_NAME_LEN_MAX });
    }
    Ok(7 + name + 2 + 8 + 8)
}

/// Decodes a hello.
///
/// # Errors
/// Malformed.
pub fn decode_hello(bytes: &[u8]) -> Result<Hello, WireError> {
    let mut r = Reader(bytes);
    if r.take(4)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u16()?;
    let cluster = r.name8("cluster name", CLUSTER_NAME_LEN_MAX)?;
    let node = NodeId(r.u16()?);
    let epoch = r.u64()?;
    let incarnation = r.u64()?;
    r.end()?;
    Ok(Hello { version, cluster, node, epoch, incarnation })
}

// ----- frames -----

/// Encodes envelopes as frames (each at most [`FRAME_LEN_MAX`] and
/// [`FRAME_ENVELOPES_MAX`] envelopes), appended to `out`.
pub fn encode_frames(envelopes: &[Envelope], out: &mut Vec<u8>) {
    let mut start = out.len();
    let mut count: u16 = 0;
    out.extend_from_slice(&[0; 6]);
    for envelope in envelopes {
        let before = out.len();
        put_envelope(out, envelope);
        let body = out.len() - start - 4;
        if count > 0 && (body > FRAME_LEN_MAX || usize::from(count) == FRAME_ENVELOPES_MAX) {
            // Close the frame before this envelope and open a new one for it.
            let moved = out.split_off(before);
            finish_frame(out, start, count);
            start = out.len();
            out.extend_from_slice(&[0; 6]);
            out.extend_from_slice(&moved);
            count = 0;
        }
        count += 1;
    }
    finish_frame(out, start, count);
}

fn finish_frame(out: &mut [u8], start: usize, count: u16) {
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 6].copy_from_slice(&count.to_be_bytes());
}

/// The length of the frame body that follows a 4-byte length field.
///
/// # Errors
/// Over [`FRAME_LEN_MAX`] or too short to hold a count.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > FRAME_LEN_MAX {
        return Err(WireError::TooLong { what: "frame", len, max: FRAME_LEN_MAX });
    }
    if len < 2 {
        return Err(WireError::Truncated);
    }
    Ok(len)
}

/// Decodes a frame body (what follows its length field).
///
/// # Errors
/// Malformed.
pub fn decode_frame(body: &[u8]) -> Result<Vec<Envelope>, WireError> {
    let mut r = Reader(body);
    let count = usize::from(r.u16()?);
    if count > FRAME_ENVELOPES_MAX {
        return Err(WireError::TooLong { what: "frame envelope count", len: count, max: FRAME_ENVELOPES_MAX });
    }
    let mut envelopes = Vec::with_capacity(count);
    for _ in 0..count {
        envelopes.push(r.envelope()?);
    }
    r.end()?;
    Ok(envelopes)
}
