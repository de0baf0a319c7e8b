//! The Rust client library: async sessions and lock guards over the agent's
//! API. On the Unix socket a session is a framed session
//! ([`dlm_proto::framing`]: the gRPC messages without HTTP/2, fewer hops and
//! bytes per lock), its bytes through shared-memory rings the agent passes
//! over the socket (only the wake-ups go through the kernel; the agent
//! serves it on the socket when it has no ring to spare, and
//! `DLM_CLIENT_RINGS=0` asks for none); over TCP, and for the admin calls,
//! it is gRPC.
//!
//! ```no_run
//! use dlm_client::{Client, LockOptions, Mode, Target};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect(&Target::Unix("/run/dlm/dlm.sock".into())).await?;
//! let session = client.session().await?;
//! let guard = session.lock("default", "orders/42", Mode::Ex, LockOptions::default()).await?;
//! // Pass the fencing token to the storage you write to, so it can refuse a
//! // writer that has lost the lock since.
//! println!("holding orders/42 with token {}", guard.fencing_token());
//! guard.unlock().await?; // or drop it: dropping unlocks too
//! # Ok(())
//! # }
//! ```
//!
//! `examples/lock.rs` is this program, runnable
//! (`cargo run -p dlm-client --example lock -- SOCKET NAME`); the test
//! command runs its code against a real agent.
//!
//! A session ends when the [`Session`] and every guard from it are dropped
//! (or the process exits): the agent then releases its locks.
//!
//! Cancelling is dropping: a `lock` future dropped before it completes (by
//! `tokio::time::timeout`, `select!`, or task abort) cancels its request on
//! the agent; if the grant crossed the cancel, the lock is released at once.
//! A server-side timeout is [`LockOptions::timeout`]; a try-lock is
//! `LockFlags::NOQUEUE` in [`LockOptions::flags`].
//!
//! While a framed session's request waits for its answer and no other
//! session of the process waits (or it is an unlock on a session through
//! rings, while the process's other ring sessions have nothing to read),
//! the request itself reads its session's ring (or socket), spinning up to
//! [`DEFAULT_ANSWER_SPIN`] before it sleeps, so that an answer does not
//! have to wake it, nor be handed over from another task
//! ([`Client::with_answer_spin`], `DLM_CLIENT_SPIN_US`; not on a single
//! CPU; one spin of a process at a time); otherwise the session's own task
//! reads.

mod incoming;
mod session;
mod spin;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use self::incoming::Incoming;
pub use self::session::{LockGuard, Session};
use self::session::{Requests, SessionInner};
use self::spin::{AnswerDue, SpinRead};
pub use self::spin::{DEFAULT_ANSWER_SPIN, answer_spin};
/// The lock engine's words a client uses (modes, flags), so that an
/// application depends on this crate alone.
pub use dlm_core::{LockFlags, Mode, StatusFlags, UnlockFlags};
use dlm_proto::framing::{self, Frame, FrameSink};
use dlm_proto::proto::{self, dlm_client::DlmClient, server_message};

/// Where the agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address, `host:port`, plain (an agent with `[tls] insecure = true`).
    Tcp(String),
    /// A TCP address, `host:port`, over TLS.
    Tls(String, ClientTls),
}

/// How a TCP client secures its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM: the CA that signed the agent's certificate.
    pub ca: Vec<u8>,
    /// PEM: this client's certificate chain and key, its identity for the
    /// agent's access policy (`cert:NAME`); `None`: anonymous.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the agent's certificate must be valid for.
    pub server_name: String,
}

/// What went wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {target}: {source}")]
    Unreachable {
        /// Where it was looked for.
        target: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A call failed.
    #[error("{0}")]
    Call(#[from] tonic::Status),
    /// The session stream ended.
    #[error("the session was closed by the agent")]
    SessionClosed,
}

/// Why a lock or conversion was not granted.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The request completed without a grant.
    #[error("not granted: {0:?}")]
    NotGranted(proto::Status),
    /// The agent refused the request; nothing changed.
    #[error("refused ({code}): {message}")]
    Rejected {
        /// A stable identifier, e.g. `unknown_lockspace`.
        code: String,
        /// The agent's explanation.
        message: String,
    },
    /// The session ended before the request completed.
    #[error("the session was closed")]
    SessionClosed,
}

