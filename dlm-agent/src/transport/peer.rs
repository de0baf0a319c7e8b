//! The peer transport: TCP between the agents of a cluster, carrying the
//! node's envelopes in the wire format of `dlm_core::cluster::wire`.
//!
//! Each agent dials every other member and sends on that connection only;
//! it receives on the connections the others dial to it. So one direction of
//! a pair is one connection, with one writer and one reader:
//!
//! ```text
//!  driver ──Vec<Envelope>──▶ dialer task (per peer) ──TCP──▶ peer's acceptor ──Command::Peer──▶ peer's driver
//! ```
//!
//! - **TLS** (below the hello, [`super::tls`]): mutual, against the
//!   cluster's CA. The dialer checks that the acceptor's certificate is
//!   valid for the member it dialled (`tls_name`); the acceptor, that the
//!   dialer's certificate names the member its hello claims to be. So a
//!   member's id cannot be claimed without its key. `insecure = true`
//!   leaves the links plain, and anyone who reaches the port can.
//! - **Handshake**: the dialer sends a hello (magic, protocol version,
//!   cluster name, node id, epoch); the acceptor checks every field against
//!   its own configuration and answers with its hello, or closes. Only then
//!   does the dialer tell its driver that the link is up.
//! - **One live connection per member and direction**: a newer incoming
//!   connection from a member, once its certificate has proven it is that
//!   member, replaces the older one (which is closed and counted as
//!   `replaced`). Messages of one member come on one connection at a time,
//!   so their sequence numbers are only ever the member's own.
//! - **Frames** are length-prefixed batches of envelopes, bounded by
//!   `FRAME_LEN_MAX`; anything malformed, and any envelope the node
//!   refuses, drops the connection. The node goes on serving its clients.
//! - **Back pressure**: the driver's queue to each dialer is bounded (in
//!   batches: what one driver pass has for the peer, or one resend); when it
//!   is full the link counts as down (requests that need the peer fail with
//!   "unavailable") and the connection is re-made.
//! - **Reconnection**: a dialer retries with a growing delay (up to 1 s);
//!   when the link is up again the node resends everything the peer has
//!   not acknowledged (the link layer drops what it already had).
//! - **Epochs and restarted peers** ([`PeerView`]): each hello carries the
//!   sender's epoch and incarnation, drawn when its process started. A peer
//!   in an older epoch than this node is refused until it takes the view
//!   (a restarted one, until its first). With membership from corosync a
//!   peer must come as the incarnation the current view names: a restarted
//!   one is let in once the view that took it back is here. With static
//!   membership a peer that comes back with another incarnation has lost
//!   its state and nothing can take it back: it is refused in both
//!   directions, so requests that need it fail as unavailable instead of
//!   being lost; restart the whole cluster.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dlm_core::cluster::wire::{self, Hello};
use dlm_core::cluster::{ClusterConfig, Envelope, NodeId};
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::bounds::{PEER_READ_BUFFER_LEN, PEER_WRITE_BATCHES_MAX};
use crate::codes::PeerReject;
use crate::command::{Command, DriverHandle, PeerSender};
use crate::config::ClusterSettings;
use crate::metrics::Metrics;
use crate::peer_view::PeerView;
use crate::transport::buffers;
use crate::transport::tls::Tls;

/// How long a connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a dial may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest pause between two dials.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// How peer connections are secured.
#[derive(Clone)]
pub enum PeerSecurity {
    /// Plain TCP (`[tls] insecure = true`): anyone who reaches the port
    /// and says the right hello is taken for a member.
    Insecure,
    /// Mutual TLS against the cluster's CA; each member's certificate must
    /// be valid for its name here (`tls_name`).
    Tls {
        /// The configurations.
        tls: Arc<Tls>,
        /// The name each member's certificate must carry.
        names: Arc<HashMap<NodeId, String>>,
    },
}

/// A connection, TLS or plain.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type Stream = Box<dyn Io>;

/// The live incoming connection of each member: a newer one from the same
/// member replaces it (one connection per member and direction).
#[derive(Default)]
struct Live {
    next: AtomicU64,
    by_member: Mutex<HashMap<NodeId, (u64, Arc<Notify>)>>,
}

