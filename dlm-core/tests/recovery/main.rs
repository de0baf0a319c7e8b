//! Recovery's races, each played out deterministically: a five-node
//! cluster driven by hand, a node crashed with messages of its own in
//! flight, views handed to the survivors, and the exact outcome checked:
//! which completions each client got, with which tokens, and where the
//! resource is mastered afterwards.

mod lock_delay;
mod net;
mod pressure;
mod survivors;

use std::time::Duration;

use dlm_core::cluster::{NodeId, PeerMessage, RecoveryPhase, TOKEN_EPOCH_SHIFT, View, ViewMember};
use dlm_core::{Effect, Instant, LockFlags, Mode, RevokeReason, Status, StatusFlags};
use net::{Net, is_grant, mastered_by_2, old_value_written, run_until_node_3_recovers_a_lock, token};

#[test]
fn a_grant_in_flight_from_a_master_that_dies_is_made_again_by_the_new_master() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    let first = mastered_by_2(&mut net, &name);
    net.lock(3, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "node 3 waits behind node 2's EX");
    // Node 2's client unlocks; node 2 grants node 3 and crashes before the
    // grant arrives.
    net.unlock(2, 1);
    assert!(net.wire.iter().any(|(from, to, e)| from.0 == 2 && to.0 == 3 && is_grant(e.message.as_ref().unwrap())));
    net.crash(2);
    net.recover();
    // Node 3 is granted exactly once, by the new master, under a token of
    // the new epoch: larger than any node 2 could have handed out.
    let c = net.completion(3, 1);
    assert_eq!((c.status, c.mode), (Status::Granted, Some(Mode::Ex)));
    assert!(token(&c) > first && token(&c) >> TOKEN_EPOCH_SHIFT == 2, "token {:#x}", token(&c));
    assert_eq!(net.masters(&name), vec![3], "the first survivor to look it up masters it");
}

#[test]
fn holders_keep_mode_and_token_when_their_master_dies_and_block_a_newcomer() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    net.lock(2, 1, &name, Mode::Pr);
    net.deliver_all();
    net.completion(2, 1);
    net.lock(3, 1, &name, Mode::Pr);
    net.lock(4, 1, &name, Mode::Cr);
    net.deliver_all();
    let pr = token(&net.completion(3, 1));
    let cr = token(&net.completion(4, 1));
    net.crash(2);
    net.recover();
    assert_eq!(net.held(3, 1), (Some(Mode::Pr), Some(pr)));
    assert_eq!(net.held(4, 1), (Some(Mode::Cr), Some(cr)));
    // Both locks are back at one master: an EX from node 5 waits for both.
    net.lock(5, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(5, 1).is_empty(), "EX granted beside a recovered PR");
    net.unlock(3, 1);
    net.deliver_all();
    assert_eq!(net.completion(3, 1).status, Status::Unlocked);
    assert!(net.completions(5, 1).is_empty(), "EX granted beside a recovered CR");
    net.unlock(4, 1);
    net.deliver_all();
    let c = net.completion(5, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(token(&c) > pr.max(cr));
    assert_eq!(net.masters(&name).len(), 1);
}

#[test]
fn a_lookup_whose_directory_dies_is_asked_again_of_the_new_directory() {
    let mut net = Net::new();
    let name = net.name_with_directory(2);
    net.lock(3, 1, &name, Mode::Ex);
    assert!(net.wire.iter().any(|(_, to, e)| to.0 == 2 && matches!(e.message, Some(PeerMessage::Lookup { .. }))));
    net.crash(2);
    net.recover();
    let c = net.completion(3, 1);
    assert_eq!(c.status, Status::Granted);
    assert_eq!(net.masters(&name), vec![3]);
    // The new directory (not node 2) answers for it from now on.
    let new_directory = net.node(3).config().membership.directory(b"ls", &name);
    assert_ne!(new_directory, NodeId(2));
    let entries = net.node(new_directory.0).directory_entries();
    assert!(entries.iter().any(|(_, n, master)| *n == name && *master == NodeId(3)), "{entries:?}");
}

