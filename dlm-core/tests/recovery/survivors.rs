//! Locks whose master stayed through a view: they stay there, checked by
//! one digest per pair of members, and what the view may have changed is
//! put right (see `dlm_core::cluster`'s recovery, `survivors`).

use dlm_core::cluster::{NodeId, PeerMessage};
use dlm_core::{ClientRequest, LockHandle, LockRequest, Mode, Status};

use crate::net::{Net, token};

/// A view without the crashed nodes, run to the end; returns every message
/// delivered, in order.
fn recover_recording(net: &mut Net) -> Vec<(u16, u16, PeerMessage)> {
    let view = net.view(true);
    net.hand_view(&view);
    let mut seen = Vec::new();
    while !net.wire.is_empty() {
        let (from, to, envelope) = net.wire.remove(0);
        seen.push((from.0, to.0, envelope.message.clone().expect("numbered")));
        net.deliver(from, to, envelope);
    }
    for id in view.members.iter().map(|m| m.id.0) {
        assert_eq!(net.node(id).recovery_status(), None, "node {id} is still recovering");
    }
    seen
}

#[test]
fn locks_whose_master_stayed_stay_there_and_do_not_travel() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    net.lock(2, 1, &name, Mode::Nl);
    net.deliver_all();
    net.completion(2, 1);
    net.lock(3, 1, &name, Mode::Pr);
    net.lock(4, 1, &name, Mode::Cr);
    net.deliver_all();
    let pr = token(&net.completion(3, 1));
    let cr = token(&net.completion(4, 1));
    // A node that had nothing to do with the resource goes.
    net.crash(5);
    let seen = recover_recording(&mut net);
    for (from, to, message) in &seen {
        let travels = matches!(message, PeerMessage::RecoverLock(_) | PeerMessage::Lookup { .. });
        assert!(!(travels && (*from == 3 || *from == 4)), "node {from} sent node {to} {message:?}");
    }
    // Node 2 checked both nodes' digests and kept their locks.
    for node in [3, 4] {
        let answer = seen
            .iter()
            .find(|(from, to, m)| *from == 2 && *to == node && matches!(m, PeerMessage::RecoverChecked { .. }));
        assert!(
            matches!(answer, Some((_, _, PeerMessage::RecoverChecked { matched: true }))),
            "node 2's answer to node {node}: {answer:?}"
        );
    }
    assert_eq!(net.node(2).stats().recovery_locks_kept, 2);
    assert_eq!(net.held(3, 1), (Some(Mode::Pr), Some(pr)));
    assert_eq!(net.held(4, 1), (Some(Mode::Cr), Some(cr)));
    // They are still in the way at their master: an EX waits for both.
    net.lock(1, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(1, 1).is_empty(), "EX granted beside a kept PR");
    net.unlock(3, 1);
    net.unlock(4, 1);
    net.deliver_all();
    assert_eq!(net.completion(1, 1).status, Status::Granted);
}

#[test]
fn a_session_end_lost_with_the_epoch_does_not_leave_its_locks_at_a_master_that_stayed() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    net.lock(2, 1, &name, Mode::Nl);
    net.deliver_all();
    net.completion(2, 1);
    // A second client of node 3 holds EX, then its session ends; the word
    // to node 2 is lost with the epoch.
    let now = net.now;
    let session = NodeId(3).session(2);
    net.node(3).open_session(session).expect("session");
    let lockspace = net.node(3).lockspace_id(b"ls").expect("ls");
    let request = LockRequest {
        handle: LockHandle(9),
        lockspace,
        name: name.clone(),
        mode: Mode::Ex,
        flags: dlm_core::LockFlags::EMPTY,
        timeout: None,
    };
    net.node(3).handle_client(now, session, ClientRequest::Lock(request)).expect("accepted");
    net.collect();
    net.deliver_all();
    net.node(3).end_session(now, session).expect("open");
    net.collect();
    let before = net.wire.len();
    net.wire.retain(|(from, _, e)| !(from.0 == 3 && matches!(e.message, Some(PeerMessage::EndSession { .. }))));
    assert_eq!(net.wire.len(), before - 1, "the session's end was on its way");
    net.crash(5);
    net.recover();
    // Node 3's digest said it holds nothing at node 2: the ended session's
    // EX went there, and node 1's EX is granted.
    assert_eq!(net.node(2).stats().recovery_digest_mismatches, 1);
    net.lock(1, 1, &name, Mode::Ex);
    net.deliver_all();
    assert_eq!(net.completion(1, 1).status, Status::Granted, "a lock of an ended session stayed");
}