impl Live {
    /// Makes this connection `from`'s live one; the one it replaces is told
    /// to close. Returns its number and what tells it to close.
    fn register(&self, from: NodeId) -> (u64, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        let mut live = self.by_member.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, previous)) = live.insert(from, (id, close.clone())) {
            previous.notify_one();
        }
        (id, close)
    }

    fn unregister(&self, from: NodeId, id: u64) {
        let mut live = self.by_member.lock().unwrap_or_else(PoisonError::into_inner);
        if live.get(&from).is_some_and(|(live_id, _)| *live_id == id) {
            live.remove(&from);
        }
    }
}

/// The dialer's end, until it is spawned.
pub struct Dialer {
    peer: NodeId,
    address: SocketAddr,
    queue: mpsc::Receiver<Vec<Envelope>>,
    reset: Arc<Notify>,
}

/// The peer transport's metrics.
#[derive(Clone)]
pub struct PeerMetrics {
    /// 1 while the link to a peer is up.
    pub up: IntGaugeVec,
    /// Bytes written to each peer.
    pub bytes_sent: IntCounterVec,
    /// Bytes read from each peer.
    pub bytes_received: IntCounterVec,
    /// Connections refused or dropped, by reason.
    pub rejected: IntCounterVec,
}

impl PeerMetrics {
    /// Creates the metrics and registers them.
    ///
    /// # Panics
    /// A metric name is registered twice (a bug).
    #[must_use]
    pub fn new(metrics: &Metrics, peers: &[NodeId]) -> PeerMetrics {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["peer"]).expect("valid metric");
        let counter = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        let m = PeerMetrics {
            up: gauge("dlm_cluster_peer_up", "1 while the link to the peer is up (connected and handshaken)"),
            bytes_sent: counter("dlm_cluster_peer_sent_bytes_total", "Bytes written to the peer", "peer"),
            bytes_received: counter("dlm_cluster_peer_received_bytes_total", "Bytes read from the peer", "peer"),
            rejected: counter(
                "dlm_cluster_peer_rejected_total",
                "Peer connections refused or dropped for breaking the protocol, by reason",
                "reason",
            ),
        };
        for peer in peers {
            let label = peer.0.to_string();
            m.up.with_label_values(&[&label]).set(0);
            m.bytes_sent.with_label_values(&[&label]);
            m.bytes_received.with_label_values(&[&label]);
        }
        for reason in PeerReject::ALL {
            m.rejected.with_label_values(&[reason.as_str()]);
        }
        metrics.register(Box::new(m.up.clone()));
        metrics.register(Box::new(m.bytes_sent.clone()));
        metrics.register(Box::new(m.bytes_received.clone()));
        metrics.register(Box::new(m.rejected.clone()));
        m
    }
}

/// The queues between the driver and one dialer per peer.
#[must_use]
pub fn channels(settings: &ClusterSettings) -> (HashMap<NodeId, PeerSender>, Vec<Dialer>) {
    let mut senders = HashMap::new();
    let mut dialers = Vec::new();
    for member in settings.members.iter().filter(|m| m.id != settings.node_id) {
        let (queue, receiver) = mpsc::channel(settings.peer_queue_max);
        let reset = Arc::new(Notify::new());
        let peer = NodeId(member.id);
        senders.insert(peer, PeerSender { queue, reset: reset.clone() });
        dialers.push(Dialer { peer, address: member.address, queue: receiver, reset });
    }
    (senders, dialers)
}

/// What the dialers and the acceptor share.
#[derive(Clone)]
pub struct PeerContext {
    /// The cluster's configuration (hello checks).
    pub cluster: Arc<ClusterConfig>,
    /// Where envelopes and link changes go.
    pub driver: DriverHandle,
    /// The transport's metrics.
    pub metrics: PeerMetrics,
    /// What the views say of each member's incarnation.
    pub view: Arc<PeerView>,
    /// TLS or not.
    pub security: PeerSecurity,
}

/// Starts the dialers and the acceptor; they stop with the runtime.
pub fn spawn(context: PeerContext, listener: TcpListener, dialers: Vec<Dialer>) {
    for dialer in dialers {
        tokio::spawn(dial(context.clone(), dialer));
    }
    tokio::spawn(accept(context, listener));
}

