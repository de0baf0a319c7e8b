//! The Rust client library: async sessions and lock guards over the agent's
//! API. On the Unix socket a session is a framed session
//! ([`crate::framing`]: the gRPC messages without HTTP/2, fewer hops and
//! bytes per lock); over TCP, and for the admin calls, it is gRPC.
//!
//! ```no_run
//! use dlm_agent::client::{Client, LockOptions, Target};
//! use dlm_core::Mode;
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
//! A session ends when the [`Session`] and every guard from it are dropped
//! (or the process exits): the agent then releases its locks.
//!
//! Cancelling is dropping: a `lock` future dropped before it completes (by
//! `tokio::time::timeout`, `select!`, or task abort) cancels its request on
//! the agent; if the grant crossed the cancel, the lock is released at once.
//! A server-side timeout is [`LockOptions::timeout`]; a try-lock is
//! `LockFlags::NOQUEUE` in [`LockOptions::flags`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dlm_core::{LockFlags, Mode, StatusFlags, UnlockFlags};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::convert::{mode_from_wire, mode_to_wire, status_flags};
use crate::framing::{self, Frame, FrameKind, FrameSink};
use crate::proto::{self, client_message, dlm_client::DlmClient, server_message};

/// Where the agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
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

/// A connection to an agent.
#[derive(Clone)]
pub struct Client {
    grpc: DlmClient<Channel>,
    /// The Unix socket for framed sessions; `None`: sessions over gRPC.
    framed: Option<PathBuf>,
}

impl Client {
    /// Connects to the agent.
    ///
    /// # Errors
    /// The agent is not there.
    pub async fn connect(target: &Target) -> Result<Client, ClientError> {
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
            Target::Unix(path) => {
                let path = path.clone();
                // The URI is a placeholder: the connector ignores it.
                Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                    }))
                    .await
                    .map_err(unreachable)?
            }
        };
        let framed = match target {
            Target::Unix(path) => Some(path.clone()),
            Target::Tcp(_) => None,
        };
        Ok(Client { grpc: DlmClient::new(channel), framed })
    }

    /// This client, opening its sessions as gRPC streams even on a Unix
    /// socket (what other languages do; the framed protocol is the default
    /// there because it is faster).
    #[must_use]
    pub fn with_grpc_sessions(mut self) -> Client {
        self.framed = None;
        self
    }

    /// Opens a session.
    ///
    /// # Errors
    /// The agent refused it (too many sessions) or went away.
    pub async fn session(&self) -> Result<Session, ClientError> {
        match &self.framed {
            Some(path) => framed_session(path).await,
            None => self.grpc_session().await,
        }
    }

    async fn grpc_session(&self) -> Result<Session, ClientError> {
        let (requests, outbound) = mpsc::channel(SESSION_REQUESTS_MAX);
        let mut inbound = self.grpc.clone().session(ReceiverStream::new(outbound)).await?.into_inner();
        let id = match inbound.message().await? {
            Some(proto::ServerMessage { body: Some(server_message::Body::Welcome(welcome)) }) => welcome.session,
            _ => return Err(ClientError::SessionClosed),
        };
        let inner = Arc::new(SessionInner::new(id, Requests::Stream(requests)));
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
        Ok(Session { inner })
    }

    /// The agent's status.
    ///
    /// # Errors
    /// The call failed.
    pub async fn status(&self) -> Result<proto::StatusReply, ClientError> {
        Ok(self.grpc.clone().status(proto::StatusRequest {}).await?.into_inner())
    }

    /// The agent's lockspaces.
    ///
    /// # Errors
    /// The call failed.
    pub async fn lockspaces(&self) -> Result<proto::LockspacesReply, ClientError> {
        Ok(self.grpc.clone().lockspaces(proto::LockspacesRequest {}).await?.into_inner())
    }

    /// Resources of a lockspace with their queues.
    ///
    /// # Errors
    /// The call failed (unknown lockspace among others).
    pub async fn dump(&self, request: proto::DumpRequest) -> Result<proto::DumpReply, ClientError> {
        Ok(self.grpc.clone().dump(request).await?.into_inner())
    }

    /// Creates a lockspace (`lvb_len` 0: the default).
    ///
    /// # Errors
    /// The call failed (name in use, invalid length, …).
    pub async fn create_lockspace(&self, name: &str, lvb_len: u32) -> Result<(), ClientError> {
        self.grpc.clone().create_lockspace(proto::CreateLockspaceRequest { name: name.into(), lvb_len }).await?;
        Ok(())
    }
}

