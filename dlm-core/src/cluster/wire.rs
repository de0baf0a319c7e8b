//! The peer protocol on the wire, version 1: how [`Envelope`]s travel
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
//! | 1 | Lookup | `lockspace:name8, name:name8, stale:opt<node:u16, generation:u64>` |
//! | 2 | LookupReply | `lockspace:name8, name:name8, master:opt<u16>, generation:u64, token_floor:u64` |
//! | 3 | Remove | lockspace:name8, name:name8, generation:u64, token_floor:u64 |
//! | 4 | Request | `lockspace:name8, session:u64, handle:u64, name:name8, mode:u8, flags:u32, timeout_ns:opt<u64>` |
//! | 5 | Convert | `session:u64, handle:u64, mode:u8, flags:u32, lvb:opt<name16>, timeout_ns:opt<u64>` |
//! | 6 | Unlock | `session:u64, handle:u64, flags:u32, lvb:opt<name16>` |
//! | 7 | Cancel | session:u64, handle:u64 |
//! | 8 | NotMaster | session:u64, handle:u64 |
//! | 9 | Complete | `session:u64, handle:u64, op:u8, status:u8, mode:opt<u8>, token:opt<u64>, lvb:opt<name16>, status_flags:u32` |
//! | 10 | Blocking | session:u64, handle:u64, mode:u8 |
//! | 11 | EndSession | session:u64 |
//! | 12 | WaitEdges | count:u32, (from:u64, to:u64, lockspace:u32, lock:u32, seq:u64){count} |
//! | 13 | AbortWait | lockspace:u32, lock:u32, seq:u64 |
//! | 14 | Heartbeat | (none) |
//!
//! Modes are 0 (NL) to 5 (EX); ops 0 lock, 1 convert, 2 unlock; statuses in
//! the order of [`Status`]. A peer that sends anything else (an unknown tag,
//! a bad length, a name or value block over its bound, trailing bytes) has
//! its connection dropped.

use std::time::Duration;

use crate::cluster::message::{Envelope, NodeId, PeerMessage, RemoteEdge, WAIT_EDGES_MAX};
use crate::deadlock::WaitRef;
use crate::effect::{Completion, Op, Status};
use crate::flags::{LockFlags, StatusFlags, UnlockFlags};
use crate::ids::{FencingToken, LockHandle, LockspaceId, SessionId};
use crate::limits::{LOCKSPACE_NAME_LEN_MAX, LVB_LEN_MAX, RESOURCE_NAME_LEN_MAX};
use crate::mode::Mode;

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
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

// ----- encoding -----

fn put_name8(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every name8 field is bounded by 64 well below 255; a longer one is
    // a bug of this node, truncated rather than sent malformed.
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

fn put_opt_bytes16(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(bytes) => {
            let len = bytes.len().min(usize::from(u16::MAX));
            out.push(1);
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&bytes[..len]);
        }
    }
}

