//! Encoding of envelopes and messages (the layout is in the parent module's docs).

use std::time::Duration;

use crate::cluster::message::{Envelope, PeerMessage, RemoteEdge, WAIT_EDGES_MAX};
use crate::deadlock::WaitRef;
use crate::effect::{Op, Status};

pub(super) fn put_name8(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every name8 field is bounded by 64 well below 255; a longer one is
    // a bug of this node, truncated rather than sent malformed.
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

pub(super) fn put_opt_bytes16(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
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

pub(super) fn put_opt_u64(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(super) fn duration_ns(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub(super) fn put_wait(out: &mut Vec<u8>, wait: &WaitRef) {
    put_u32(out, wait.lockspace.0);
    put_u32(out, wait.lock);
    put_u64(out, wait.seq);
}

pub(super) fn put_envelope(out: &mut Vec<u8>, envelope: &Envelope) {
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

pub(super) fn put_message(out: &mut Vec<u8>, message: &PeerMessage) {
    match message {
        PeerMessage::Lookup { lockspace, name, stale } => {
            out.push(1);
            put_name8(out, lockspace);
            put_name8(out, name);
            match stale {
                None => out.push(0),
                Some((node, term)) => {
                    out.push(1);
                    out.extend_from_slice(&node.0.to_be_bytes());
                    put_u64(out, *term);
                }
            }
        }
        PeerMessage::LookupReply { lockspace, name, master, term, token_floor } => {
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
            put_u64(out, *term);
            put_u64(out, *token_floor);
        }
        PeerMessage::Remove { lockspace, name, term, token_floor } => {
            out.push(3);
            put_name8(out, lockspace);
            put_name8(out, name);
            put_u64(out, *term);
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
            put_edges(out, edges);
        }
        PeerMessage::ConfirmEdges { probe, edges } => {
            out.push(15);
            put_u64(out, *probe);
            put_edges(out, edges);
        }
        PeerMessage::EdgesConfirmed { probe, confirmed } => {
            out.push(16);
            put_u64(out, *probe);
            out.push(u8::from(*confirmed));
        }
        PeerMessage::AbortWait { wait } => {
            out.push(13);
            put_wait(out, wait);
        }
        PeerMessage::Heartbeat => out.push(14),
        PeerMessage::Pressure(pressure) => {
            out.push(24);
            for figure in [pressure.memory_some, pressure.memory_full, pressure.cpu_some] {
                out.extend_from_slice(&figure.to_be_bytes());
            }
        }
        PeerMessage::Barrier { phase } => out.extend_from_slice(&[17, phase.index()]),
        PeerMessage::Mastered { lockspace, name, term } => {
            out.push(18);
            put_name8(out, lockspace);
            put_name8(out, name);
            put_u64(out, *term);
        }
        PeerMessage::RecoverLock(lock) => {
            out.push(19);
            put_name8(out, &lock.lockspace);
            put_name8(out, &lock.name);
            put_u64(out, lock.session.0);
            put_u64(out, lock.handle.0);
            out.push(lock.mode.index() as u8);
            put_u64(out, lock.token);
            put_u32(out, lock.flags.bits());
            put_opt_bytes16(out, lock.lvb.as_deref());
            out.push(u8::from(lock.unlocking) | u8::from(lock.lvb_unsure) << 1 | u8::from(lock.direct) << 2);
            out.push(lock.or_modes.bits());
        }
        PeerMessage::RecoverDigest { locks, digest } => {
            out.push(20);
            put_u64(out, *locks);
            out.extend_from_slice(&digest.to_be_bytes());
        }
        PeerMessage::RecoverListed => out.push(21),
        PeerMessage::RecoverChecked { matched } => out.extend_from_slice(&[22, u8::from(*matched)]),
        PeerMessage::RecoverRefused { lockspace, name } => {
            out.push(23);
            put_name8(out, lockspace);
            put_name8(out, name);
        }
    }
}

fn put_edges(out: &mut Vec<u8>, edges: &[RemoteEdge]) {
    let edges = &edges[..edges.len().min(WAIT_EDGES_MAX)];
    put_u32(out, edges.len() as u32);
    for edge in edges {
        put_u64(out, edge.from.0);
        put_u64(out, edge.to.0);
        put_wait(out, &edge.wait);
        put_u32(out, edge.blocker.lock);
        put_u64(out, edge.blocker.token);
        put_u64(out, edge.blocker.seq);
    }
}

// The wire's numbering of ops and statuses (a code is the index): the
// format's own tables, kept apart from `Op::ALL` and `Status::ALL` on
// purpose, so that reordering those lists cannot change the wire.
pub(super) const OPS: [Op; 3] = [Op::Lock, Op::Convert, Op::Unlock];
pub(super) const STATUSES: [Status; 10] = [
    Status::Granted,
    Status::Unlocked,
    Status::Cancelled,
    Status::WouldBlock,
    Status::Deadlock,
    Status::TimedOut,
    Status::NotFound,
    Status::Unavailable,
    Status::Rejected,
    Status::Fenced,
];

pub(super) fn op_code(op: Op) -> u8 {
    OPS.iter().position(|&o| o == op).unwrap_or(0) as u8
}

pub(super) fn status_code(status: Status) -> u8 {
    STATUSES.iter().position(|&s| s == status).unwrap_or(0) as u8
}
