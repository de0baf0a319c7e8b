//! The link to the node's corosync: CPG (the group's changes and messages)
//! and quorum (votequorum's word), each on a dedicated thread blocked in
//! corosync's dispatch, so nothing of the lock path ever waits for corosync.
//! The callbacks turn what corosync says into [`Event`]s for the membership
//! task; a connection that breaks is reported ([`Event::CpgLost`],
//! [`Event::QuorumLost`]) and made
//! again a second later.
//!
//! corosync's callbacks are plain functions, so they reach the membership
//! task through one process-wide queue ([`EVENTS`]): an agent has one
//! membership.

use std::sync::OnceLock;
use std::time::Duration;

use rust_corosync::{DispatchFlags, TrackFlags, cpg, quorum};
use tokio::sync::mpsc;

use dlm_core::cluster::agree::CpgMember;

use super::realtime::Realtime;
use crate::lease::Timing;

/// What corosync said, in the order it said it.
pub enum Event {
    /// This process joined the group as `me`; `handle` multicasts to it.
    Joined { handle: cpg::Handle, me: CpgMember },
    /// The group's members now, and the nodes that left because their
    /// corosync was lost (CPG's reason `NODEDOWN`).
    Confchg { members: Vec<CpgMember>, lost: Vec<u32> },
    /// This node fenced a lost node, or was told by hand that it is fenced.
    Fenced(u32),
    /// CPG's ring changed.
    Totem(u64),
    /// A message multicast by a member.
    Deliver(CpgMember, Vec<u8>),
    /// Votequorum's word, as of a ring.
    Quorum { quorate: bool, ring: u64 },
    /// The CPG connection broke (or could not be made): why.
    CpgLost(String),
    /// The quorum connection broke (or could not be made): why.
    QuorumLost(String),
    /// corosync's timeouts changed while it ran (a reload of its
    /// configuration), as the lease's asker read them.
    Timing(Timing),
}

/// Where the callbacks put what corosync says.
static EVENTS: OnceLock<mpsc::Sender<Event>> = OnceLock::new();

/// How long to wait before connecting again to a corosync that went away.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

fn emit(event: Event) {
    if let Some(events) = EVENTS.get() {
        // The dispatch threads are not the runtime's: they may block. The
        // queue is drained by the membership task, which never waits for
        // them, so a full queue only slows corosync's dispatch.
        let _ = events.blocking_send(event);
    }
}

/// Starts the dispatch threads for the CPG group `group`.
///
/// # Errors
/// Started twice in one process, or a thread cannot be made.
pub fn spawn(group: String, events: mpsc::Sender<Event>, realtime: &Realtime) -> Result<(), String> {
    EVENTS.set(events).map_err(|_| "the corosync membership is started once per process".to_string())?;
    let thread = |name: &str| std::thread::Builder::new().name(name.to_string());
    let (cpg_realtime, quorum_realtime) = (realtime.clone(), realtime.clone());
    thread("dlm-cpg")
        .spawn(move || {
            let _realtime = cpg_realtime.enter("dlm-cpg");
            loop {
                emit(Event::CpgLost(run_cpg(&group)));
                std::thread::sleep(RECONNECT_PAUSE);
            }
        })
        .map_err(|e| e.to_string())?;
    thread("dlm-quorum")
        .spawn(move || {
            let _realtime = quorum_realtime.enter("dlm-quorum");
            loop {
                emit(Event::QuorumLost(run_quorum()));
                std::thread::sleep(RECONNECT_PAUSE);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Joins the group and dispatches its callbacks until the connection
/// breaks; returns why it broke.
fn run_cpg(group: &str) -> String {
    let model = cpg::ModelData::ModelV1(cpg::Model1Data {
        flags: cpg::Model1Flags::None,
        deliver_fn: Some(on_deliver),
        confchg_fn: Some(on_confchg),
        totem_confchg_fn: Some(on_totem),
    });
    let handle = match cpg::initialize(&model, 0) {
        Ok(handle) => handle,
        Err(error) => return format!("cannot connect to corosync ({error}); is it running?"),
    };
    let nodeid = match cpg::local_get(&handle) {
        Ok(nodeid) => u32::from(nodeid),
        Err(error) => return format!("cannot read the local node id: {error}"),
    };
    // Joined first: the join's own change comes through dispatch, after it.
    emit(Event::Joined { handle: handle.clone(), me: CpgMember { nodeid, pid: std::process::id() } });
    if let Err(error) = cpg::join(&handle, group) {
        return format!("cannot join the group {group:?}: {error}");
    }
    match cpg::dispatch(&handle, DispatchFlags::Blocking) {
        Ok(()) => "dispatch ended".to_string(),
        Err(error) => format!("connection lost: {error}"),
    }
}

/// Tracks votequorum until the connection breaks; returns why it broke.
fn run_quorum() -> String {
    let model = quorum::ModelData::ModelV1(quorum::Model1Data {
        flags: quorum::Model1Flags::None,
        quorum_notification_fn: Some(on_quorum),
        nodelist_notification_fn: None,
    });
    let handle = match quorum::initialize(&model, 0) {
        Ok((handle, _)) => handle,
        Err(error) => return format!("cannot connect to corosync's quorum service ({error}); is it running?"),
    };
    // Tracking changes also brings the current state at once.
    if let Err(error) = quorum::trackstart(&handle, TrackFlags::Changes) {
        return format!("cannot track quorum: {error}");
    }
    match quorum::dispatch(&handle, DispatchFlags::Blocking) {
        Ok(()) => "dispatch ended".to_string(),
        Err(error) => format!("connection lost: {error}"),
    }
}

fn members(list: &[cpg::Address]) -> Vec<CpgMember> {
    list.iter().map(|a| CpgMember { nodeid: u32::from(a.nodeid), pid: a.pid }).collect()
}

fn on_deliver(_: &cpg::Handle, _group: String, nodeid: rust_corosync::NodeId, pid: u32, message: &[u8], _: usize) {
    emit(Event::Deliver(CpgMember { nodeid: u32::from(nodeid), pid }, message.to_vec()));
}

fn on_confchg(
    _: &cpg::Handle,
    _group: &str,
    now: Vec<cpg::Address>,
    left: Vec<cpg::Address>,
    _joined: Vec<cpg::Address>,
) {
    // NODEDOWN: the node's corosync left the ring. PROCDOWN and LEAVE: the
    // agent's process exited or left, its node's corosync is still there.
    let lost = left.iter().filter(|a| matches!(a.reason, cpg::Reason::NodeDown)).map(|a| u32::from(a.nodeid)).collect();
    emit(Event::Confchg { members: members(&now), lost });
}

fn on_totem(_: &cpg::Handle, ring: cpg::RingId, _members: Vec<rust_corosync::NodeId>) {
    emit(Event::Totem(ring.seq));
}

fn on_quorum(_: &quorum::Handle, quorate: bool, ring: quorum::RingId, _members: Vec<rust_corosync::NodeId>) {
    emit(Event::Quorum { quorate, ring: ring.seq });
}

/// Multicasts `bytes` to the group in agreed order, retrying while
/// corosync's flow control says to wait.
pub async fn multicast(handle: &cpg::Handle, bytes: &[u8]) -> Result<(), String> {
    for _ in 0..200 {
        match cpg::mcast_joined(handle, cpg::Guarantee::TypeAgreed, bytes) {
            Ok(()) => return Ok(()),
            Err(rust_corosync::CsError::CsErrTryAgain) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(error) => return Err(error.to_string()),
        }
    }
    Err("corosync kept asking to try again for a second".to_string())
}
