//! A session's side of the client: its requests waiting for their
//! answers, the events the agent sends it, and the guards of its locks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dlm_core::{Mode, StatusFlags, UnlockFlags};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::incoming::Incoming;
use super::spin::AnswerDue;
use super::{LockError, LockOptions, Loss, SESSION_REQUESTS_MAX, SessionEvent};
use dlm_proto::convert::{mode_from_wire, mode_to_wire, status_flags};
use dlm_proto::framing::{FrameKind, FrameSink};
use dlm_proto::proto::{self, client_message, server_message};

/// The requests of a session waiting for their completion.
#[derive(Default)]
struct Waiters {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// The session's stream has ended: no answer will come.
    closed: bool,
}

/// Where a session's requests go.
pub(super) enum Requests {
    /// The gRPC stream's queue.
    Stream(mpsc::Sender<proto::ClientMessage>),
    /// The framed connection, written from the requesting task itself.
    Framed(FrameSink),
}

/// What the session has lost, watched by its locks' guards: a holder is
/// told at once, on the session's own reader, whatever it is doing.
#[derive(Default)]
struct Losses {
    /// The session's stream ended (the agent closed it, exited or was
    /// killed): every lock of the session is gone.
    ended: bool,
    /// Locks granted whose guard is alive; only these can be revoked, so
    /// `revoked` stays as small as the locks held.
    held: HashSet<u64>,
    /// Locks the agent revoked, with why.
    revoked: HashMap<u64, String>,
}

impl Losses {
    fn of(&self, handle: u64) -> Option<Loss> {
        if let Some(reason) = self.revoked.get(&handle) {
            return Some(Loss::Revoked { reason: reason.clone() });
        }
        self.ended.then_some(Loss::SessionEnded)
    }
}

pub(crate) enum Reply {
    Completion(proto::Completion),
    Rejected(proto::Rejected),
}

pub(super) struct SessionInner {
    id: u64,
    requests: Requests,
    waiters: Mutex<Waiters>,
    events: broadcast::Sender<SessionEvent>,
    losses: watch::Sender<Losses>,
    next_handle: AtomicU64,
    /// Whether answers are due, for the reader's spin (framed sessions).
    answer_due: Arc<AnswerDue>,
    /// A framed session's frames, read by its requesters while they wait
    /// (gRPC sessions: none, their stream's task reads).
    incoming: Option<Arc<Incoming>>,
}

impl SessionInner {
    pub(super) fn new(
        id: u64,
        requests: Requests,
        answer_due: Arc<AnswerDue>,
        incoming: Option<Arc<Incoming>>,
    ) -> SessionInner {
        SessionInner {
            id,
            requests,
            answer_due,
            incoming,
            waiters: Mutex::new(Waiters::default()),
            events: broadcast::channel(1024).0,
            losses: watch::Sender::new(Losses::default()),
            next_handle: AtomicU64::new(1),
        }
    }

    /// Takes the waiter of `handle`'s request, if it still waits.
    fn take_waiter(&self, handle: u64) -> Option<oneshot::Sender<Reply>> {
        let mut waiters = self.waiters();
        let waiter = waiters.pending.remove(&handle);
        self.answer_due.set_due(waiters.pending.len());
        waiter
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // A panic while the map is held cannot leave it inconsistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn dispatch(&self, message: proto::ServerMessage) {
        match message.body {
            Some(server_message::Body::Completion(completion)) => {
                let waiter = self.take_waiter(completion.handle);
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
                if let Some(waiter) = self.take_waiter(rejected.handle) {
                    let _ = waiter.send(Reply::Rejected(rejected));
                }
            }
            Some(server_message::Body::Blocking(blocking)) => {
                if let Ok(mode) = mode_from_wire(blocking.handle, blocking.mode) {
                    let _ = self.events.send(SessionEvent::Blocking { handle: blocking.handle, mode });
                }
            }
            Some(server_message::Body::Revoked(revoked)) => {
                self.losses.send_if_modified(|losses| {
                    losses.held.contains(&revoked.handle)
                        && losses.revoked.insert(revoked.handle, revoked.reason.clone()).is_none()
                });
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
    pub(super) fn close_waiters(&self) {
        let mut waiters = self.waiters();
        waiters.closed = true;
        waiters.pending.clear();
        self.answer_due.set_due(0);
        drop(waiters);
        self.losses.send_if_modified(|losses| !std::mem::replace(&mut losses.ended, true));
    }

    /// Answers the agent's ping (framed sessions; gRPC pings itself).
    pub(super) fn pong(&self) {
        if let Requests::Framed(sink) = &self.requests {
            let _ = sink.send_control(FrameKind::Pong);
        }
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
        // An unlock is answered without waiting for another holder.
        self.answer_due.expect_soon(matches!(body, client_message::Body::Unlock(_)));
        {
            let mut waiters = self.waiters();
            if waiters.closed {
                return Err(LockError::SessionClosed);
            }
            waiters.pending.insert(handle, reply);
            self.answer_due.set_due(waiters.pending.len());
        }
        if self.submit(proto::ClientMessage { body: Some(body) }).await.is_err() {
            self.take_waiter(handle);
            return Err(LockError::SessionClosed);
        }
        self.answer_due.sent();
        // If this future is dropped while waiting, cancel the request.
        let mut cancel_on_drop = CancelOnDrop { inner: self, handle, armed: true };
        let reply = match &self.incoming {
            Some(incoming) => incoming.wait(self, answer, self.answer_due.would_spin()).await,
            None => answer.await.map_err(drop),
        };
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
            self.inner.take_waiter(self.handle);
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
    pub(super) fn new(inner: Arc<SessionInner>) -> Session {
        Session { inner }
    }

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
        // A lock newly held is no loss: no one watching is woken (a
        // notification wakes every guard's `lost`, and costs a lock per
        // shard of the watch's waiters, on every grant).
        inner.losses.send_if_modified(|losses| {
            losses.held.insert(handle);
            false
        });
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

    /// Whether the lock is still held, as far as this client knows: false
    /// once the agent revoked it or the session ended (the agent exited or
    /// was killed, and the lock may already be someone else's).
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.inner.losses.borrow().of(self.handle).is_none()
    }

    /// Waits until the lock is lost, and says how: the agent revoked it, or
    /// the session ended. It never completes for a lock that stays held;
    /// select it against the work done under the lock, and stop that work
    /// when it completes.
    pub async fn lost(&self) -> Loss {
        let mut losses = self.inner.losses.subscribe();
        loop {
            if let Some(loss) = losses.borrow_and_update().of(self.handle) {
                return loss;
            }
            if losses.changed().await.is_err() {
                // The session's state is gone with the session itself.
                return Loss::SessionEnded;
            }
        }
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
        self.inner.losses.send_if_modified(|losses| {
            losses.held.remove(&self.handle);
            losses.revoked.remove(&self.handle).is_some()
        });
        if !self.released {
            self.inner.send(unlock_message(self.handle, UnlockFlags::EMPTY, None));
        }
    }
}
