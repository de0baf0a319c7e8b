//! The framed transport on the agent's Unix socket: tells gRPC connections
//! from framed sessions ([`crate::framing`]) by their first byte, hands the
//! first to tonic and serves the second here.
//!
//! ```text
//!  accept ─admission─first byte──▶ 'P' ─▶ HTTP/2 preface + SETTINGS ─▶ tonic (gRPC: sessions, admin calls)
//!                              └──▶ else ─▶ framed preface ─▶ reader (this task) ──Command::Client──▶ driver
//!                                             socket ◀── FrameSink (written by the driver) ◀────┘
//! ```
//!
//! A new connection is admitted only while the client's uid holds less
//! than its share of connections and of handshake slots
//! ([`super::admission`]); it must send its first bytes within the
//! handshake timeout or it is closed.
//!
//! A framed session is one connection. Its reader (this task) hands
//! messages to the driver and answers pings; the driver writes the
//! session's messages itself through a [`FrameSink`], all that one pass has
//! for the session in one write. When the client goes away (the socket
//! closes, a frame breaks the format, or it stays silent past two
//! keepalives) the session is closed; when the driver ends it (slow reader,
//! shutdown) what was queued is still sent, for at most
//! [`framing::DRAIN_TIMEOUT`] without progress.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::admission::{Admission, Key, Refused, Ticket, Turns};
use super::authority::AuthorityFixed;
use super::preface::{Replayed, read_http2_start};
use super::refuse;

use crate::bounds::{SHUTDOWN_ANSWER_TIMEOUT, SHUTDOWN_DRAIN_TIMEOUT};
use crate::codes::RejectCode;
use crate::command::{Command, Credentials, DriverHandle, OpenError, OpenSession, SessionOutput};
use crate::convert;
use crate::framing::{self, Frame, FrameKind, FrameSink};
use crate::proto;

/// What a framed session needs to know of the agent.
#[derive(Clone, Debug)]
pub struct FramedSettings {
    /// The node name, for the `Welcome`.
    pub node: String,
    /// Messages queued to a session at most (`session_queue_max`).
    pub session_queue_max: usize,
    /// A silent client is pinged after this long, and dropped after twice it.
    pub keepalive: Duration,
    /// Which connections are let in, and how long they have to say which
    /// protocol they speak.
    pub admission: Admission,
    /// `dlm_session_rings`: sessions through rings now.
    pub ring_sessions: prometheus::IntGauge,
    /// `dlm_session_rings_declined_total`, by reason.
    pub rings_declined: prometheus::IntCounterVec,
}

/// Gives tonic its connections.
pub type GrpcIncoming = ReceiverStream<io::Result<Replayed<AuthorityFixed<UnixStream>>>>;

/// Accepts on `listener` until `stop` completes, serving framed sessions
/// itself; returns the gRPC connections for tonic, and the task, which ends
/// once the framed connections have drained (or after a bound).
pub fn spawn(
    listener: UnixListener,
    driver: DriverHandle,
    settings: FramedSettings,
    stop: impl Future<Output = ()> + Send + 'static,
) -> (GrpcIncoming, tokio::task::JoinHandle<()>) {
    let (grpc, incoming) = mpsc::channel(64);
    let settings = Arc::new(settings);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let refusing_stopped = async move {
        let mut stop_rx = stop_rx;
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    let (refusing, refusing_task) = refuse::spawn_grpc(refusing_stopped);
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        let mut turns = Turns::default();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(error) => {
                            // Out of descriptors, mostly: wait rather than spin.
                            tracing::warn!(%error, "accepting on the unix socket failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    turns.taken().await;
                    let key = stream.peer_cred().map_or(Key::Unknown, |c| Key::Uid(c.uid()));
                    let (open, handshake) = match settings.admission.admit(key) {
                        Ok(tickets) => tickets,
                        Err(mut refused) => {
                            if let Some(answer) = refused.answer.take() {
                                connections.spawn(answer_refused(stream, refused, answer, refusing.clone()));
                            }
                            continue;
                        }
                    };
                    let (grpc, driver, settings) = (grpc.clone(), driver.clone(), settings.clone());
                    connections.spawn(async move {
                        let classified = classify(stream, settings.admission.handshake_timeout).await;
                        drop(handshake);
                        match classified {
                            Some(Protocol::Grpc(start, stream)) => {
                                let stream = AuthorityFixed::new(stream);
                                let _ = grpc.send(Ok(Replayed::new(start, stream, open))).await;
                            }
                            Some(Protocol::Framed(stream)) => serve(stream, false, &driver, &settings, open).await,
                            Some(Protocol::Ring(stream)) => serve(stream, true, &driver, &settings, open).await,
                            None => {}
                        }
                    });
                }
            }
        }
        drop(grpc);
        let _ = stop_tx.send(true);
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!("framed sessions still open at shutdown; closing them");
        }
        let _ = refusing_task.await;
    });
    (ReceiverStream::new(incoming), task)
}