/// Options of a lock request.
#[derive(Clone, Debug, Default)]
pub struct LockOptions {
    /// Request flags (`NOQUEUE` for a try-lock, `VALBLK`, `PERSISTENT`, …).
    pub flags: LockFlags,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// W3C trace context, so the lock's span joins the caller's trace.
    pub traceparent: Option<String>,
}

/// Something the agent tells a session without being asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The lock `handle` blocks a request for `mode`: release or down-convert it soon.
    Blocking {
        /// The lock.
        handle: u64,
        /// The blocked mode.
        mode: Mode,
    },
    /// The lock `handle` is gone.
    Revoked {
        /// The lock.
        handle: u64,
        /// Why.
        reason: String,
    },
}

/// How a held lock was lost ([`LockGuard::lost`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The agent revoked it (quorum lost, its node left the view, the
    /// lockspace was released by force), with the agent's reason.
    Revoked {
        /// Why, as the agent says it.
        reason: String,
    },
    /// The session ended: the agent closed it, exited or was killed. Its
    /// locks are released by the agent or recovered by the cluster, so
    /// another client may hold them now.
    SessionEnded,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Revoked { reason } => write!(f, "revoked by the agent ({reason})"),
            Loss::SessionEnded => f.write_str("the session with the agent ended"),
        }
    }
}

/// How long the client waits for the agent to answer: to connect, to
/// welcome a new session, or to answer an admin call. An agent that is up
/// answers in milliseconds; one that does not (stopped, out of file
/// descriptors, or not an agent at all) must not hang its clients and the
/// CLI: they fail as [`ClientError::Unreachable`]. Waiting for a lock is not
/// bounded by this (a lock request has its own timeout).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to an agent.
#[derive(Clone)]
pub struct Client {
    grpc: DlmClient<Channel>,
    /// The Unix socket for framed sessions; `None`: sessions over gRPC.
    framed: Option<PathBuf>,
    /// Where the agent is, for errors.
    target: String,
    /// How long a framed session's reader spins for a due answer.
    answer_spin: Duration,
}

impl Client {
    /// Connects to the agent.
    ///
    /// # Errors
    /// The agent is not there.
    pub async fn connect(target: &Target) -> Result<Client, ClientError> {
        answered(&format!("{target:?}"), Client::connect_now(target)).await
    }

