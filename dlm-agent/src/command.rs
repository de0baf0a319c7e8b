//! What the transports and the driver (the task that owns the
//! `ClusterNode`, [`crate::driver`]) share: the [`Command`]s the transports
//! send, the [`DriverHandle`] they send them through, and the outputs the
//! driver writes to (a session's [`SessionOutput`], a peer's
//! [`PeerSender`]). Neither side imports the other; both import this.
//!
//! ```text
//!  transports ──Command──▶ DriverHandle ──▶ driver ──▶ SessionOutput (a session's stream or frames)
//!                                                 └──▶ PeerSender (a peer's dialer)
//! ```

use std::sync::Arc;

use dlm_core::SessionId;
use dlm_core::cluster::{Envelope, NodeId, View};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::access::Identity;
use crate::convert::Rejection;
use crate::framing::FrameSink;
use crate::proto;

/// Who is on the other end of a client session: from the Unix socket
/// (`SO_PEERCRED`), or a TCP client's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The client's process id (Unix socket).
    pub pid: Option<i32>,
    /// What the connection proves, for the access policy.
    pub identity: Identity,
}

impl Credentials {
    /// The credentials a Unix socket reported.
    #[must_use]
    pub fn of(credentials: tokio::net::unix::UCred) -> Credentials {
        let pid = credentials.pid();
        Credentials { pid, identity: Identity::local(credentials.uid(), credentials.gid(), pid) }
    }

    /// The client's user id (Unix socket).
    #[must_use]
    pub fn uid(&self) -> Option<u32> {
        self.identity.uid
    }
}

/// Messages to a gRPC session's stream.
pub type SessionSender = mpsc::Sender<Result<proto::ServerMessage, tonic::Status>>;

/// Where a session's messages go.
#[derive(Clone)]
pub enum SessionOutput {
    /// A gRPC stream's bounded queue (`session_queue_max` messages).
    Stream(SessionSender),
    /// A framed connection, written by the driver itself; more than
    /// `session_queue_max` frames unwritten make the session slow.
    Framed(FrameSink),
}

/// The driver's end of one peer's dialer.
pub struct PeerSender {
    /// Envelopes to send, a batch per driver pass.
    pub queue: mpsc::Sender<Vec<Envelope>>,
    /// Tells the dialer to drop its connection and dial again.
    pub reset: Arc<Notify>,
}

/// What the driver is asked to do. Each variant's doc says what its fields
/// are for; `reply` carries the answer.
pub enum Command {
    /// Open a session whose messages go to `events`.
    /// `ended` is dropped when the session ends, which stops its reader.
    Open {
        credentials: Credentials,
        events: SessionOutput,
        ended: oneshot::Sender<()>,
        reply: oneshot::Sender<Result<SessionId, Rejection>>,
    },
    /// A message from a session's client.
    Client { session: SessionId, message: proto::ClientMessage },
    /// The session's stream ended.
    Close { session: SessionId },
    /// Status for the `Status` call.
    Status { reply: oneshot::Sender<proto::StatusReply> },
    /// Lockspaces for the `Lockspaces` call (and the metrics' gauges).
    Lockspaces { reply: oneshot::Sender<proto::LockspacesReply> },
    /// A dump for the `Dump` call.
    Dump { request: proto::DumpRequest, reply: oneshot::Sender<Result<proto::DumpReply, Rejection>> },
    /// Create a lockspace.
    CreateLockspace { name: String, lvb_len: usize, reply: oneshot::Sender<Result<(), Rejection>> },
    /// Release a lockspace.
    ReleaseLockspace { name: String, force: bool, reply: oneshot::Sender<Result<(), Rejection>> },
    /// Cancel pending requests, revoke locks, end every session, stop.
    Shutdown { reply: oneshot::Sender<()> },
    /// Envelopes from a peer; `refused` is notified if the peer broke the
    /// protocol (its connection is then dropped).
    Peer { from: NodeId, envelopes: Vec<Envelope>, refused: Arc<Notify> },
    /// The link to a peer went down or came up.
    Link { peer: NodeId, up: bool },
    /// A new view from the membership.
    View { view: View },
    /// What the membership says of itself now.
    Membership(MembershipStatus),
    /// An operator says this lost node is fenced (`dlm-agent fence-ack`).
    FenceAck { node: NodeId, reply: oneshot::Sender<Result<(), String>> },
    /// The node's highest fencing token (for `crate::generation::keep`).
    HighestToken { reply: oneshot::Sender<u64> },
}

