//! The peer wire format: a hello, then frames of envelopes, as the acceptor
//! reads them, and every envelope that decodes handed to a member of a
//! three-node cluster as if from node 2. A compromised or broken peer may
//! send anything: it must be refused, never panic the node.
#![no_main]

use dlm_core::cluster::wire;
use dlm_core::cluster::{ClusterConfig, ClusterNode, Member, Membership, NodeId};
use dlm_core::{Instant, LockspaceConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The hello, as the acceptor reads it.
    if let Some(prefix) = data.get(..7) {
        let prefix: [u8; 7] = prefix.try_into().expect("seven bytes");
        if let Ok(len) = wire::hello_len(&prefix) {
            if let Some(bytes) = data.get(..len) {
                let _ = wire::decode_hello(bytes);
            }
        }
    }
    let members = (1..=3).map(|id| Member { id: NodeId(id), weight: 1 }).collect();
    let membership = Membership::new(members, 1).expect("members");
    let mut node = ClusterNode::new(ClusterConfig::new(NodeId(1), membership)).expect("a node");
    node.create_lockspace(b"default", LockspaceConfig { lvb_len: 32, ..LockspaceConfig::default() }).expect("lockspace");
    // Then frames: a length prefix and a body, until one is refused.
    let mut rest = data;
    let mut now = 0u64;
    while let Some(prefix) = rest.get(..4) {
        let Ok(len) = wire::frame_len(prefix.try_into().expect("four bytes")) else { return };
        let Some(body) = rest.get(4..4 + len) else { return };
        rest = &rest[4 + len..];
        let Ok(envelopes) = wire::decode_frame(body) else { return };
        for envelope in envelopes {
            now += 1_000_000;
            if node.handle_peer(Instant::from_nanos(now), NodeId(2), envelope).is_err() {
                return;
            }
            while node.poll_effect().is_some() {}
            while node.poll_transmit().is_some() {}
        }
    }
});