/// Requests a session queues unsent before `lock` and friends wait for room.
const SESSION_REQUESTS_MAX: usize = 256;

/// Opens a framed session on the Unix socket at `path`.
async fn framed_session(path: &Path) -> Result<Session, ClientError> {
    let unreachable = |source: std::io::Error| ClientError::Unreachable {
        target: format!("{:?}", Target::Unix(path.to_path_buf())),
        source: source.into(),
    };
    let mut stream = UnixStream::connect(path).await.map_err(unreachable)?;
    stream.write_all(&framing::PREFACE).await.map_err(unreachable)?;
    let (read_half, write_half) = stream.into_split();
    let mut reader = BufReader::with_capacity(framing::READ_BUFFER_LEN, read_half);
    let mut body = Vec::new();
    let id = match framing::read_frame::<proto::ServerMessage>(&mut reader, &mut body).await {
        Ok(Frame::Message(proto::ServerMessage { body: Some(server_message::Body::Welcome(welcome)) })) => {
            welcome.session
        }
        Ok(Frame::Message(proto::ServerMessage { body: Some(server_message::Body::Rejected(refused)) })) => {
            return Err(ClientError::Call(crate::convert::rejection_status(&refused.code, &refused.message)));
        }
        _ => return Err(ClientError::SessionClosed),
    };
    // The session holds the only handle: when it is dropped the write side
    // shuts down, and the agent ends the session.
    let inner = Arc::new(SessionInner::new(id, Requests::Framed(FrameSink::new(write_half))));
    let dispatcher = Arc::downgrade(&inner);
    tokio::spawn(async move {
        loop {
            let frame = framing::read_frame::<proto::ServerMessage>(&mut reader, &mut body).await;
            let Some(inner) = dispatcher.upgrade() else { break };
            match frame {
                Ok(Frame::Message(message)) => inner.dispatch(message),
                Ok(Frame::Ping) => {
                    if let Requests::Framed(sink) = &inner.requests {
                        let _ = sink.send_control(FrameKind::Pong);
                    }
                }
                Ok(Frame::Pong) => {}
                Err(_) => {
                    inner.close_waiters();
                    break;
                }
            }
        }
    });
    Ok(Session { inner })
}

/// The requests of a session waiting for their completion.
#[derive(Default)]
struct Waiters {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// The session's stream has ended: no answer will come.
    closed: bool,
}

/// Where a session's requests go.
enum Requests {
    /// The gRPC stream's queue.
    Stream(mpsc::Sender<proto::ClientMessage>),
    /// The framed connection, written from the requesting task itself.
    Framed(FrameSink),
}

enum Reply {
    Completion(proto::Completion),
    Rejected(proto::Rejected),
}

struct SessionInner {
    id: u64,
    requests: Requests,
    waiters: Mutex<Waiters>,
    events: broadcast::Sender<SessionEvent>,
    next_handle: AtomicU64,
}

