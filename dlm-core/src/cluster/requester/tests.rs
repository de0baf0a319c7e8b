//! Exact-effects tests of the requester role.

use super::*;
use crate::cluster::testing::{Harness, LOCKSPACE, ended, granted, lookup_reply, request_message};

/// Node 1 with two locks on a resource whose directory is node 2 and
/// whose master node 2 says is node 3 (term 7).
fn two_locks_mastered_by_node_3() -> (Harness, Vec<u8>) {
    let mut h = Harness::new(1);
    let name = h.name_with_directory(2);
    h.lock(1, 1, &name, Mode::Ex);
    h.lock(2, 1, &name, Mode::Pr);
    h.sent();
    h.deliver(2, lookup_reply(&name, 3, 7, 0));
    (h, name)
}

#[test]
fn a_new_lock_asks_the_directory_once_and_a_second_one_waits_for_the_same_answer() {
    let mut h = Harness::new(1);
    let name = h.name_with_directory(2);
    h.lock(1, 1, &name, Mode::Ex);
    let lookup = PeerMessage::Lookup { lockspace: LOCKSPACE.to_vec(), name: name.clone(), stale: None };
    assert_eq!(h.sent(), vec![(NodeId(2), lookup)]);
    h.lock(2, 1, &name, Mode::Pr);
    assert_eq!(h.sent(), vec![]);
    assert_eq!(h.effects(), vec![]);
    assert_eq!(h.node.remote_lock_count(), 2);
}

#[test]
fn the_answer_sends_every_waiting_request_to_the_master_and_is_remembered_for_the_next() {
    let (mut h, name) = two_locks_mastered_by_node_3();
    let (s1, s2) = (h.session(1), h.session(2));
    assert_eq!(
        h.sent(),
        vec![
            (NodeId(3), request_message(s1, 1, &name, Mode::Ex)),
            (NodeId(3), request_message(s2, 1, &name, Mode::Pr))
        ]
    );
    assert_eq!(h.node.remote_master(s1, LockHandle(1)), Some(NodeId(3)));
    h.lock(1, 2, &name, Mode::Nl);
    assert_eq!(h.sent(), vec![(NodeId(3), request_message(s1, 2, &name, Mode::Nl))], "no second lookup");
    // The master's grant reaches the client as it is.
    let grant = granted(s1, 1, Op::Lock, Mode::Ex, 5);
    h.deliver(3, PeerMessage::Complete(grant.clone()));
    assert_eq!(h.effects(), vec![Effect::Complete(grant)]);
}

#[test]
fn a_stale_master_sends_the_lock_back_to_the_directory_naming_that_mastership() {
    let (mut h, name) = two_locks_mastered_by_node_3();
    h.sent();
    let s1 = h.session(1);
    h.deliver(3, PeerMessage::NotMaster { session: s1, handle: LockHandle(1) });
    let lookup = PeerMessage::Lookup { lockspace: LOCKSPACE.to_vec(), name, stale: Some((NodeId(3), 7)) };
    assert_eq!(h.sent(), vec![(NodeId(2), lookup)]);
    assert_eq!(h.node.stats().stale_masters, 1);
}

#[test]
fn a_lost_master_fails_the_pending_locks_and_a_late_grant_is_undone_unseen() {
    let (mut h, name) = two_locks_mastered_by_node_3();
    h.sent();
    let (s1, s2) = (h.session(1), h.session(2));
    h.node.handle_link(h.now, NodeId(3), false);
    assert_eq!(
        h.effects(),
        vec![
            Effect::Complete(ended(s1, 1, Op::Lock, Status::Unavailable)),
            Effect::Complete(ended(s2, 1, Op::Lock, Status::Unavailable)),
        ]
    );
    // Back up, the link resends what node 3 had not acknowledged.
    h.node.handle_link(h.now, NodeId(3), true);
    assert_eq!(
        h.sent(),
        vec![
            (NodeId(3), request_message(s1, 1, &name, Mode::Ex)),
            (NodeId(3), request_message(s2, 1, &name, Mode::Pr))
        ]
    );
    h.deliver(3, PeerMessage::Complete(granted(s1, 1, Op::Lock, Mode::Ex, 5)));
    assert_eq!(h.effects(), vec![], "the client was told the request failed");
    let undo = PeerMessage::Unlock { session: s1, handle: LockHandle(1), flags: UnlockFlags::FORCE, lvb: None };
    assert_eq!(h.sent(), vec![(NodeId(3), undo)]);
}