/// Tells a connection refused by a quota why, in its own protocol (see
/// [`refuse`]).
async fn answer_refused(
    stream: UnixStream,
    refused: Refused,
    answer: Ticket,
    refusing: mpsc::Sender<io::Result<refuse::RefusedGrpc>>,
) {
    match classify(stream, refuse::ANSWER_LIFETIME).await {
        Some(Protocol::Framed(stream)) => {
            if let Ok((_read, write)) = framing::split(stream) {
                refuse::answer_framed(write, &refused).await;
            }
        }
        // Asked for rings: told to stay on the socket, and why it is refused there.
        Some(Protocol::Ring(stream)) => {
            if let Ok((_read, write)) = framing::split_offering_ring(stream, false) {
                refuse::answer_framed(write, &refused).await;
            }
        }
        Some(Protocol::Grpc(start, stream)) => {
            let stream = Replayed::new(start, AuthorityFixed::new(stream), answer);
            let _ = refusing.send(Ok(refuse::Expiring::new(stream, &refused.message))).await;
        }
        None => {}
    }
}

enum Protocol {
    /// gRPC, with the bytes already read (the HTTP/2 preface and SETTINGS).
    Grpc(Vec<u8>, UnixStream),
    Framed(UnixStream),
    /// A framed session that asks for shared-memory rings.
    Ring(UnixStream),
}

/// What [`classify`] returns for a framed session that asks for rings (an
/// HTTP/2 start is never this short).
const RING_MARK: [u8; 1] = [0];

/// Reads the first bytes, within `deadline`: an HTTP/2 client's preface and
/// SETTINGS, or a framed session's preface.
async fn classify(mut stream: UnixStream, deadline: Duration) -> Option<Protocol> {
    let read = async {
        let first = stream.read_u8().await?;
        if first == framing::HTTP2_FIRST_BYTE {
            return read_http2_start(&mut stream, first).await.map(Some);
        }
        let mut preface = [first; framing::PREFACE.len()];
        stream.read_exact(&mut preface[1..]).await?;
        Ok::<_, io::Error>(match preface {
            framing::PREFACE => Some(Vec::new()),
            framing::RING_PREFACE => Some(RING_MARK.to_vec()),
            _ => None,
        })
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(Some(start))) if start.is_empty() => Some(Protocol::Framed(stream)),
        Ok(Ok(Some(start))) if start == RING_MARK => Some(Protocol::Ring(stream)),
        Ok(Ok(Some(start))) => Some(Protocol::Grpc(start, stream)),
        Ok(Ok(None)) => {
            tracing::debug!("connection with an unknown preface closed");
            None
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "connection closed before its preface");
            None
        }
        Err(_) => {
            tracing::debug!("connection silent past the handshake timeout closed");
            None
        }
    }
}

/// Serves one framed session until it ends.
async fn serve(stream: UnixStream, rings: bool, driver: &DriverHandle, settings: &FramedSettings, _open: Ticket) {
    let credentials = stream.peer_cred().map(Credentials::of).unwrap_or_default();
    // Held for as long as the session: the descriptors its rings take.
    let mut ring_ticket = None;
    let halves = if rings {
        let key = credentials.uid().map_or(Key::Unknown, Key::Uid);
        ring_ticket = settings.admission.rings.admit(key).ok();
        framing::split_offering_ring(stream, ring_ticket.is_some())
    } else {
        framing::split(stream)
    };
    let (read_half, write_half) = match halves {
        Ok(halves) => halves,
        Err(error) => {
            tracing::warn!(%error, "a framed connection could not be registered; closed");
            return;
        }
    };
    let _on_rings = rings.then(|| RingsCounted::new(read_half.through_ring(), ring_ticket, settings));
    // Looked at by a spinning worker (see `crate::spin`) while it lives.
    let _watched = read_half.ring_watch().map(|watch| crate::spin::RINGS.add(watch));
    // Dropped with the last handle (the driver's, this task's): the write
    // side then shuts down, once what was queued is written.
    let sink = FrameSink::new(write_half);
    let output = SessionOutput::Framed(sink.clone());
    let OpenSession { session, ended } = match driver.open_session(credentials, &settings.node, output).await {
        Ok(open) => open,
        Err(error) => {
            let (code, message) = match error {
                OpenError::Stopped => (RejectCode::ShuttingDown, error.to_string()),
                OpenError::Refused(rejection) => (rejection.code, rejection.message),
            };
            let refusal = proto::ServerMessage {
                body: Some(proto::server_message::Body::Rejected(proto::Rejected {
                    handle: 0,
                    code: code.as_str().into(),
                    message,
                })),
            };
            let _ = sink.send_message(&refusal);
            return;
        }
    };
    if read_frames(read_half, session, driver, &sink, settings, ended).await {
        // Ended by the driver (shutdown, slow reader): what it queued goes
        // out before this connection counts as drained, within a bound.
        let _ = tokio::time::timeout(framing::DRAIN_TIMEOUT, sink.room(0)).await;
    } else {
        let _ = driver.send(Command::Close { session }).await;
    }
}

