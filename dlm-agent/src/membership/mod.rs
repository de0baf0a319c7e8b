//! Membership from the node's cluster stack: with `[cluster] membership =
//! "corosync"` the agent joins a CPG group of its cluster, agrees with the
//! other agents on each view (`agree`), and hands every view to the driver
//! as [`Command::View`], where the lock engine recovers from it.
//!
//! ```text
//!  corosync ──callbacks──▶ dispatch threads (corosync.rs) ──Event──▶ membership task ──Command::View──▶ driver
//!      ▲                                                                   │
//!      └──────────────── Round / Report multicasts (message.rs) ──────────┘
//! ```
//!
//! Lock traffic stays on the agents' own peer links; the group carries only
//! the agreement's few small messages. A node's corosync node id is its dlm
//! id, and only the configured `[[cluster.member]]` nodes are let in.

pub mod agree;
mod corosync;
mod message;

use prometheus::{IntCounterVec, Opts};
use tokio::sync::mpsc;

use self::agree::{Agreement, Refusal, Step};
use self::corosync::Event;
use crate::command::{Command, DriverHandle};
use crate::config::ClusterSettings;
use crate::metrics::Metrics;

/// Events from corosync's threads queued at most for the membership task.
const EVENTS_MAX: usize = 1024;

/// Starts the membership: corosync's dispatch threads and the task that
/// agrees on views and hands them to the driver.
///
/// # Errors
/// Started twice in one process, or a thread cannot be made.
pub fn start(
    settings: &ClusterSettings,
    incarnation: u64,
    driver: DriverHandle,
    metrics: &Metrics,
) -> Result<(), String> {
    let refused = IntCounterVec::new(
        Opts::new(
            "dlm_membership_refused_total",
            "Group members and messages left out of views (not a configured node, a node twice, a bad message)",
        ),
        &["reason"],
    )
    .expect("valid metric");
    for reason in Refusal::ALL {
        refused.with_label_values(&[reason.as_str()]);
    }
    metrics.register(Box::new(refused.clone()));
    let (events, receiver) = mpsc::channel(EVENTS_MAX);
    corosync::spawn(settings.cpg_group(), events)?;
    let agreement = Agreement::new(settings.node_id, settings.members.iter().map(|m| (m.id, m.weight)), incarnation);
    tokio::spawn(run(agreement, settings.node_id, receiver, driver, refused));
    Ok(())
}

async fn run(
    mut agreement: Agreement,
    node: u16,
    mut events: mpsc::Receiver<Event>,
    driver: DriverHandle,
    refused: IntCounterVec,
) {
    let mut group = None;
    while let Some(event) = events.recv().await {
        let steps = match event {
            Event::Joined { handle, me } => {
                if me.nodeid != u32::from(node) {
                    tracing::error!(
                        corosync = me.nodeid,
                        dlm = node,
                        "corosync's node id is not this node's cluster.node_id: this node stays out of the cluster"
                    );
                    continue;
                }
                tracing::info!(nodeid = me.nodeid, pid = me.pid, "joined the corosync group");
                group = Some(handle);
                agreement.joined(me);
                Vec::new()
            }
            Event::Confchg(members) => {
                tracing::info!(members = ?members.iter().map(|m| m.nodeid).collect::<Vec<_>>(), "group changed");
                agreement.confchg(members)
            }
            Event::Totem(ring) => agreement.totem(ring),
            Event::Deliver(from, bytes) => match message::decode(&bytes) {
                Some(message) => agreement.deliver(from, message),
                None => vec![Step::Refused(Refusal::BadMessage, Some(from.nodeid))],
            },
            Event::Quorum { quorate, ring } => {
                tracing::info!(quorate, ring, "quorum");
                agreement.quorum(quorate, ring)
            }
            Event::CpgLost(why) => {
                tracing::error!(%why, "lost the corosync group: fencing this node until it is back");
                group = None;
                agreement.lost()
            }
            Event::QuorumLost(why) => {
                tracing::error!(%why, "lost corosync's quorum service: fencing this node until it is back");
                agreement.quorum_lost()
            }
        };
        for step in steps {
            match step {
                Step::Send(message) => {
                    let Some(handle) = group.as_ref() else { continue };
                    if let Err(error) = corosync::multicast(handle, &message::encode(&message)).await {
                        tracing::warn!(%error, "cannot multicast to the group");
                    }
                }
                Step::View(view) => {
                    tracing::info!(epoch = view.epoch, quorate = view.quorate, members = ?view.members.iter().map(|m| m.id.0).collect::<Vec<_>>(), "new view");
                    if driver.send(Command::View { view }).await.is_err() {
                        return;
                    }
                }
                Step::Refused(reason, nodeid) => {
                    tracing::warn!(reason = reason.as_str(), ?nodeid, "left out of the view");
                    refused.with_label_values(&[reason.as_str()]).inc();
                }
            }
        }
    }
}