    async fn connect_now(target: &Target) -> Result<Client, ClientError> {
        let unreachable = |source: tonic::transport::Error| ClientError::Unreachable {
            target: format!("{target:?}"),
            source: source.into(),
        };
        let channel = match target {
            Target::Tcp(address) => Endpoint::from_shared(format!("http://{address}"))
                .map_err(unreachable)?
                .connect()
                .await
                .map_err(unreachable)?,
            Target::Tls(address, tls) => {
                let mut config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca))
                    .domain_name(tls.server_name.clone());
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                Endpoint::from_shared(format!("https://{address}"))
                    .map_err(unreachable)?
                    .tls_config(config)
                    .map_err(unreachable)?
                    .connect()
                    .await
                    .map_err(unreachable)?
            }
            Target::Unix(path) => {
                let path = path.clone();
                // The URI is a placeholder: the connector ignores it.
                Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { Ok::<_, std::io::Error>(TokioIo::new(connect_unix(&path).await?)) }
                    }))
                    .await
                    .map_err(unreachable)?
            }
        };
        let framed = match target {
            Target::Unix(path) => Some(path.clone()),
            Target::Tcp(_) | Target::Tls(..) => None,
        };
        Ok(Client {
            grpc: DlmClient::new(channel),
            framed,
            target: format!("{target:?}"),
            answer_spin: spin::answer_spin(),
        })
    }

    /// This client, opening its sessions as gRPC streams even on a Unix
    /// socket (what other languages do; the framed protocol is the default
    /// there because it is faster).
    #[must_use]
    pub fn with_grpc_sessions(mut self) -> Client {
        self.framed = None;
        self
    }

    /// This client, its framed sessions spinning up to `spin` for an answer
    /// due before they sleep (see [`DEFAULT_ANSWER_SPIN`]); zero: never.
    #[must_use]
    pub fn with_answer_spin(mut self, spin: Duration) -> Client {
        self.answer_spin = spin;
        self
    }

    /// Opens a session.
    ///
    /// # Errors
    /// The agent refused it (too many sessions) or went away.
    pub async fn session(&self) -> Result<Session, ClientError> {
        let opened = async {
            match &self.framed {
                Some(path) => framed_session(path, self.answer_spin).await,
                None => self.grpc_session().await,
            }
        };
        answered(&self.target, opened).await
    }

    async fn grpc_session(&self) -> Result<Session, ClientError> {
        let (requests, outbound) = mpsc::channel(SESSION_REQUESTS_MAX);
        let mut inbound = self.grpc.clone().session(ReceiverStream::new(outbound)).await?.into_inner();
        let id = match inbound.message().await? {
            Some(proto::ServerMessage { body: Some(server_message::Body::Welcome(welcome)) }) => welcome.session,
            _ => return Err(ClientError::SessionClosed),
        };
        let inner = Arc::new(SessionInner::new(id, Requests::Stream(requests), AnswerDue::new(Duration::ZERO), None));
        let reader = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let Some(inner) = reader.upgrade() else { break };
                inner.dispatch(message);
            }
            if let Some(inner) = reader.upgrade() {
                inner.close_waiters();
            }
        });
        Ok(Session::new(inner))
    }

    /// The agent's status.
    ///
    /// # Errors
    /// The call failed.
    pub async fn status(&self) -> Result<proto::StatusReply, ClientError> {
        answered(&self.target, async { Ok(self.grpc.clone().status(proto::StatusRequest {}).await?.into_inner()) })
            .await
    }

    /// The agent's lockspaces.
    ///
    /// # Errors
    /// The call failed.
    pub async fn lockspaces(&self) -> Result<proto::LockspacesReply, ClientError> {
        answered(&self.target, async {
            Ok(self.grpc.clone().lockspaces(proto::LockspacesRequest {}).await?.into_inner())
        })
        .await
    }

    /// One page of a lockspace's resources with their queues (see
    /// [`Client::dump_all`] for all of them).
    ///
    /// # Errors
    /// The call failed (unknown lockspace among others).
    pub async fn dump(&self, request: proto::DumpRequest) -> Result<proto::DumpReply, ClientError> {
        answered(&self.target, async { Ok(self.grpc.clone().dump(request).await?.into_inner()) }).await
    }

    /// A lockspace's resources (the one named, if any) with their queues,
    /// page after page, at most `max_resources` of them (0: all); a
    /// resource split over pages comes back whole. `progress` hears the
    /// locks gathered so far after each page.
    ///
    /// # Errors
    /// A call failed (unknown lockspace among others).
    pub async fn dump_all(
        &self,
        lockspace: &str,
        name: Option<&[u8]>,
        max_resources: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<proto::ResourceInfo>, ClientError> {
        let wanted = if max_resources == 0 { usize::MAX } else { max_resources };
        let mut resources: Vec<proto::ResourceInfo> = Vec::new();
        let (mut page_token, mut locks) = (Vec::new(), 0);
        loop {
            let request = proto::DumpRequest {
                lockspace: lockspace.into(),
                name: name.map(<[u8]>::to_vec),
                page_token,
                ..proto::DumpRequest::default()
            };
            let page = self.dump(request).await?;
            for part in page.resources {
                locks += part.granted.len() + part.converting.len() + part.waiting.len();
                match resources.last_mut() {
                    Some(last) if part.continued && last.name == part.name => {
                        last.granted.extend(part.granted);
                        last.converting.extend(part.converting);
                        last.waiting.extend(part.waiting);
                    }
                    _ => resources.push(part),
                }
            }
            progress(locks);
            // More than wanted means the last wanted one is complete.
            if page.next_page_token.is_empty() || resources.len() > wanted {
                resources.truncate(wanted);
                return Ok(resources);
            }
            page_token = page.next_page_token;
        }
    }

    /// Creates a lockspace (`lvb_len` 0: the default).
    ///
    /// # Errors
    /// The call failed (name in use, invalid length, …).
    pub async fn create_lockspace(&self, name: &str, lvb_len: u32) -> Result<(), ClientError> {
        let request = proto::CreateLockspaceRequest { name: name.into(), lvb_len };
        answered(&self.target, async { Ok(self.grpc.clone().create_lockspace(request).await.map(drop)?) }).await
    }

    /// Releases a lockspace; with `force`, even while it has locks (their
    /// holders are told they lost them).
    ///
    /// # Errors
    /// The call failed (unknown lockspace, locks left without `force`, …).
    pub async fn release_lockspace(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let request = proto::ReleaseLockspaceRequest { name: name.into(), force };
        answered(&self.target, async { Ok(self.grpc.clone().release_lockspace(request).await.map(drop)?) }).await
    }
}

