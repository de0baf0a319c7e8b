//! Lock-delay in recovery: a hold taken from a departed node stays in the
//! way of conflicting requests for the lockspace's lock-delay, at a master
//! that saw it go and at one that cannot know what it held.

use std::time::Duration;

use dlm_core::cluster::{NodeId, View, ViewMember};
use dlm_core::{LockFlags, Mode, Status};

use crate::net::{Net, mastered_by_2};

const DELAY: Duration = Duration::from_millis(500);
const JUST_BEFORE: Duration = Duration::from_millis(499);
const TICK: Duration = Duration::from_millis(1);

/// A name node 1 masters (its client holds NL), with node 2's client
/// granted `mode` on it.
fn held_by_2_at_master_1(net: &mut Net, mode: Mode) -> Vec<u8> {
    let name = net.name_with_directory(1);
    net.lock(1, 9, &name, Mode::Nl);
    net.deliver_all();
    assert_eq!(net.completion(1, 9).status, Status::Granted);
    net.lock(2, 1, &name, mode);
    net.deliver_all();
    assert_eq!(net.completion(2, 1).status, Status::Granted);
    assert_eq!(net.masters(&name), vec![1]);
    name
}

#[test]
fn a_departed_holders_lock_keeps_conflicting_requests_waiting_for_the_lock_delay() {
    let mut net = Net::with_lock_delay(DELAY);
    let name = held_by_2_at_master_1(&mut net, Mode::Pr);
    net.crash(2);
    net.recover();
    // What the departed PR does not conflict with is granted at once; what
    // it does and cannot wait fails as it would behind the holder.
    net.lock(4, 1, &name, Mode::Cr);
    net.lock_with(5, 1, &name, Mode::Pw, LockFlags::NOQUEUE);
    net.deliver_all();
    assert_eq!(net.completion(4, 1).status, Status::Granted);
    assert_eq!(net.completion(5, 1).status, Status::WouldBlock);
    net.unlock(4, 1);
    net.lock(3, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "EX granted at once where a departed node held PR");
    net.advance(JUST_BEFORE);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "EX granted before the lock-delay ended");
    net.advance(TICK);
    net.deliver_all();
    let c = net.completion(3, 1);
    assert_eq!((c.status, c.mode), (Status::Granted, Some(Mode::Ex)));
}

#[test]
fn a_resource_whose_master_departed_waits_the_lock_delay_at_its_new_master() {
    let mut net = Net::with_lock_delay(DELAY);
    let name = net.name_with_directory(1);
    mastered_by_2(&mut net, &name);
    net.lock(3, 1, &name, Mode::Pr);
    net.deliver_all();
    net.crash(2);
    net.recover();
    // The new master cannot know node 2's EX: it waits as if it knew.
    assert!(net.completions(3, 1).is_empty(), "granted at once at a new master");
    net.advance(JUST_BEFORE);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "granted before the lock-delay ended");
    net.advance(TICK);
    net.deliver_all();
    assert_eq!(net.completion(3, 1).status, Status::Granted);
    assert_eq!(net.masters(&name), vec![3]);
}

#[test]
fn a_resource_first_mastered_within_the_lock_delay_after_a_departure_waits_the_rest_of_it() {
    let mut net = Net::with_lock_delay(DELAY);
    net.crash(5);
    net.recover();
    // Nobody knows whether node 5 held this name: its first grant waits.
    net.advance(Duration::from_millis(200));
    let name = net.name_with_directory(1);
    net.lock(3, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "granted within the lock-delay after a departure");
    net.advance(Duration::from_millis(299));
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "the delay counts from the departure, not the request");
    net.advance(TICK);
    net.deliver_all();
    assert_eq!(net.completion(3, 1).status, Status::Granted);
    // After it, a new name is granted at once.
    let other = net.name_with_directory(3);
    net.lock(4, 1, &other, Mode::Ex);
    net.deliver_all();
    assert_eq!(net.completion(4, 1).status, Status::Granted);
}

#[test]
fn an_unlock_or_a_surviving_holder_leaves_no_delay() {
    let mut net = Net::with_lock_delay(DELAY);
    let name = held_by_2_at_master_1(&mut net, Mode::Ex);
    net.lock(3, 1, &name, Mode::Ex);
    net.deliver_all();
    // A survivor's lock comes back and is let go of: no delay.
    net.crash(5);
    net.recover();
    net.advance(DELAY);
    net.unlock(2, 1);
    net.deliver_all();
    assert_eq!(net.completion(2, 1).status, Status::Unlocked);
    assert_eq!(net.completion(3, 1).status, Status::Granted, "an unlock is no loss");
}

#[test]
fn without_lock_delay_a_departed_holders_lock_is_let_go_at_once() {
    let mut net = Net::with_lock_delay(Duration::ZERO);
    let name = held_by_2_at_master_1(&mut net, Mode::Ex);
    net.lock(3, 1, &name, Mode::Ex);
    net.deliver_all();
    net.crash(2);
    net.recover();
    assert_eq!(net.completion(3, 1).status, Status::Granted);
}

#[test]
fn a_node_back_after_fencing_itself_waits_the_lock_delay_before_its_first_grants() {
    let mut net = Net::with_lock_delay(DELAY);
    // Node 3 alone loses quorum and fences itself (the others may have
    // recovered without it meanwhile: it cannot know what they lost).
    net.epoch += 1;
    let alone = View {
        epoch: net.epoch,
        members: vec![ViewMember { id: NodeId(3), weight: 1, incarnation: 1 }],
        quorate: false,
    };
    net.hand_view(&alone);
    assert!(net.node(3).is_fenced());
    net.advance(DELAY * 2);
    net.recover();
    let name = net.name_with_directory(3);
    net.lock(3, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completions(3, 1).is_empty(), "granted at once by a node back from fencing itself");
    net.advance(DELAY);
    net.deliver_all();
    assert_eq!(net.completion(3, 1).status, Status::Granted);
}