#[test]
fn a_copy_sent_straight_to_a_node_that_does_not_master_it_is_refused_and_looked_up() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    // Node 5 masters the resource; nodes 3 and 4 hold PR.
    net.lock(5, 1, &name, Mode::Nl);
    net.deliver_all();
    net.completion(5, 1);
    net.lock(3, 1, &name, Mode::Pr);
    net.lock(4, 1, &name, Mode::Pr);
    net.deliver_all();
    let three = token(&net.completion(3, 1));
    let four = token(&net.completion(4, 1));
    // Node 5 goes. In the recovery, the directory (node 1) names node 3
    // master, but its answer to node 3 is lost, and so is node 4's lock on
    // its way to node 3: node 4's copy names node 3, which never became master.
    net.crash(5);
    let view = net.view(true);
    net.hand_view(&view);
    let mut three_asked = false;
    while !net.wire.is_empty() {
        let (from, to, envelope) = net.wire.remove(0);
        let message = envelope.message.as_ref().expect("numbered");
        if matches!(message, PeerMessage::Lookup { .. }) && from.0 == 4 && !three_asked {
            // Node 3 asks first (the link layer puts node 4's stream back
            // in order).
            net.wire.push((from, to, envelope));
            continue;
        }
        three_asked |= matches!(message, PeerMessage::Lookup { .. }) && from.0 == 3;
        let lost = match message {
            PeerMessage::LookupReply { master, .. } => {
                from.0 == 1 && to.0 == 3 && {
                    assert_eq!(*master, Some(NodeId(3)), "node 3 asked first");
                    true
                }
            }
            PeerMessage::RecoverLock(_) => from.0 == 4 && to.0 == 3,
            _ => false,
        };
        if !lost {
            net.deliver(from, to, envelope);
        }
    }
    assert!(net.node(3).recovery_status().is_some(), "node 3 waits for its lookup");
    // A newer view abandons that recovery. Node 3 looks the resource up
    // again; node 4, whose copy names node 3, sends it straight there, and
    // node 3 has it before its own answer from the directory.
    net.crash(2);
    let view = net.view(true);
    net.hand_view(&view);
    let mut refused = false;
    while !net.wire.is_empty() {
        let (from, to, envelope) = net.wire.remove(0);
        let message = envelope.message.as_ref().expect("numbered");
        refused |= matches!(message, PeerMessage::RecoverRefused { .. });
        let held = matches!(message, PeerMessage::LookupReply { .. }) && to.0 == 3;
        if held && !refused && net.wire.iter().any(|(f, t, _)| !(f.0 == 1 && t.0 == 3)) {
            net.wire.push((from, to, envelope));
            continue;
        }
        net.deliver(from, to, envelope);
    }
    for id in view.members.iter().map(|m| m.id.0) {
        assert_eq!(net.node(id).recovery_status(), None, "node {id} is still recovering");
    }
    assert!(refused, "node 3 refused node 4's copy");
    assert_eq!(net.node(4).stats().recovery_refused, 1);
    assert_eq!(net.held(3, 1), (Some(Mode::Pr), Some(three)));
    assert_eq!(net.held(4, 1), (Some(Mode::Pr), Some(four)));
    assert_eq!(net.masters(&name).len(), 1, "one master: {:?}", net.masters(&name));
    net.lock(1, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(1, 1).is_empty(), "EX granted beside the PRs");
    net.unlock(3, 1);
    net.unlock(4, 1);
    net.deliver_all();
    assert_eq!(net.completion(1, 1).status, Status::Granted);
}