fn put_opt_u64(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn duration_ns(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn put_wait(out: &mut Vec<u8>, wait: &WaitRef) {
    put_u32(out, wait.lockspace.0);
    put_u32(out, wait.lock);
    put_u64(out, wait.seq);
}

fn put_envelope(out: &mut Vec<u8>, envelope: &Envelope) {
    put_u64(out, envelope.epoch);
    put_u64(out, envelope.seq);
    put_u64(out, envelope.ack);
    match &envelope.message {
        None => out.push(0),
        Some(message) => {
            out.push(1);
            put_message(out, message);
        }
    }
}

fn put_message(out: &mut Vec<u8>, message: &PeerMessage) {
    match message {
        PeerMessage::Lookup { lockspace, name, stale } => {
            out.push(1);
            put_name8(out, lockspace);
            put_name8(out, name);
            match stale {
                None => out.push(0),
                Some((node, generation)) => {
                    out.push(1);
                    out.extend_from_slice(&node.0.to_be_bytes());
                    put_u64(out, *generation);
                }
            }
        }
        PeerMessage::LookupReply { lockspace, name, master, generation, token_floor } => {
            out.push(2);
            put_name8(out, lockspace);
            put_name8(out, name);
            match master {
                None => out.push(0),
                Some(node) => {
                    out.push(1);
                    out.extend_from_slice(&node.0.to_be_bytes());
                }
            }
            put_u64(out, *generation);
            put_u64(out, *token_floor);
        }
        PeerMessage::Remove { lockspace, name, generation, token_floor } => {
            out.push(3);
            put_name8(out, lockspace);
            put_name8(out, name);
            put_u64(out, *generation);
            put_u64(out, *token_floor);
        }
        PeerMessage::Request { lockspace, session, handle, name, mode, flags, timeout } => {
            out.push(4);
            put_name8(out, lockspace);
            put_u64(out, session.0);
            put_u64(out, handle.0);
            put_name8(out, name);
            out.push(mode.index() as u8);
            put_u32(out, flags.bits());
            put_opt_u64(out, duration_ns(*timeout));
        }
        PeerMessage::Convert { session, handle, mode, flags, lvb, timeout } => {
            out.push(5);
            put_u64(out, session.0);
            put_u64(out, handle.0);
            out.push(mode.index() as u8);
            put_u32(out, flags.bits());
            put_opt_bytes16(out, lvb.as_deref());
            put_opt_u64(out, duration_ns(*timeout));
        }
        PeerMessage::Unlock { session, handle, flags, lvb } => {
            out.push(6);
            put_u64(out, session.0);
            put_u64(out, handle.0);
            put_u32(out, flags.bits());
            put_opt_bytes16(out, lvb.as_deref());
        }
        PeerMessage::Cancel { session, handle } => {
            out.push(7);
            put_u64(out, session.0);
            put_u64(out, handle.0);
        }
        PeerMessage::NotMaster { session, handle } => {
            out.push(8);
            put_u64(out, session.0);
            put_u64(out, handle.0);
        }
        PeerMessage::Complete(c) => {
            out.push(9);
            put_u64(out, c.session.0);
            put_u64(out, c.handle.0);
            out.push(op_code(c.op));
            out.push(status_code(c.status));
            match c.mode {
                None => out.push(0),
                Some(mode) => out.extend_from_slice(&[1, mode.index() as u8]),
            }
            put_opt_u64(out, c.token.map(|t| t.0));
            put_opt_bytes16(out, c.lvb.as_deref());
            put_u32(out, c.flags.bits());
        }
        PeerMessage::Blocking { session, handle, mode } => {
            out.push(10);
            put_u64(out, session.0);
            put_u64(out, handle.0);
            out.push(mode.index() as u8);
        }
        PeerMessage::EndSession { session } => {
            out.push(11);
            put_u64(out, session.0);
        }
        PeerMessage::WaitEdges { edges } => {
            out.push(12);
            let edges = &edges[..edges.len().min(WAIT_EDGES_MAX)];
            put_u32(out, edges.len() as u32);
            for edge in edges {
                put_u64(out, edge.from.0);
                put_u64(out, edge.to.0);
                put_wait(out, &edge.wait);
            }
        }
        PeerMessage::AbortWait { wait } => {
            out.push(13);
            put_wait(out, wait);
        }
        PeerMessage::Heartbeat => out.push(14),
    }
}

const OPS: [Op; 3] = [Op::Lock, Op::Convert, Op::Unlock];
const STATUSES: [Status; 9] = [
    Status::Granted,
    Status::Unlocked,
    Status::Cancelled,
    Status::WouldBlock,
    Status::Deadlock,
    Status::TimedOut,
    Status::NotFound,
    Status::Unavailable,
    Status::Rejected,
];

fn op_code(op: Op) -> u8 {
    OPS.iter().position(|&o| o == op).unwrap_or(0) as u8
}

fn status_code(status: Status) -> u8 {
    STATUSES.iter().position(|&s| s == status).unwrap_or(0) as u8
}

// ----- decoding -----

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid("option marker")),
        }
    }

    fn name8(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, WireError> {
        let len = usize::from(self.u8()?);
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        Ok(self.take(len)?.to_vec())
    }

    fn opt_bytes16(&mut self, what: &'static str, max: usize) -> Result<Option<Vec<u8>>, WireError> {
        if !self.flag()? {
            return Ok(None);
        }
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        Ok(Some(self.take(len)?.to_vec()))
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, WireError> {
        if self.flag()? { Ok(Some(self.u64()?)) } else { Ok(None) }
    }

    fn mode(&mut self) -> Result<Mode, WireError> {
        Mode::from_index(usize::from(self.u8()?)).ok_or(WireError::Invalid("mode"))
    }

    fn lockspace(&mut self) -> Result<Vec<u8>, WireError> {
        self.name8("lockspace name", LOCKSPACE_NAME_LEN_MAX)
    }

    fn resource(&mut self) -> Result<Vec<u8>, WireError> {
        self.name8("resource name", RESOURCE_NAME_LEN_MAX)
    }

    fn session_handle(&mut self) -> Result<(SessionId, LockHandle), WireError> {
        Ok((SessionId(self.u64()?), LockHandle(self.u64()?)))
    }

    fn lock_flags(&mut self) -> Result<LockFlags, WireError> {
        LockFlags::from_bits(self.u32()?).ok_or(WireError::Invalid("lock flags"))
    }

    fn wait(&mut self) -> Result<WaitRef, WireError> {
        Ok(WaitRef { lockspace: LockspaceId(self.u32()?), lock: self.u32()?, seq: self.u64()? })
    }

    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() { Ok(()) } else { Err(WireError::Trailing(self.0.len())) }
    }

    fn envelope(&mut self) -> Result<Envelope, WireError> {
        let epoch = self.u64()?;
        let seq = self.u64()?;
        let ack = self.u64()?;
        let message = if self.flag()? { Some(self.message()?) } else { None };
        Ok(Envelope { epoch, seq, ack, message })
    }

    fn message(&mut self) -> Result<PeerMessage, WireError> {
        let message = match self.u8()? {
            1 => {
                let lockspace = self.lockspace()?;
                let name = self.resource()?;
                let stale = if self.flag()? { Some((NodeId(self.u16()?), self.u64()?)) } else { None };
                PeerMessage::Lookup { lockspace, name, stale }
            }
            2 => {
                let lockspace = self.lockspace()?;
                let name = self.resource()?;
                let master = if self.flag()? { Some(NodeId(self.u16()?)) } else { None };
                let generation = self.u64()?;
                let token_floor = self.u64()?;
                PeerMessage::LookupReply { lockspace, name, master, generation, token_floor }
            }
            3 => {
                let lockspace = self.lockspace()?;
                let name = self.resource()?;
                let generation = self.u64()?;
                let token_floor = self.u64()?;
                PeerMessage::Remove { lockspace, name, generation, token_floor }
            }
            4 => {
                let lockspace = self.lockspace()?;
                let (session, handle) = self.session_handle()?;
                let name = self.resource()?;
                let mode = self.mode()?;
                let flags = self.lock_flags()?;
                let timeout = self.opt_u64()?.map(Duration::from_nanos);
                PeerMessage::Request { lockspace, session, handle, name, mode, flags, timeout }
            }
            5 => {
                let (session, handle) = self.session_handle()?;
                let mode = self.mode()?;
                let flags = self.lock_flags()?;
                let lvb = self.opt_bytes16("value block", LVB_LEN_MAX)?;
                let timeout = self.opt_u64()?.map(Duration::from_nanos);
                PeerMessage::Convert { session, handle, mode, flags, lvb, timeout }
            }
            6 => {
                let (session, handle) = self.session_handle()?;
                let flags = UnlockFlags::from_bits(self.u32()?).ok_or(WireError::Invalid("unlock flags"))?;
                let lvb = self.opt_bytes16("value block", LVB_LEN_MAX)?;
                PeerMessage::Unlock { session, handle, flags, lvb }
            }
            7 => {
                let (session, handle) = self.session_handle()?;
                PeerMessage::Cancel { session, handle }
            }
            8 => {
                let (session, handle) = self.session_handle()?;
                PeerMessage::NotMaster { session, handle }
            }
            9 => {
                let (session, handle) = self.session_handle()?;
                let op = *OPS.get(usize::from(self.u8()?)).ok_or(WireError::Invalid("op"))?;
                let status = *STATUSES.get(usize::from(self.u8()?)).ok_or(WireError::Invalid("status"))?;
                let mode = if self.flag()? { Some(self.mode()?) } else { None };
                let token = self.opt_u64()?.map(FencingToken);
                let lvb = self.opt_bytes16("value block", LVB_LEN_MAX)?;
                let flags = StatusFlags::from_bits(self.u32()?).ok_or(WireError::Invalid("status flags"))?;
                PeerMessage::Complete(Completion { session, handle, op, status, mode, token, lvb, flags })
            }
            10 => {
                let (session, handle) = self.session_handle()?;
                let mode = self.mode()?;
                PeerMessage::Blocking { session, handle, mode }
            }
            11 => PeerMessage::EndSession { session: SessionId(self.u64()?) },
            12 => {
                let count = self.u32()? as usize;
                if count > WAIT_EDGES_MAX {
                    return Err(WireError::TooLong { what: "wait-for edges", len: count, max: WAIT_EDGES_MAX });
                }
                // Each edge is 32 bytes: a count the bytes cannot hold is refused
                // before anything is allocated for it.
                if self.0.len() < count * 32 {
                    return Err(WireError::Truncated);
                }
                let mut edges = Vec::with_capacity(count);
                for _ in 0..count {
                    let from = SessionId(self.u64()?);
                    let to = SessionId(self.u64()?);
                    let wait = self.wait()?;
                    edges.push(RemoteEdge { from, to, wait });
                }
                PeerMessage::WaitEdges { edges }
            }
            13 => PeerMessage::AbortWait { wait: self.wait()? },
            14 => PeerMessage::Heartbeat,
            _ => return Err(WireError::Invalid("message tag")),
        };
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<PeerMessage> {
        let (session, handle) = (NodeId(2).session(7), LockHandle(9));
        vec![
            PeerMessage::Lookup { lockspace: b"ls".to_vec(), name: b"r".to_vec(), stale: Some((NodeId(3), 4)) },
            PeerMessage::LookupReply {
                lockspace: b"ls".to_vec(),
                name: vec![0, 255],
                master: Some(NodeId(1)),
                generation: 5,
                token_floor: 99,
            },
            PeerMessage::Remove { lockspace: b"ls".to_vec(), name: b"r".to_vec(), generation: 5, token_floor: 7 },
            PeerMessage::Request {
                lockspace: b"ls".to_vec(),
                session,
                handle,
                name: b"r".to_vec(),
                mode: Mode::Ex,
                flags: LockFlags::NOQUEUE | LockFlags::VALBLK,
                timeout: Some(Duration::from_millis(3)),
            },
            PeerMessage::Convert {
                session,
                handle,
                mode: Mode::Pr,
                flags: LockFlags::VALBLK,
                lvb: Some(vec![1; 32]),
                timeout: None,
            },
            PeerMessage::Unlock { session, handle, flags: UnlockFlags::FORCE, lvb: None },
            PeerMessage::Cancel { session, handle },
            PeerMessage::NotMaster { session, handle },
            PeerMessage::Complete(Completion {
                session,
                handle,
                op: Op::Convert,
                status: Status::Rejected,
                mode: Some(Mode::Cw),
                token: Some(FencingToken(12)),
                lvb: Some(vec![7; 8]),
                flags: StatusFlags::VALNOTVALID,
            }),
            PeerMessage::Blocking { session, handle, mode: Mode::Pw },
            PeerMessage::EndSession { session },
            PeerMessage::WaitEdges {
                edges: vec![RemoteEdge {
                    from: session,
                    to: SessionId(3),
                    wait: WaitRef { lockspace: LockspaceId(1), lock: 2, seq: 3 },
                }],
            },
            PeerMessage::AbortWait { wait: WaitRef { lockspace: LockspaceId(1), lock: 2, seq: 3 } },
            PeerMessage::Heartbeat,
        ]
    }

    fn frames(envelopes: &[Envelope]) -> Vec<Envelope> {
        let mut bytes = Vec::new();
        encode_frames(envelopes, &mut bytes);
        let mut decoded = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = frame_len(rest[..4].try_into().unwrap()).unwrap();
            decoded.extend(decode_frame(&rest[4..4 + len]).unwrap());
            rest = &rest[4 + len..];
        }
        decoded
    }

    #[test]
    fn every_message_round_trips() {
        let envelopes: Vec<Envelope> = samples()
            .into_iter()
            .enumerate()
            .map(|(i, m)| Envelope { epoch: 1, seq: i as u64 + 1, ack: 4, message: Some(m) })
            .chain([Envelope { epoch: 1, seq: 0, ack: 9, message: None }])
            .collect();
        assert_eq!(frames(&envelopes), envelopes);
    }

    #[test]
    fn many_envelopes_split_into_bounded_frames() {
        let envelope =
            Envelope { epoch: 1, seq: 1, ack: 0, message: Some(PeerMessage::EndSession { session: SessionId(1) }) };
        let envelopes = vec![envelope; FRAME_ENVELOPES_MAX * 2 + 3];
        assert_eq!(frames(&envelopes).len(), envelopes.len());
    }

    #[test]
    fn hello_round_trips_and_bad_ones_are_refused() {
        let hello = Hello { version: VERSION, cluster: b"prod".to_vec(), node: NodeId(4), epoch: 2, incarnation: 99 };
        let bytes = encode_hello(&hello);
        assert_eq!(hello_len(bytes[..7].try_into().unwrap()), Ok(bytes.len()));
        assert_eq!(decode_hello(&bytes), Ok(hello));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode_hello(&bad), Err(WireError::BadMagic));
        assert!(matches!(hello_len(&[b'D', b'L', b'M', b'P', 0, 1, 200]), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert!(matches!(frame_len((FRAME_LEN_MAX as u32 + 1).to_be_bytes()), Err(WireError::TooLong { .. })));
        // An unknown tag.
        let mut body = vec![0, 1];
        body.extend_from_slice(&[0; 24]);
        body.extend_from_slice(&[1, 99]);
        assert_eq!(decode_frame(&body), Err(WireError::Invalid("message tag")));
        // A resource name over 64 bytes.
        let mut body = vec![0, 1];
        body.extend_from_slice(&[0; 24]);
        body.extend_from_slice(&[1, 1, 2, b'l', b's', 65]);
        body.extend_from_slice(&[b'x'; 65]);
        body.push(0);
        assert!(matches!(decode_frame(&body), Err(WireError::TooLong { what: "resource name", .. })));
        // A huge edge count with no bytes behind it allocates nothing.
        let mut body = vec![0, 1];
        body.extend_from_slice(&[0; 24]);
        body.extend_from_slice(&[1, 12, 0, 0, 0x3f, 0xff]);
        assert_eq!(decode_frame(&body), Err(WireError::Truncated));
        // Trailing bytes.
        let mut bytes = Vec::new();
        encode_frames(&[Envelope { epoch: 1, seq: 0, ack: 0, message: None }], &mut bytes);
        bytes.push(0);
        assert_eq!(decode_frame(&bytes[4..]), Err(WireError::Trailing(1)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = crate::sim::Rng::new(7);
        for _ in 0..20_000 {
            let len = rng.below(200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let _ = decode_frame(&bytes);
            let _ = decode_hello(&bytes);
        }
        // And valid frames with single bytes flipped.
        let mut good = Vec::new();
        let envelopes: Vec<Envelope> =
            samples().into_iter().map(|m| Envelope { epoch: 1, seq: 1, ack: 0, message: Some(m) }).collect();
        encode_frames(&envelopes, &mut good);
        for i in 4..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            let _ = decode_frame(&bad[4..]);
        }
    }
}