#[test]
fn a_request_crossing_a_view_change_is_dropped_in_the_old_epoch_and_sent_again() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    mastered_by_2(&mut net, &name);
    // Node 3's request reaches the wire to node 2 in epoch 1; then node 5
    // crashes and a view comes before it is delivered.
    net.lock(3, 1, &name, Mode::Pr);
    net.deliver_first(|_, to, m| to.0 == 1 && matches!(m, PeerMessage::Lookup { .. }));
    net.deliver_first(|_, to, m| to.0 == 3 && matches!(m, PeerMessage::LookupReply { .. }));
    let at = net
        .wire
        .iter()
        .position(|(from, to, e)| from.0 == 3 && to.0 == 2 && matches!(e.message, Some(PeerMessage::Request { .. })))
        .expect("the request is in flight");
    let old = net.wire.remove(at);
    assert_eq!(old.2.epoch, 1);
    net.crash(5);
    let view = net.view(true);
    net.hand_view(&view);
    // The old epoch's envelope arrives now: dropped, not applied.
    net.deliver(old.0, old.1, old.2);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "node 2's EX still blocks the PR");
    net.unlock(2, 1);
    net.deliver_all();
    assert_eq!(net.completion(2, 1).status, Status::Unlocked);
    let c = net.completion(3, 1);
    assert_eq!((c.status, c.mode), (Status::Granted, Some(Mode::Pr)));
    let lockspace = net.node(2).lockspace_id(b"ls").expect("ls");
    let queue = net.node(2).engine().dump(lockspace, Some(&name), 1).expect("dump");
    assert_eq!(queue[0].granted.len(), 1, "the request was applied once: {queue:?}");
}

#[test]
fn a_conversion_whose_master_dies_comes_back_at_its_granted_mode_and_is_sent_again() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    net.lock(2, 1, &name, Mode::Nl);
    net.deliver_all();
    net.completion(2, 1);
    net.lock(3, 1, &name, Mode::Pr);
    net.lock(4, 1, &name, Mode::Pr);
    net.deliver_all();
    let pr = token(&net.completion(3, 1));
    net.completion(4, 1);
    // Node 3 converts PR → EX: it waits for node 4's PR, at node 2.
    net.convert(3, 1, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty());
    net.crash(2);
    net.recover();
    // Back at PR (what it held for sure), with its token, the conversion
    // pending again at the new master.
    assert_eq!(net.held(3, 1), (Some(Mode::Pr), Some(pr)));
    assert!(net.completions(3, 1).is_empty(), "EX granted beside node 4's PR");
    net.unlock(4, 1);
    net.deliver_all();
    let c = net.completion(3, 1);
    assert_eq!((c.status, c.mode), (Status::Granted, Some(Mode::Ex)));
    assert!(token(&c) > pr);
}