async fn dial(context: PeerContext, mut dialer: Dialer) {
    let PeerContext { cluster, driver, metrics, view, security } = context;
    let label = dialer.peer.0.to_string();
    let mut pause = Duration::from_millis(20);
    loop {
        // Whatever was queued while down is resent by the node when the
        // link comes up: drop it here rather than send it twice.
        while dialer.queue.try_recv().is_ok() {}
        let stream = match connect(&cluster, &dialer, &view, &security).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(peer = dialer.peer.0, address = %dialer.address, %error, "peer not reachable");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
                continue;
            }
        };
        pause = Duration::from_millis(20);
        tracing::info!(peer = dialer.peer.0, address = %dialer.address, "peer link up");
        metrics.up.with_label_values(&[&label]).set(1);
        if driver.send(Command::Link { peer: dialer.peer, up: true }).await.is_err() {
            return;
        }
        let error = write_frames(stream, &mut dialer, &metrics.bytes_sent.with_label_values(&[&label])).await;
        tracing::warn!(peer = dialer.peer.0, %error, "peer link down");
        metrics.up.with_label_values(&[&label]).set(0);
        if driver.send(Command::Link { peer: dialer.peer, up: false }).await.is_err() {
            return;
        }
    }
}

async fn connect(
    cluster: &ClusterConfig,
    dialer: &Dialer,
    view: &PeerView,
    security: &PeerSecurity,
) -> Result<Stream, String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, buffers::connect(dialer.address))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut stream: Stream = match security {
        PeerSecurity::Insecure => Box::new(tcp),
        PeerSecurity::Tls { tls, names } => {
            let name = names.get(&dialer.peer).ok_or("the peer has no certificate name")?;
            let name = ServerName::try_from(name.clone()).map_err(|e| format!("tls_name {name:?}: {e}"))?;
            let handshake = tls.peer_connector().connect(name, tcp);
            let tls = tokio::time::timeout(HELLO_TIMEOUT, handshake)
                .await
                .map_err(|_| "no TLS handshake in time".to_string())?
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(tls)
        }
    };
    stream.write_all(&wire::encode_hello(&cluster.hello(view.epoch(), view.own()))).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream))
        .await
        .map_err(|_| "no hello in time".to_string())??;
    if let Err(refusal) = cluster.check_hello(&answer, Some(dialer.peer), view.epoch()) {
        return Err(format!("unexpected hello from {} ({refusal}): {answer:?}", dialer.address));
    }
    if !view.accept(dialer.peer, answer.incarnation) {
        return Err("the peer is not the incarnation of this node's view (restarted, or a view not taken yet)".into());
    }
    Ok(stream)
}

async fn write_frames(stream: Stream, dialer: &mut Dialer, sent: &prometheus::IntCounter) -> String {
    // The acceptor never writes after its hello: a read that returns means
    // the peer closed the connection (or went away), which a write alone
    // would only notice after losing what it wrote.
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut batch = Vec::with_capacity(PEER_WRITE_BATCHES_MAX);
    let mut bytes = Vec::new();
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            count = dialer.queue.recv_many(&mut batch, PEER_WRITE_BATCHES_MAX) => {
                if count == 0 {
                    return "the driver stopped".into();
                }
            }
            () = dialer.reset.notified() => return "reset by the driver (queue full, or messages unacknowledged)".into(),
            read = reader.read(&mut scratch) => {
                return match read {
                    Ok(0) => "the peer closed the connection".into(),
                    Ok(_) => "the peer wrote after its hello".into(),
                    Err(error) => error.to_string(),
                };
            }
        }
        bytes.clear();
        for envelopes in batch.drain(..) {
            wire::encode_frames(&envelopes, &mut bytes);
        }
        if let Err(error) = writer.write_all(&bytes).await {
            return error.to_string();
        }
        // TLS may keep the last record until flushed.
        if let Err(error) = writer.flush().await {
            return error.to_string();
        }
        sent.inc_by(bytes.len() as u64);
    }
}

async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Hello, String> {
    let mut prefix = [0u8; 7];
    stream.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
    let len = wire::hello_len(&prefix).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; len];
    bytes[..7].copy_from_slice(&prefix);
    stream.read_exact(&mut bytes[7..]).await.map_err(|e| e.to_string())?;
    wire::decode_hello(&bytes).map_err(|e| e.to_string())
}

