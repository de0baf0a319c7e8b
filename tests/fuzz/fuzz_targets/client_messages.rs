//! A client's messages all the way to the lock engine: each input is split
//! into protobuf `ClientMessage`s, converted to engine requests as the
//! agent converts them, and handed to a node with two lockspaces and two
//! sessions, whose invariants are checked after every event (debug
//! assertions). A rejection is fine; a panic is a bug.
#![no_main]

use dlm_core::cluster::{ClusterConfig, ClusterNode, Member, Membership, NodeId};
use dlm_core::{ClientRequest, Instant, LockspaceConfig, SessionId};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let membership = Membership::new(vec![Member { id: NodeId(0), weight: 1 }], 1).expect("one member");
    let mut node = ClusterNode::new(ClusterConfig::new(NodeId(0), membership)).expect("a node");
    let lockspaces = [
        node.create_lockspace(b"default", LockspaceConfig { lvb_len: 32, ..LockspaceConfig::default() }).expect("lockspace"),
        node.create_lockspace(b"other", LockspaceConfig { lvb_len: 8, ..LockspaceConfig::default() }).expect("lockspace"),
    ];
    for session in [SessionId(1), SessionId(2)] {
        node.open_session(session).expect("session");
    }
    // Each message: one byte for its session and clock step, one for its
    // length, then its bytes.
    let mut rest = data;
    let mut now = 0u64;
    while let [control, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        now += u64::from(control >> 1) * 1_000_000;
        let session = SessionId(u64::from(control & 1) + 1);
        let Ok(message) = dlm_agent::proto::ClientMessage::decode(bytes) else { continue };
        let Ok(mut decoded) = dlm_agent::convert::decode(message) else { continue };
        if let (Some(name), ClientRequest::Lock(lock)) = (&decoded.lockspace, &mut decoded.request) {
            match node.lockspace_id(name.as_bytes()) {
                Some(id) => lock.lockspace = id,
                None => lock.lockspace = lockspaces[0],
            }
        }
        let _ = node.handle_client(Instant::from_nanos(now), session, decoded.request);
        while node.poll_effect().is_some() {}
        while let Some(timeout) = node.poll_timeout() {
            if timeout.as_nanos() > now {
                break;
            }
            node.handle_timeout(Instant::from_nanos(now));
        }
    }
});