impl SessionInner {
    fn new(id: u64, requests: Requests) -> SessionInner {
        SessionInner {
            id,
            requests,
            waiters: Mutex::new(Waiters::default()),
            events: broadcast::channel(1024).0,
            next_handle: AtomicU64::new(1),
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // A panic while the map is held cannot leave it inconsistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dispatch(&self, message: proto::ServerMessage) {
        match message.body {
            Some(server_message::Body::Completion(completion)) => {
                let waiter = self.waiters().pending.remove(&completion.handle);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(Reply::Completion(completion));
                    }
                    None if completion.status == proto::Status::Granted as i32
                        && completion.op == proto::Op::Lock as i32 =>
                    {
                        // Its requester gave up (the future was dropped) just
                        // before the grant: release it rather than hold it.
                        self.send(unlock_message(completion.handle, UnlockFlags::EMPTY, None));
                    }
                    None => {}
                }
            }
            Some(server_message::Body::Rejected(rejected)) => {
                if let Some(waiter) = self.waiters().pending.remove(&rejected.handle) {
                    let _ = waiter.send(Reply::Rejected(rejected));
                }
            }
            Some(server_message::Body::Blocking(blocking)) => {
                if let Ok(mode) = mode_from_wire(blocking.handle, blocking.mode) {
                    let _ = self.events.send(SessionEvent::Blocking { handle: blocking.handle, mode });
                }
            }
            Some(server_message::Body::Revoked(revoked)) => {
                let _ = self.events.send(SessionEvent::Revoked { handle: revoked.handle, reason: revoked.reason });
            }
            Some(server_message::Body::Welcome(_)) | None => {}
        }
    }

    /// Sends a request, waiting while too many are queued.
    async fn submit(&self, message: proto::ClientMessage) -> Result<(), ()> {
        match &self.requests {
            Requests::Stream(queue) => queue.send(message).await.map_err(drop),
            Requests::Framed(sink) => {
                sink.room(SESSION_REQUESTS_MAX).await;
                sink.send_message(&message).map_err(drop)
            }
        }
    }

    /// The session's stream ended: every waiting request, and every later
    /// one, fails with `SessionClosed`.
    fn close_waiters(&self) {
        let mut waiters = self.waiters();
        waiters.closed = true;
        waiters.pending.clear();
    }

    /// Sends without waiting; used from `Drop`, where nothing can be awaited.
    fn send(&self, message: proto::ClientMessage) {
        match &self.requests {
            Requests::Stream(queue) => {
                let _ = queue.try_send(message);
            }
            Requests::Framed(sink) => {
                let _ = sink.send_message(&message);
            }
        }
    }

    async fn request(&self, handle: u64, body: client_message::Body) -> Result<proto::Completion, LockError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut waiters = self.waiters();
            if waiters.closed {
                return Err(LockError::SessionClosed);
            }
            waiters.pending.insert(handle, reply);
        }
        if self.submit(proto::ClientMessage { body: Some(body) }).await.is_err() {
            self.waiters().pending.remove(&handle);
            return Err(LockError::SessionClosed);
        }
        // If this future is dropped while waiting, cancel the request.
        let mut cancel_on_drop = CancelOnDrop { inner: self, handle, armed: true };
        let reply = answer.await;
        cancel_on_drop.armed = false;
        match reply {
            Ok(Reply::Completion(completion)) => Ok(completion),
            Ok(Reply::Rejected(rejected)) => {
                Err(LockError::Rejected { code: rejected.code, message: rejected.message })
            }
            Err(_) => Err(LockError::SessionClosed),
        }
    }
}

struct CancelOnDrop<'a> {
    inner: &'a SessionInner,
    handle: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.waiters().pending.remove(&self.handle);
            self.inner.send(proto::ClientMessage {
                body: Some(client_message::Body::Cancel(proto::Cancel { handle: self.handle })),
            });
        }
    }
}

fn unlock_message(handle: u64, flags: UnlockFlags, lvb: Option<Vec<u8>>) -> proto::ClientMessage {
    proto::ClientMessage {
        body: Some(client_message::Body::Unlock(proto::Unlock { handle, flags: flags.bits(), lvb })),
    }
}

fn timeout_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
}

/// A client session. Cloning it shares the session.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl Session {
    /// The agent's id for this session.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Blocking callbacks and revocations for this session's locks.
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    /// Takes a lock, waiting until it is granted (or the options say otherwise).
    ///
    /// # Errors
    /// Not granted (try-lock failed, timed out, deadlock victim), refused, or
    /// the session closed.
    pub async fn lock(
        &self,
        lockspace: &str,
        name: impl Into<Vec<u8>>,
        mode: Mode,
        options: LockOptions,
    ) -> Result<LockGuard, LockError> {
        let handle = self.inner.next_handle.fetch_add(1, Ordering::Relaxed);
        let body = client_message::Body::Lock(proto::Lock {
            handle,
            lockspace: lockspace.into(),
            name: name.into(),
            mode: mode_to_wire(mode),
            flags: options.flags.bits(),
            timeout_ms: timeout_ms(options.timeout),
            traceparent: options.traceparent.unwrap_or_default(),
        });
        let completion = self.inner.request(handle, body).await?;
        if completion.status != proto::Status::Granted as i32 {
            return Err(LockError::NotGranted(
                proto::Status::try_from(completion.status).unwrap_or(proto::Status::Cancelled),
            ));
        }
        Ok(LockGuard::granted(self.inner.clone(), handle, &completion, mode))
    }
}