async fn accept(context: PeerContext, listener: TcpListener) {
    // Every member may have a connection and one being re-made; more than
    // that is someone else's doing.
    let slots = Arc::new(Semaphore::new(context.cluster.membership.members().len() * 2 + 2));
    let live = Arc::new(Live::default());
    loop {
        let Ok((stream, address)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%address, "too many peer connections; refusing one");
            continue;
        };
        let (context, live) = (context.clone(), live.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(reason) = serve_peer(&context, stream, &live).await {
                tracing::warn!(%address, reason = reason.as_str(), "peer connection dropped");
                context.metrics.rejected.with_label_values(&[reason.as_str()]).inc();
            }
        });
    }
}

/// The TLS handshake of an incoming connection, if TLS is on: the
/// connection, and the certificate the peer proved it holds.
async fn accept_tls(
    security: &PeerSecurity,
    stream: TcpStream,
) -> Result<(Stream, Option<CertificateDer<'static>>), PeerReject> {
    match security {
        PeerSecurity::Insecure => Ok((Box::new(stream), None)),
        PeerSecurity::Tls { tls, .. } => {
            let tls = tokio::time::timeout(HELLO_TIMEOUT, tls.peer_acceptor().accept(stream))
                .await
                .map_err(|_| PeerReject::Tls)?
                .map_err(|_| PeerReject::Tls)?;
            let certificate = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
            // The verifier requires one; without it the handshake failed.
            let certificate = certificate.ok_or(PeerReject::Tls)?;
            Ok((Box::new(tls), Some(certificate)))
        }
    }
}

/// Serves one incoming connection until it closes; the reason it was dropped, if dropped.
async fn serve_peer(context: &PeerContext, stream: TcpStream, live: &Live) -> Result<(), PeerReject> {
    let PeerContext { cluster, driver, metrics, view, security } = context;
    let _ = stream.set_nodelay(true);
    let (mut stream, certificate) = accept_tls(security, stream).await?;
    let hello_in = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream))
        .await
        .map_err(|_| PeerReject::BadHello)?
        .map_err(|_| PeerReject::BadHello)?;
    let from = cluster.check_hello(&hello_in, None, view.epoch()).map_err(PeerReject::from)?;
    if let (PeerSecurity::Tls { names, .. }, Some(certificate)) = (security, &certificate) {
        let named = names.get(&from).is_some_and(|name| crate::access::names(certificate, name));
        if !named {
            return Err(PeerReject::WrongCertificate);
        }
    }
    if !view.accept(from, hello_in.incarnation) {
        return Err(PeerReject::RestartedPeer);
    }
    stream
        .write_all(&wire::encode_hello(&cluster.hello(view.epoch(), view.own())))
        .await
        .map_err(|_| PeerReject::BadHello)?;
    stream.flush().await.map_err(|_| PeerReject::BadHello)?;
    let (id, replaced) = live.register(from);
    let served = read_frames(stream, from, driver, metrics, &replaced).await;
    live.unregister(from, id);
    served
}

/// Hands what `from` sends to the driver until the connection closes, the
/// driver refuses an envelope, or a newer connection replaces this one.
async fn read_frames(
    stream: Stream,
    from: NodeId,
    driver: &DriverHandle,
    metrics: &PeerMetrics,
    replaced: &Notify,
) -> Result<(), PeerReject> {
    let received = metrics.bytes_received.with_label_values(&[&from.0.to_string()]);
    let refused = Arc::new(Notify::new());
    // Buffered: a frame's length and body usually come in one read.
    let mut stream = tokio::io::BufReader::with_capacity(PEER_READ_BUFFER_LEN, stream);
    loop {
        let mut prefix = [0u8; 4];
        tokio::select! {
            read = stream.read_exact(&mut prefix) => if read.is_err() { return Ok(()) },
            () = refused.notified() => return Err(PeerReject::Protocol),
            () = replaced.notified() => return Err(PeerReject::Replaced),
        }
        let len = wire::frame_len(prefix).map_err(|_| PeerReject::BadFrame)?;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.map_err(|_| PeerReject::BadFrame)?;
        received.inc_by(4 + len as u64);
        let envelopes = wire::decode_frame(&body).map_err(|_| PeerReject::BadFrame)?;
        if driver.send(Command::Peer { from, envelopes, refused: refused.clone() }).await.is_err() {
            return Ok(());
        }
    }
}