#[test]
fn a_departed_writer_makes_the_value_block_not_valid() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    // Node 1 masters the resource (an NL lock keeps it) and writes the value block.
    net.lock_with(1, 2, &name, Mode::Nl, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(1, 2);
    net.lock_with(1, 1, &name, Mode::Ex, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(1, 1);
    net.unlock_with(1, 1, Some(b"written".to_vec()));
    net.deliver_all();
    net.completion(1, 1);
    // Node 2's client takes EX (it may write) and dies with its node.
    net.lock_with(2, 1, &name, Mode::Ex, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(2, 1);
    assert_eq!(c.lvb.as_deref().map(|v| &v[..7]), Some(&b"written"[..]));
    net.crash(2);
    net.recover();
    net.lock_with(3, 1, &name, Mode::Pr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(3, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(c.flags.contains(StatusFlags::VALNOTVALID), "{c:?}");
}

#[test]
fn a_departed_reader_leaves_the_value_block_and_a_new_master_takes_it_from_a_holder() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    // Node 2 masters it; node 3 writes the value block under PW.
    net.lock_with(2, 1, &name, Mode::Nl, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(2, 1);
    net.lock_with(3, 1, &name, Mode::Pw, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(3, 1);
    net.unlock_with(3, 1, Some(b"value".to_vec()));
    net.deliver_all();
    net.completion(3, 1);
    net.lock_with(4, 1, &name, Mode::Pr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(4, 1);
    assert_eq!(c.lvb.as_deref().map(|v| &v[..5]), Some(&b"value"[..]));
    // The master dies: the new master takes the value block from node 4's
    // PR copy (above CR), so it is still valid.
    net.crash(2);
    net.recover();
    net.lock_with(5, 1, &name, Mode::Cr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(5, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(!c.flags.contains(StatusFlags::VALNOTVALID), "{c:?}");
    assert_eq!(c.lvb.as_deref().map(|v| &v[..5]), Some(&b"value"[..]));
}

#[test]
fn a_second_failure_during_recovery_starts_over_in_the_newer_epoch() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    mastered_by_2(&mut net, &name);
    net.lock(3, 1, &name, Mode::Pr);
    net.deliver_all();
    net.crash(2);
    let view = net.view(true);
    net.hand_view(&view);
    // Deliver only the stop barriers: every survivor is past Stop.
    while let Some(at) = net.wire.iter().position(|(_, _, e)| matches!(e.message, Some(PeerMessage::Barrier { .. }))) {
        let (from, to, envelope) = net.wire.remove(at);
        net.deliver(from, to, envelope);
        if net.node(1).recovery_status().is_some_and(|s| s.phase > RecoveryPhase::Stop) {
            break;
        }
    }
    let status = net.node(1).recovery_status().expect("recovering");
    assert_eq!(status.epoch, 2);
    // Node 4 crashes now: view 3 (nodes 1, 3, 5; three of five) starts over.
    net.crash(4);
    net.recover();
    assert_eq!(net.node(1).epoch(), 3);
    let c = net.completion(3, 1);
    assert_eq!((c.status, c.mode), (Status::Granted, Some(Mode::Pr)));
    assert!(token(&c) >> TOKEN_EPOCH_SHIFT == 3, "token {:#x} of epoch 3", token(&c));
    assert_eq!(net.masters(&name), vec![3]);
}

#[test]
fn a_node_without_quorum_fences_itself_revoking_locks_and_failing_requests() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    let other = net.name_with_directory(3);
    net.lock(1, 1, &name, Mode::Ex);
    net.deliver_all();
    net.completion(1, 1);
    net.lock(2, 1, &name, Mode::Ex);
    net.lock(1, 2, &other, Mode::Ex);
    net.deliver_all();
    net.completion(1, 2);
    // Node 1 is cut off alone: its view has no quorum.
    let alone =
        View { epoch: 2, members: vec![ViewMember { id: NodeId(1), weight: 1, incarnation: 1 }], quorate: false };
    net.wire.clear();
    net.epoch = 2;
    let now = net.now;
    net.node(1).handle_view(now, &alone, |_| true).expect("a later view");
    net.collect();
    assert!(net.node(1).is_fenced());
    let revoked: Vec<u64> = net
        .effects
        .iter()
        .filter_map(|(n, e)| match e {
            Effect::Revoked { handle, reason: RevokeReason::Fenced, .. } if *n == 1 => Some(handle.0),
            _ => None,
        })
        .collect();
    assert_eq!(revoked, vec![1, 2], "both of node 1's locks are revoked, the remote one too");
    // A new request is refused as fenced, and nothing reaches the wire.
    net.lock(1, 3, &name, Mode::Nl);
    assert_eq!(net.completion(1, 3).status, Status::Fenced);
    assert!(net.wire.is_empty());
    // The majority recovers without node 1 and grants node 2.
    net.crash(1);
    net.advance(Duration::from_millis(1));
    net.recover();
    let c = net.completion(2, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(token(&c) >> TOKEN_EPOCH_SHIFT == 3);
}

#[test]
fn a_restarted_node_joins_in_a_new_epoch_and_takes_back_its_directory_entries() {
    let mut net = Net::new();
    let name = net.name_with_directory(2);
    net.lock(3, 1, &name, Mode::Pr);
    net.deliver_all();
    let first = token(&net.completion(3, 1));
    net.crash(2);
    net.recover();
    assert_ne!(net.node(1).config().membership.directory(b"ls", &name), NodeId(2));
    // Node 2 comes back, empty, with a new incarnation: requests made while
    // it joins are held, not failed.
    net.restart(2);
    net.lock(2, 1, &name, Mode::Pr);
    assert!(net.completions(2, 1).is_empty());
    net.recover();
    assert_eq!(net.node(2).epoch(), 3);
    // Its entries are back with it, and its held request ran.
    assert_eq!(net.node(1).config().membership.directory(b"ls", &name), NodeId(2));
    let entries = net.node(2).directory_entries();
    assert!(entries.iter().any(|(_, n, master)| *n == name && *master == NodeId(3)), "{entries:?}");
    let c = net.completion(2, 1);
    assert_eq!((c.status, c.mode), (Status::Granted, Some(Mode::Pr)));
    assert!(token(&c) > first && token(&c) >> TOKEN_EPOCH_SHIFT == 3, "token {:#x}", token(&c));
    assert_eq!(net.held(3, 1), (Some(Mode::Pr), Some(first)));
    assert_eq!(net.masters(&name), vec![3]);
}

#[test]
fn a_member_that_never_reaches_a_barrier_is_named_not_waited_for_silently() {
    let mut net = Net::new();
    net.crash(5);
    // The membership layer has not yet seen node 5 stop: its view names it.
    let mut view = net.view(true);
    view.members.push(ViewMember { id: NodeId(5), weight: 1, incarnation: 1 });
    net.hand_view(&view);
    net.deliver_all();
    net.advance(Duration::from_secs(10));
    net.deliver_all();
    for id in 1..=4 {
        let status = net.node(id).recovery_status().expect("still recovering");
        assert_eq!((status.phase, status.waiting_for.as_slice()), (RecoveryPhase::Stop, &[NodeId(5)][..]));
        assert_eq!((status.epoch, status.started), (2, Instant::ZERO));
    }
    // The next view, without it, lets recovery finish.
    net.recover();
    assert_eq!(net.node(1).epoch(), 3);
}

#[test]
fn a_value_lost_in_flight_stays_not_valid_when_a_newer_view_abandons_the_recovery() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    // Node 2 masters the resource (an NL lock keeps it); node 3 writes "old".
    old_value_written(&mut net, &name);
    // Node 3 writes "new", but its unlock is lost with epoch 1.
    net.lock_with(3, 2, &name, Mode::Pw, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(3, 2);
    net.unlock_with(3, 2, Some(b"new".to_vec()));
    net.wire.retain(|(from, _, e)| !(from.0 == 3 && matches!(e.message, Some(PeerMessage::Unlock { .. }))));
    net.crash(5);
    let view = net.view(true);
    net.hand_view(&view);
    // Recovery runs until node 2 hears that node 3's unlock (and its value)
    // may be lost...
    run_until_node_3_recovers_a_lock(&mut net, true);
    assert_eq!(net.completion(3, 2).status, Status::Unlocked, "the unlock counts as done");
    // ...and a newer view abandons that recovery before it settles.
    net.crash(4);
    net.recover();
    net.lock_with(1, 1, &name, Mode::Pr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(1, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(c.flags.contains(StatusFlags::VALNOTVALID), "\"old\" read as valid after \"new\" was lost: {c:?}");
}

#[test]
fn a_value_read_as_not_valid_is_not_made_valid_by_a_new_master() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    // Node 2 masters the resource; node 5's client writes, then takes EX.
    net.lock_with(2, 1, &name, Mode::Nl, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(2, 1);
    net.lock_with(5, 1, &name, Mode::Pw, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(5, 1);
    net.unlock_with(5, 1, Some(b"old".to_vec()));
    net.deliver_all();
    net.completion(5, 1);
    net.lock_with(5, 2, &name, Mode::Ex, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(5, 2);
    // Node 5 dies holding EX: the value block is not valid any more.
    net.crash(5);
    net.recover();
    net.lock_with(3, 1, &name, Mode::Pr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(3, 1);
    assert!(c.flags.contains(StatusFlags::VALNOTVALID), "{c:?}");
    // The master dies; node 3's PR copy (above CR) is all a new master has.
    net.crash(2);
    net.recover();
    net.lock_with(4, 1, &name, Mode::Cr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(4, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(c.flags.contains(StatusFlags::VALNOTVALID), "a stale value made valid again: {c:?}");
}

#[test]
fn a_writer_whose_copy_was_lost_with_an_abandoned_recovery_still_invalidates_when_it_departs() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    // Node 2 masters the resource (an NL lock keeps it); node 3 writes
    // "old" and then holds EX.
    old_value_written(&mut net, &name);
    net.lock_with(3, 2, &name, Mode::Ex, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(3, 2);
    // A view: node 3's EX stays at node 2 only on node 3's word (its
    // digest), which is on its way...
    net.crash(5);
    let view = net.view(true);
    net.hand_view(&view);
    run_until_node_3_recovers_a_lock(&mut net, false);
    // ...but node 3 crashes first, and the next view abandons that recovery.
    net.crash(3);
    net.recover();
    net.lock_with(4, 1, &name, Mode::Pr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(4, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(c.flags.contains(StatusFlags::VALNOTVALID), "the dead writer's value block read as valid: {c:?}");
}

#[test]
fn a_lost_value_is_reported_again_when_the_message_that_reported_it_dies_with_its_epoch() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    old_value_written(&mut net, &name);
    // Node 3 writes "new", but its unlock is lost with epoch 1...
    net.lock_with(3, 2, &name, Mode::Pw, LockFlags::VALBLK);
    net.deliver_all();
    net.completion(3, 2);
    net.unlock_with(3, 2, Some(b"new".to_vec()));
    net.wire.retain(|(from, _, e)| !(from.0 == 3 && matches!(e.message, Some(PeerMessage::Unlock { .. }))));
    net.crash(5);
    let view = net.view(true);
    net.hand_view(&view);
    // ...and so is the message that tells the master so, with epoch 2.
    run_until_node_3_recovers_a_lock(&mut net, false);
    assert_eq!(net.completion(3, 2).status, Status::Unlocked, "the unlock counts as done");
    net.crash(4);
    net.recover();
    net.lock_with(1, 1, &name, Mode::Pr, LockFlags::VALBLK);
    net.deliver_all();
    let c = net.completion(1, 1);
    assert_eq!(c.status, Status::Granted);
    assert!(c.flags.contains(StatusFlags::VALNOTVALID), "\"old\" read as valid after \"new\" was lost: {c:?}");
}

#[test]
fn what_a_node_masters_while_alone_in_a_quorate_view_is_found_when_others_come_back() {
    // corosync keeps quorum with nodes whose agents are gone: one agent can
    // be alone in a quorate view, and lock as the only member.
    let mut net = Net::new();
    let name = net.name_with_directory(2);
    for id in 2..=5 {
        net.crash(id);
    }
    net.recover();
    net.lock(1, 1, &name, Mode::Ex);
    net.deliver_all();
    assert_eq!(net.completion(1, 1).status, Status::Granted);
    net.restart(2);
    net.recover();
    net.lock(2, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(2, 1).is_empty(), "EX granted on node 2 while node 1 holds EX");
    assert_eq!(net.masters(&name), vec![1]);
    net.unlock(1, 1);
    net.deliver_all();
    assert_eq!(net.completion(2, 1).status, Status::Granted);
}