/// What the membership says of itself, for `status` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipStatus {
    /// Votequorum's word, once heard.
    pub quorate: Option<bool>,
    /// The dlm nodes in the CPG group now.
    pub group: Vec<NodeId>,
    /// Lost nodes not fenced yet, with when each was lost: no quorate view
    /// without them is taken until they are.
    pub waiting_for_fencing: Vec<(NodeId, tokio::time::Instant)>,
    /// Members whose report the next view waits for (a membership change
    /// being agreed), with when the agreement started.
    pub agreeing: Option<(Vec<NodeId>, tokio::time::Instant)>,
    /// Whether this process is connected to corosync.
    pub connected: bool,
}

/// Where the driver passes an operator's fence acknowledgements to the membership.
pub type FenceAcks = mpsc::Sender<NodeId>;

/// A cheap, cloneable way to reach the driver.
#[derive(Clone)]
pub struct DriverHandle {
    commands: mpsc::Sender<Command>,
}

/// The driver has stopped (the agent is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the lock engine has stopped")]
pub struct DriverStopped;

impl DriverHandle {
    /// A handle sending to the driver's command queue.
    #[must_use]
    pub fn new(commands: mpsc::Sender<Command>) -> DriverHandle {
        DriverHandle { commands }
    }

    /// Sends a command, waiting for room in the queue (back-pressure).
    ///
    /// # Errors
    /// The driver has stopped.
    pub async fn send(&self, command: Command) -> Result<(), DriverStopped> {
        self.commands.send(command).await.map_err(|_| DriverStopped)
    }

    /// Whether the driver has stopped taking commands (the agent is stopping).
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.commands.is_closed()
    }

    /// Sends a command built around a reply channel and waits for the reply.
    ///
    /// # Errors
    /// The driver has stopped.
    pub async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, DriverStopped> {
        let (reply, answer) = oneshot::channel();
        self.send(command(reply)).await?;
        answer.await.map_err(|_| DriverStopped)
    }

    /// Opens a session for a client stream (gRPC or framed) whose messages
    /// go to `output`, the `Welcome` naming the session and `node` first.
    ///
    /// # Errors
    /// The driver refused the session (too many) or has stopped.
    pub async fn open_session(
        &self,
        credentials: Credentials,
        node: &str,
        output: SessionOutput,
    ) -> Result<OpenSession, OpenError> {
        let welcome_output = output.clone();
        let (ended, session_ended) = oneshot::channel();
        let session = self
            .ask(|reply| Command::Open { credentials, events: output, ended, reply })
            .await
            .map_err(|DriverStopped| OpenError::Stopped)?
            .map_err(OpenError::Refused)?;
        let welcome = proto::ServerMessage {
            body: Some(proto::server_message::Body::Welcome(proto::Welcome { session: session.0, node: node.into() })),
        };
        // Nothing was sent to the session yet: the welcome goes first, and
        // fits in an empty queue.
        match welcome_output {
            SessionOutput::Stream(queue) => {
                let _ = queue.try_send(Ok(welcome));
            }
            SessionOutput::Framed(sink) => {
                let _ = sink.send_message(&welcome);
            }
        }
        Ok(OpenSession { session, ended: session_ended })
    }
}

/// A session just opened, for the task that serves its stream.
pub struct OpenSession {
    /// Its id.
    pub session: SessionId,
    /// Completes when the driver ends the session (slow reader, shutdown).
    pub ended: oneshot::Receiver<()>,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    Stopped,
    /// The lock engine refused it.
    #[error("{}: {}", .0.code, .0.message)]
    Refused(Rejection),
}
