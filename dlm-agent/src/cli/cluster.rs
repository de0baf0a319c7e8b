//! The cluster part of `dlm-agent status` (membership, recovery, fencing, and
//! the exit status scripts act on), and `dlm-agent fence-ack`.

use std::process::ExitCode;

use clap::Args;
use dlm_proto::proto;
use serde_json::{Value, json};

use super::AgentAddress;

/// `status` exit: the node is recovering into a new view.
pub const EXIT_RECOVERING: u8 = 2;
/// `status` exit: a lost node is waiting to be fenced before its locks are recovered.
pub const EXIT_WAITING_FOR_FENCING: u8 = 3;
/// `status` exit: the node is not in a quorate view (fenced, not quorate, or not joined yet).
pub const EXIT_NOT_QUORATE: u8 = 4;

/// What `status` exits with for the cluster state in `s`: 0 when running
/// (or not in a cluster); else the first of not quorate, waiting for
/// fencing, recovering.
#[must_use]
pub fn exit_status(s: &proto::StatusReply) -> u8 {
    if s.cluster.is_empty() {
        0
    } else if !s.quorate {
        EXIT_NOT_QUORATE
    } else if !s.waiting_for_fencing.is_empty() {
        EXIT_WAITING_FOR_FENCING
    } else if s.recovery.is_some() || !s.view_waiting_for.is_empty() {
        EXIT_RECOVERING
    } else {
        0
    }
}

/// The state as one word, as scripts and the JSON say it.
#[must_use]
pub fn state(s: &proto::StatusReply) -> &'static str {
    match exit_status(s) {
        EXIT_NOT_QUORATE if s.joining => "joining",
        EXIT_NOT_QUORATE if s.fenced => "fenced",
        EXIT_NOT_QUORATE => "not_quorate",
        EXIT_WAITING_FOR_FENCING => "waiting_for_fencing",
        EXIT_RECOVERING => "recovering",
        _ => "running",
    }
}

/// The cluster fields of the JSON.
#[must_use]
pub fn json(s: &proto::StatusReply) -> Value {
    let recovery = s.recovery.as_ref().map(|r| {
        json!({"phase": r.phase, "waiting_for": r.waiting_for, "elapsed_ms": r.elapsed_ms,
               "phase_elapsed_ms": r.phase_elapsed_ms, "departed": r.departed})
    });
    let fencing: Vec<Value> =
        s.waiting_for_fencing.iter().map(|w| json!({"node_id": w.node_id, "waited_ms": w.waited_ms})).collect();
    json!({"state": state(s), "membership": s.membership, "epoch": s.epoch, "members": s.members,
           "quorate": s.quorate, "fenced": s.fenced, "joining": s.joining, "recovery": recovery,
           "waiting_for_fencing": fencing, "corosync_connected": s.corosync_connected,
           "view_waiting_for": s.view_waiting_for, "view_waiting_ms": s.view_waiting_ms})
}

/// The cluster lines of the text.
#[must_use]
pub fn text(s: &proto::StatusReply) -> String {
    let mut text = format!(
        "state {}\nmembership {} epoch {} members {:?} quorate {}\n",
        state(s),
        s.membership,
        s.epoch,
        s.members,
        if s.quorate { "yes" } else { "no" }
    );
    if s.membership == "corosync" && !s.corosync_connected {
        text += "corosync: not connected (this node is fenced until it is)\n";
    }
    if let Some(r) = &s.recovery {
        text += &format!(
            "recovery: {:.1}s, at the {} barrier for {:.1}s, waiting for {:?}; departed {:?}\n",
            r.elapsed_ms as f64 / 1000.0,
            r.phase,
            r.phase_elapsed_ms as f64 / 1000.0,
            r.waiting_for,
            r.departed
        );
    }
    if !s.view_waiting_for.is_empty() {
        text += &format!(
            "view: a membership change has waited {:.1}s for the reports of {:?} (a stopped agent holds it up)\n",
            s.view_waiting_ms as f64 / 1000.0,
            s.view_waiting_for
        );
    }
    for w in &s.waiting_for_fencing {
        text += &format!(
            "wait fencing: node {} lost {:.1}s ago; its locks are recovered once it is fenced \
             (dlm-agent fence-ack {} once it is known to be off)\n",
            w.node_id,
            w.waited_ms as f64 / 1000.0,
            w.node_id
        );
    }
    text
}

/// Options of `dlm-agent fence-ack`.
#[derive(Args, Debug)]
pub struct FenceAckArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// The lost node's id. Acknowledge only a node known to be off (powered
    /// down, or cut off and its agent stopped): its locks are recovered and
    /// granted to others at once.
    node: u16,
}

/// `dlm-agent fence-ack NODE`.
pub async fn fence_ack(args: FenceAckArgs) -> ExitCode {
    let client = match args.agent.connect().await {
        Ok(client) => client,
        Err(code) => return ExitCode::from(code),
    };
    match client.fence_ack(args.node).await {
        Ok(()) => {
            println!("node {} acknowledged as fenced; its locks will be recovered", args.node);
            ExitCode::SUCCESS
        }
        Err(error) => ExitCode::from(super::call_failed(&error)),
    }
}