/// A granted lock. Dropping it unlocks it.
pub struct LockGuard {
    inner: Arc<SessionInner>,
    handle: u64,
    mode: Mode,
    token: u64,
    lvb: Option<Vec<u8>>,
    flags: StatusFlags,
    released: bool,
}

impl LockGuard {
    fn granted(inner: Arc<SessionInner>, handle: u64, completion: &proto::Completion, requested: Mode) -> LockGuard {
        LockGuard {
            inner,
            handle,
            mode: completion.mode.and_then(|m| mode_from_wire(handle, m).ok()).unwrap_or(requested),
            token: completion.fencing_token,
            lvb: completion.lvb.clone(),
            flags: status_flags(completion.status_flags),
            released: false,
        }
    }

    /// The session's handle for this lock.
    #[must_use]
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// The mode held.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The fencing token of the latest grant: strictly increasing per resource.
    #[must_use]
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The value block read at the latest grant (with `VALBLK`).
    #[must_use]
    pub fn lvb(&self) -> Option<&[u8]> {
        self.lvb.as_deref()
    }

    /// Status flags of the latest grant (`ALTMODE`, `VALNOTVALID`, `DEMOTED`).
    #[must_use]
    pub fn status_flags(&self) -> StatusFlags {
        self.flags
    }

    /// Converts the lock to `mode`; on failure the lock keeps its mode.
    ///
    /// # Errors
    /// As for [`Session::lock`].
    pub async fn convert(&mut self, mode: Mode, options: LockOptions, lvb: Option<Vec<u8>>) -> Result<(), LockError> {
        let body = client_message::Body::Convert(proto::Convert {
            handle: self.handle,
            mode: mode_to_wire(mode),
            flags: options.flags.bits(),
            lvb,
            timeout_ms: timeout_ms(options.timeout),
            traceparent: options.traceparent.unwrap_or_default(),
        });
        let completion = self.inner.request(self.handle, body).await?;
        if let Some(held) = completion.mode.and_then(|m| mode_from_wire(self.handle, m).ok()) {
            self.mode = held;
        }
        if completion.status != proto::Status::Granted as i32 {
            return Err(LockError::NotGranted(
                proto::Status::try_from(completion.status).unwrap_or(proto::Status::Cancelled),
            ));
        }
        self.token = completion.fencing_token;
        self.lvb = completion.lvb;
        self.flags = status_flags(completion.status_flags);
        Ok(())
    }

    /// Releases the lock and waits for the agent to confirm.
    ///
    /// # Errors
    /// The session closed first (the lock is released either way).
    pub async fn unlock(self) -> Result<(), LockError> {
        self.unlock_with(UnlockFlags::EMPTY, None).await
    }

    /// Releases the lock, writing `lvb` to the resource's value block (PW/EX holders).
    ///
    /// # Errors
    /// As for [`LockGuard::unlock`], or the value block is refused.
    pub async fn unlock_with_lvb(self, lvb: Vec<u8>) -> Result<(), LockError> {
        self.unlock_with(UnlockFlags::VALBLK, Some(lvb)).await
    }

    async fn unlock_with(mut self, flags: UnlockFlags, lvb: Option<Vec<u8>>) -> Result<(), LockError> {
        self.released = true;
        let body = client_message::Body::Unlock(proto::Unlock { handle: self.handle, flags: flags.bits(), lvb });
        self.inner.request(self.handle, body).await.map(|_| ())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            self.inner.send(unlock_message(self.handle, UnlockFlags::EMPTY, None));
        }
    }
}
