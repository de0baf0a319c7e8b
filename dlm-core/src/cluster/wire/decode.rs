//! Decoding, bounded at every field: anything malformed is an error, never a panic.

use std::time::Duration;

use super::encode::{OPS, STATUSES};

/// Bytes of one wait-for edge on the wire.
const EDGE_LEN: usize = 8 + 8 + 16 + 20;
use super::*;
use crate::cluster::message::{Envelope, NodeId, PeerMessage, RecoveredLock, RemoteEdge, WAIT_EDGES_MAX};
use crate::cluster::phase::RecoveryPhase;
use crate::cluster::pressure::NodePressure;
use crate::deadlock::{Blocker, WaitRef};
use crate::effect::Completion;
use crate::flags::{LockFlags, StatusFlags, UnlockFlags};
use crate::ids::{FencingToken, LockHandle, LockspaceId, SessionId};
use crate::limits::{LOCKSPACE_NAME_LEN_MAX, LVB_LEN_MAX, RESOURCE_NAME_LEN_MAX};
use crate::mode::{Mode, ModeSet};
use crate::tokens::TOKEN_LIMIT;

pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    pub(super) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    pub(super) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    pub(super) fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid("option marker")),
        }
    }

    pub(super) fn name8(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, WireError> {
        let len = usize::from(self.u8()?);
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        Ok(self.take(len)?.to_vec())
    }

    pub(super) fn opt_bytes16(&mut self, what: &'static str, max: usize) -> Result<Option<Vec<u8>>, WireError> {
        if !self.flag()? {
            return Ok(None);
        }
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        Ok(Some(self.take(len)?.to_vec()))
    }

    /// A fencing token (or a floor of them): below [`TOKEN_LIMIT`].
    pub(super) fn token(&mut self) -> Result<u64, WireError> {
        let token = self.u64()?;
        if token < TOKEN_LIMIT { Ok(token) } else { Err(WireError::Invalid("fencing token beyond the token space")) }
    }

    pub(super) fn opt_u64(&mut self) -> Result<Option<u64>, WireError> {
        if self.flag()? { Ok(Some(self.u64()?)) } else { Ok(None) }
    }

    pub(super) fn mode(&mut self) -> Result<Mode, WireError> {
        Mode::from_index(usize::from(self.u8()?)).ok_or(WireError::Invalid("mode"))
    }

    pub(super) fn lockspace(&mut self) -> Result<Vec<u8>, WireError> {
        self.name8("lockspace name", LOCKSPACE_NAME_LEN_MAX)
    }

    pub(super) fn resource(&mut self) -> Result<Vec<u8>, WireError> {
        self.name8("resource name", RESOURCE_NAME_LEN_MAX)
    }

    pub(super) fn session_handle(&mut self) -> Result<(SessionId, LockHandle), WireError> {
        Ok((SessionId(self.u64()?), LockHandle(self.u64()?)))
    }

    pub(super) fn lock_flags(&mut self) -> Result<LockFlags, WireError> {
        LockFlags::from_bits(self.u32()?).ok_or(WireError::Invalid("lock flags"))
    }

    pub(super) fn wait(&mut self) -> Result<WaitRef, WireError> {
        Ok(WaitRef { lockspace: LockspaceId(self.u32()?), lock: self.u32()?, seq: self.u64()? })
    }

    pub(super) fn edges(&mut self) -> Result<Vec<RemoteEdge>, WireError> {
        let count = self.u32()? as usize;
        if count > WAIT_EDGES_MAX {
            return Err(WireError::TooLong { what: "wait-for edges", len: count, max: WAIT_EDGES_MAX });
        }
        // A count the bytes cannot hold is refused before anything is
        // allocated for it.
        if self.0.len() < count * EDGE_LEN {
            return Err(WireError::Truncated);
        }
        let mut edges = Vec::with_capacity(count);
        for _ in 0..count {
            let from = SessionId(self.u64()?);
            let to = SessionId(self.u64()?);
            let wait = self.wait()?;
            let blocker = Blocker { lock: self.u32()?, token: self.token()?, seq: self.u64()? };
            edges.push(RemoteEdge { from, to, wait, blocker });
        }
        Ok(edges)
    }

    pub(super) fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() { Ok(()) } else { Err(WireError::Trailing(self.0.len())) }
    }

    pub(super) fn envelope(&mut self) -> Result<Envelope, WireError> {
        let epoch = self.u64()?;
        let seq = self.u64()?;
        let ack = self.u64()?;
        let message = if self.flag()? { Some(self.message()?) } else { None };
        Ok(Envelope { epoch, seq, ack, message })
    }

    pub(super) fn message(&mut self) -> Result<PeerMessage, WireError> {
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
                let term = self.u64()?;
                let token_floor = self.token()?;
                PeerMessage::LookupReply { lockspace, name, master, term, token_floor }
            }
            3 => {
                let lockspace = self.lockspace()?;
                let name = self.resource()?;
                let term = self.u64()?;
                let token_floor = self.token()?;
                PeerMessage::Remove { lockspace, name, term, token_floor }
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
                let token = if self.flag()? { Some(FencingToken(self.token()?)) } else { None };
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
            12 => PeerMessage::WaitEdges { edges: self.edges()? },
            15 => {
                let probe = self.u64()?;
                PeerMessage::ConfirmEdges { probe, edges: self.edges()? }
            }
            16 => {
                let probe = self.u64()?;
                let confirmed = match self.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Invalid("confirmed")),
                };
                PeerMessage::EdgesConfirmed { probe, confirmed }
            }
            13 => PeerMessage::AbortWait { wait: self.wait()? },
            14 => PeerMessage::Heartbeat,
            24 => {
                let pressure =
                    NodePressure { memory_some: self.u16()?, memory_full: self.u16()?, cpu_some: self.u16()? };
                if !pressure.is_valid() {
                    return Err(WireError::Invalid("pressure over 1000 per mille"));
                }
                PeerMessage::Pressure(pressure)
            }
            17 => {
                let phase = RecoveryPhase::from_index(self.u8()?).ok_or(WireError::Invalid("recovery phase"))?;
                PeerMessage::Barrier { phase }
            }
            18 => {
                let lockspace = self.lockspace()?;
                let name = self.resource()?;
                PeerMessage::Mastered { lockspace, name, term: self.u64()? }
            }
            19 => {
                let lockspace = self.lockspace()?;
                let name = self.resource()?;
                let (session, handle) = self.session_handle()?;
                let mode = self.mode()?;
                let token = self.token()?;
                let flags = self.lock_flags()?;
                let lvb = self.opt_bytes16("value block", LVB_LEN_MAX)?;
                let state = self.u8()?;
                if state > 7 {
                    return Err(WireError::Invalid("recovered lock state"));
                }
                let (unlocking, lvb_unsure, direct) = (state & 1 != 0, state & 2 != 0, state & 4 != 0);
                let or_modes = ModeSet::from_bits(self.u8()?).ok_or(WireError::Invalid("recovered lock modes"))?;
                let lock = RecoveredLock {
                    lockspace,
                    name,
                    session,
                    handle,
                    mode,
                    token,
                    flags,
                    lvb,
                    unlocking,
                    lvb_unsure,
                    or_modes,
                    direct,
                };
                PeerMessage::RecoverLock(lock)
            }
            20 => {
                let locks = self.u64()?;
                let digest = (u128::from(self.u64()?) << 64) | u128::from(self.u64()?);
                PeerMessage::RecoverDigest { locks, digest }
            }
            21 => PeerMessage::RecoverListed,
            22 => {
                let matched = match self.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Invalid("recover checked")),
                };
                PeerMessage::RecoverChecked { matched }
            }
            23 => {
                let lockspace = self.lockspace()?;
                let name = self.resource()?;
                PeerMessage::RecoverRefused { lockspace, name }
            }
            _ => return Err(WireError::Invalid("message tag")),
        };
        Ok(message)
    }
}