impl Client {
    /// Acknowledges that lost node `node` is fenced (`dlm-agent fence-ack`).
    ///
    /// # Errors
    /// The call failed (the node is not waiting for fencing, no corosync membership, …).
    pub async fn fence_ack(&self, node: u16) -> Result<(), ClientError> {
        let request = proto::FenceAckRequest { node_id: u32::from(node) };
        answered(&self.target, async { Ok(self.grpc.clone().fence_ack(request).await.map(drop)?) }).await
    }
}

/// What `call` returns, unless the agent takes longer than [`ANSWER_TIMEOUT`].
async fn answered<T>(
    target: &str,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(ANSWER_TIMEOUT, call).await.unwrap_or_else(|_| {
        let silence = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer in {ANSWER_TIMEOUT:?}"));
        Err(ClientError::Unreachable { target: target.to_string(), source: silence.into() })
    })
}

/// Where the agent's Unix socket is by default: `$XDG_RUNTIME_DIR/dlm/dlm.sock`
/// for a user, `/run/dlm/dlm.sock` for root (or when `XDG_RUNTIME_DIR` is
/// unset). The agent makes its socket there unless told otherwise.
#[must_use]
pub fn default_socket() -> PathBuf {
    let is_root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !is_root => PathBuf::from(dir).join("dlm/dlm.sock"),
        _ => PathBuf::from("/run/dlm/dlm.sock"),
    }
}

/// Requests a session queues unsent before `lock` and friends wait for room.
pub(crate) const SESSION_REQUESTS_MAX: usize = 256;

/// Opens a framed session on the Unix socket at `path`.
async fn framed_session(path: &Path, spin: Duration) -> Result<Session, ClientError> {
    let unreachable = |source: std::io::Error| ClientError::Unreachable {
        target: format!("{:?}", Target::Unix(path.to_path_buf())),
        source: source.into(),
    };
    let mut stream = connect_unix(path).await.map_err(unreachable)?;
    let rings = use_rings();
    let preface = if rings { framing::RING_PREFACE } else { framing::PREFACE };
    stream.write_all(&preface).await.map_err(unreachable)?;
    let (read_half, write_half) = if rings {
        framing::split_accepting_ring(stream).await.map_err(unreachable)?
    } else {
        framing::split(stream).map_err(unreachable)?
    };
    let answer_due = AnswerDue::new(spin);
    let mut frames = framing::FrameReader::new(BufReader::with_capacity(
        framing::READ_BUFFER_LEN,
        SpinRead::new(read_half, answer_due.clone()),
    ));
    let id = match std::future::poll_fn(|cx| frames.poll_frame::<proto::ServerMessage>(cx)).await {
        Ok(Frame::Message(proto::ServerMessage { body: Some(server_message::Body::Welcome(welcome)) })) => {
            welcome.session
        }
        Ok(Frame::Message(proto::ServerMessage { body: Some(server_message::Body::Rejected(refused)) })) => {
            return Err(ClientError::Call(dlm_proto::convert::rejection_status(&refused.code, &refused.message)));
        }
        _ => return Err(ClientError::SessionClosed),
    };
    // The session holds the only handle: when it is dropped the write side
    // shuts down, and the agent ends the session.
    // Its requesters read its frames while they wait (`incoming`), and a
    // task while none does.
    let incoming = Incoming::new(frames);
    let inner = Arc::new(SessionInner::new(
        id,
        Requests::Framed(FrameSink::new(write_half)),
        answer_due,
        Some(incoming.clone()),
    ));
    tokio::spawn(incoming.serve(Arc::downgrade(&inner)));
    Ok(Session::new(inner))
}

/// Whether framed sessions ask for shared-memory rings: yes, unless
/// `DLM_CLIENT_RINGS=0` (an agent with none to spare serves the session on
/// its socket anyway).
fn use_rings() -> bool {
    std::env::var("DLM_CLIENT_RINGS").map_or(true, |v| v.trim() != "0")
}

/// Connects to the agent's Unix socket. A full accept backlog refuses a
/// non-blocking connect with `EAGAIN` rather than queueing it (a burst of
/// clients, or someone flooding the socket): that is tried again, briefly
/// backing off, for as long as the caller waits ([`ANSWER_TIMEOUT`]).
async fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    let mut pause = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path).await {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            connected => return connected,
        }
    }
}