/// A session that asked for rings, counted in `dlm_session_rings` while it
/// has them (with their ticket), or once in
/// `dlm_session_rings_declined_total` if it was kept on its socket.
struct RingsCounted {
    /// The gauge to lower at the end, and the rings' ticket.
    on_rings: Option<(prometheus::IntGauge, Ticket)>,
}

impl RingsCounted {
    fn new(through_ring: bool, ticket: Option<Ticket>, settings: &FramedSettings) -> RingsCounted {
        match ticket {
            Some(ticket) if through_ring => {
                settings.ring_sessions.inc();
                RingsCounted { on_rings: Some((settings.ring_sessions.clone(), ticket)) }
            }
            Some(_) => {
                settings.rings_declined.with_label_values(&["unavailable"]).inc();
                RingsCounted { on_rings: None }
            }
            None => {
                settings.rings_declined.with_label_values(&["ring_sessions_max"]).inc();
                RingsCounted { on_rings: None }
            }
        }
    }
}

impl Drop for RingsCounted {
    fn drop(&mut self) {
        if let Some((gauge, _ticket)) = &self.on_rings {
            gauge.dec();
        }
    }
}

/// Reads the client's frames until it goes away (false) or the driver ends
/// the session (true).
async fn read_frames(
    read_half: framing::FramedRead,
    session: dlm_core::SessionId,
    driver: &DriverHandle,
    sink: &FrameSink,
    settings: &FramedSettings,
    mut ended: oneshot::Receiver<()>,
) -> bool {
    let keepalive = settings.keepalive;
    let mut reader = BufReader::with_capacity(framing::READ_BUFFER_LEN, read_half);
    let mut body = Vec::new();
    // When the client has been silent for `keepalive`: moved by every frame.
    let mut deadline = Instant::now() + keepalive;
    // One timer for the session, set only when it fires before `deadline`
    // (or `closing`): setting a timer per frame costs two trips through the
    // runtime's timer wheel per request.
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let mut pinged = false;
    // Set when the agent stops: what the client still sends is answered
    // (refused as shutting_down) until it closes, or until this deadline.
    let mut closing: Option<Instant> = None;
    // Pings and pongs count against the frames a client may leave unread,
    // so a client that pings without reading cannot grow the agent's memory.
    let control = |kind| sink.send_control(kind).is_ok() && sink.frames_waiting() <= settings.session_queue_max;
    loop {
        // The read is not cancel-safe (a frame half read would be lost), so
        // the keepalive timer runs beside it instead of cancelling it.
        let read = framing::read_frame::<proto::ClientMessage>(&mut reader, &mut body);
        tokio::pin!(read);
        let frame = loop {
            tokio::select! {
                biased;
                frame = &mut read => break frame,
                _ = &mut ended, if closing.is_none() => {
                    // Ended by the driver: a slow reader is let go at once; at
                    // shutdown, requests already on their way get an answer.
                    if !driver.is_stopped() {
                        return true;
                    }
                    let until = Instant::now() + SHUTDOWN_ANSWER_TIMEOUT;
                    closing = Some(until);
                    timer.as_mut().reset(until);
                }
                () = &mut timer => {
                    let due = closing.unwrap_or(deadline);
                    if Instant::now() < due {
                        timer.as_mut().reset(due);
                        continue;
                    }
                    if closing.is_some() {
                        return true;
                    }
                    if pinged {
                        tracing::debug!(session = session.0, "framed session silent past its keepalive");
                        return false;
                    }
                    pinged = true;
                    if !control(FrameKind::Ping) {
                        return false;
                    }
                    deadline = Instant::now() + keepalive;
                    timer.as_mut().reset(deadline);
                }
            }
        };
        deadline = Instant::now() + keepalive;
        pinged = false;
        match frame {
            Ok(Frame::Message(message)) => {
                let handle = convert::handle_of(&message);
                if closing.is_none() && driver.send(Command::Client { session, message }).await.is_err() {
                    // The driver stopped between two messages: this one,
                    // and any after it, are answered here.
                    let until = Instant::now() + SHUTDOWN_ANSWER_TIMEOUT;
                    closing = Some(until);
                    timer.as_mut().reset(until);
                }
                if closing.is_some() && sink.send_message(&convert::shutting_down(handle)).is_err() {
                    return true;
                }
            }
            Ok(Frame::Ping) => {
                if !control(FrameKind::Pong) {
                    tracing::debug!(session = session.0, "framed client pings without reading; ending its session");
                    return false;
                }
            }
            Ok(Frame::Pong) => {}
            Err(error) => {
                tracing::debug!(session = session.0, %error, "framed session ended");
                return closing.is_some();
            }
        }
    }
}
