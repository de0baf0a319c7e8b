//! `dlm-agent run`: binds the sockets, starts the eBPF programs, the driver
//! and the transports, serves until told to stop, then stops in order:
//! answer clients, close streams, exit. The one module that wires the
//! others together; nothing imports it.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use crate::access::Access;
use crate::bounds::{
    ANSWERING_MAX, ANSWERING_PER_CLIENT_MAX, CALL_STREAMS_MAX, CLIENT_MESSAGE_LEN_MAX, FENCE_ACKS_QUEUED_MAX,
    HANDSHAKES_MAX, HANDSHAKES_PER_CLIENT_MAX, SHUTDOWN_DRAIN_TIMEOUT,
};
use crate::clock::Clock;
use crate::command::{Command, DriverHandle};
use crate::config::{Config, MembershipSource, TlsSettings};
use crate::driver;
use crate::generation;
use crate::lease::Lease;
use crate::membership::{self, Watchdog};
use crate::metrics::Metrics;
use crate::peer_view::PeerView;
use crate::proto::dlm_server::DlmServer;
use crate::resident::{self, ResidentMetrics, ResidentState};
use crate::transport::admission::{Admission, Quota};
use crate::transport::tls::{self, Tls};
use crate::transport::{buffers, framed, grpc::DlmService, http, peer, tcp};

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another agent answers on the socket.
    #[error("another agent is already listening on {0}")]
    AlreadyRunning(String),
    /// A socket could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// Which socket.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration was refused by the lock engine.
    #[error("{0}")]
    Config(String),
    /// The state directory could not be used.
    #[error("state: {0}")]
    State(String),
    /// The TLS files could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// `[memory] resident = "required"` and the memory could not be locked.
    #[error("memory cannot be kept resident ([memory] resident = \"required\"): {0}")]
    Resident(String),
    /// The gRPC server failed.
    #[error("serving clients failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The Unix socket's file, removed when dropped.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the Unix socket, removing a stale file left by a dead agent but
/// refusing to take over from a live one.
async fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_error = |source| ServeError::Bind { what: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_error)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::AlreadyRunning(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    // Any local user may connect: the agent knows who they are from the
    // socket, and the access policy says what each may do.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_error)?;
    Ok(listener)
}

/// Reads the TLS files again on each SIGHUP: new connections get the new
/// certificates, connections already made keep theirs. Without TLS a
/// SIGHUP is logged and ignored (it must not stop the agent).
async fn reload_on_hangup(tls: Option<&Tls>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the TLS files are read only at start");
        return std::future::pending().await;
    };
    while hangups.recv().await.is_some() {
        match tls.map(Tls::reload) {
            None => tracing::info!("SIGHUP: no TLS files to reload"),
            Some(Ok(())) => tracing::info!("SIGHUP: TLS certificates reloaded"),
            Some(Err(error)) => tracing::error!(%error, "SIGHUP: TLS reload failed; the certificates in use stay"),
        }
    }
    std::future::pending().await
}

/// Runs the agent until `shutdown` completes, in named steps: keep the
/// memory resident, bind every listener, load TLS, start the driver, start
/// the cluster parts, spawn the client servers, then stop in order.
///
/// # Errors
/// A socket cannot be bound, another agent runs, or serving fails.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(&config.node));
    // First, so that everything the agent maps from here on is locked too.
    keep_resident(&config, &metrics)?;
    let listeners = Listeners::bind(&config).await?;
    let tls = load_tls(&config, &metrics)?;
    let ebpf = crate::ebpf::agent::start(&config);
    metrics.register(Box::new(ebpf.metrics));
    // Held until the agent stops: dropping it stops the map reader.
    let _ebpf_reader = ebpf.reader;
    let (started, handover) = start_driver(&config, &metrics, ebpf.attribution)?;
    let watchdog = match listeners.peer {
        Some(listener) => start_cluster(&config, &metrics, &started.driver, handover, tls.clone(), listener).await?,
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let servers =
        ClientServers { config: &config, metrics: &metrics, driver: &started.driver, access: &started.access };
    let tasks = servers.spawn(listeners.unix, listeners.tcp, listeners.http, tls, &stop_rx);
    tracing::info!(
        node = %config.node,
        socket = %config.socket.display(),
        tcp = ?config.tcp,
        http = ?config.http,
        "dlm-agent ready"
    );
    let result = stop_in_order(shutdown, tasks, started.driver, started.driver_task, watchdog, stop_tx).await;
    drop(listeners.socket_file);
    result
}

/// Locks the agent's memory as `[memory] resident` asks, and says how it went.
fn keep_resident(config: &Config, metrics: &Metrics) -> Result<(), ServeError> {
    let resident = resident::make_resident(config.resident).map_err(ServeError::Resident)?;
    match &resident {
        ResidentState::Locked { locked } => tracing::info!(locked_mib = locked >> 20, "memory resident: locked in RAM"),
        ResidentState::NotLocked(why) => {
            tracing::warn!("memory not resident: memory pressure on this node can stall the agent: {why}");
        }
        ResidentState::Off => tracing::info!("memory not resident ([memory] resident = \"off\")"),
    }
    if config.reserve_locks > 0 {
        let reserved =
            resident::reserve(config.reserve_locks.saturating_mul(crate::config::memory::RESERVE_BYTES_PER_LOCK));
        tracing::info!(locks = config.reserve_locks, reserved_mib = reserved >> 20, "memory reserve set aside");
    }
    metrics.register(Box::new(ResidentMetrics::new(&resident)));
    Ok(())
}

/// Every socket the agent listens on, bound before anything starts (a
/// port taken fails the start, not a later step).
struct Listeners {
    unix: UnixListener,
    /// From here on the socket file is this agent's: it goes when serving
    /// ends, however it ends (a start that fails later leaves no stale file).
    socket_file: SocketFile,
    tcp: Option<TcpListener>,
    http: Option<TcpListener>,
    peer: Option<TcpListener>,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Listeners, ServeError> {
        let unix = bind_unix(&config.socket).await?;
        let socket_file = SocketFile(config.socket.clone());
        let bind_tcp = |what: String, addr| async move {
            TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { what, source })
        };
        // Connections of clients and peers get fixed kernel buffers; the
        // scrapers' are short-lived.
        let bind_bounded = |what: String, addr| async move {
            let listener = bind_tcp(what.clone(), addr).await?;
            buffers::bound_listener(&listener).map_err(|source| ServeError::Bind { what, source })?;
            Ok::<_, ServeError>(listener)
        };
        let tcp = match config.tcp {
            Some(addr) => Some(bind_bounded(addr.to_string(), addr).await?),
            None => None,
        };
        let http = match config.http {
            Some(addr) => Some(bind_tcp(addr.to_string(), addr).await?),
            None => None,
        };
        let peer = match &config.cluster {
            Some(cluster) => Some(bind_bounded(format!("peer listener {}", cluster.listen), cluster.listen).await?),
            None => None,
        };
        Ok(Listeners { unix, socket_file, tcp, http, peer })
    }
}

/// The TLS files, if configured; says loudly when TCP links run without.
fn load_tls(config: &Config, metrics: &Metrics) -> Result<Option<Arc<Tls>>, ServeError> {
    let tls = match &config.tls {
        TlsSettings::Files(files) => Some(Arc::new(Tls::load(files, metrics).map_err(ServeError::Tls)?)),
        TlsSettings::Insecure | TlsSettings::Unset => None,
    };
    let insecure = config.tls == TlsSettings::Insecure && (config.tcp.is_some() || config.cluster.is_some());
    tls::report_insecure(metrics, insecure);
    if insecure {
        tracing::warn!(
            "[tls] insecure = true: the peer links and the TCP client listener are plain TCP; \
             anyone who can reach them can act as a member or a client"
        );
    }
    Ok(tls)
}

/// The driver, as the client servers reach it.
struct Started {
    driver: DriverHandle,
    driver_task: tokio::task::JoinHandle<()>,
    access: Arc<Access>,
}

/// What the cluster parts take over from the driver's start: the other
/// ends of what the driver was wired to.
struct Handover {
    peer_view: Arc<PeerView>,
    dialers: Vec<peer::Dialer>,
    fence_acks: tokio::sync::mpsc::Receiver<dlm_core::cluster::NodeId>,
    lease: Arc<Lease>,
    /// This start's generation (see [`generation`]).
    generation: u64,
}

/// Raises the generation on disk (before anything can be granted), then
/// starts the driver wired to the peers' dialers, the peer transport's view
/// and the membership's channels.
fn start_driver(
    config: &Arc<Config>,
    metrics: &Arc<Metrics>,
    attribution: Option<crate::ebpf::AttributionMaps>,
) -> Result<(Started, Handover), ServeError> {
    let (peers, dialers) = match &config.cluster {
        Some(cluster) => peer::channels(cluster),
        None => (std::collections::HashMap::new(), Vec::new()),
    };
    let by_views = config.cluster.as_ref().is_some_and(|c| c.membership == MembershipSource::Corosync);
    let node_id = dlm_core::cluster::NodeId(config.cluster.as_ref().map_or(0, |c| c.node_id));
    let peer_view = Arc::new(PeerView::new(node_id, if by_views { 0 } else { 1 }, by_views));
    let (fence_acks, fence_acks_rx) = tokio::sync::mpsc::channel(FENCE_ACKS_QUEUED_MAX);
    let access = Arc::new(Access::new(config.access.clone()));
    let generation = generation::advance(&config.state_dir).map_err(ServeError::State)?;
    tracing::info!(generation, state_dir = %config.state_dir.display(), "fencing tokens start above generation {generation}'s floor");
    tracing::info!("workers spin before parking: {}", crate::spin::state());
    metrics.register(access.collector());
    // Armed by the membership once corosync's timeouts are known.
    let lease = Lease::new();
    let wiring = driver::Wiring {
        peers,
        peer_view: peer_view.clone(),
        fence_acks: by_views.then_some(fence_acks),
        lease: by_views.then(|| lease.clone()),
    };
    let (driver, driver_task) = driver::start(
        config.clone(),
        metrics.clone(),
        Clock::start(),
        attribution,
        wiring,
        access.clone(),
        generation::token_floor(generation),
    )
    .map_err(ServeError::Config)?;
    let highest_token = driver.clone();
    tokio::spawn(generation::keep(config.state_dir.clone(), generation, move || {
        let driver = highest_token.clone();
        async move { driver.ask(|reply| Command::HighestToken { reply }).await.ok() }
    }));
    let handover = Handover { peer_view, dialers, fence_acks: fence_acks_rx, lease, generation };
    Ok((Started { driver, driver_task, access }, handover))
}

/// The peer links (listener and dialers) and, with membership from
/// corosync, the membership task: its watchdog, if one is configured.
async fn start_cluster(
    config: &Config,
    metrics: &Metrics,
    driver: &DriverHandle,
    handover: Handover,
    tls: Option<Arc<Tls>>,
    listener: TcpListener,
) -> Result<Option<Watchdog>, ServeError> {
    let Some(cluster) = &config.cluster else { return Ok(None) };
    let ids: Vec<dlm_core::cluster::NodeId> =
        cluster.members.iter().filter(|m| m.id != cluster.node_id).map(|m| dlm_core::cluster::NodeId(m.id)).collect();
    let core = cluster.cluster_config().map_err(ServeError::Config)?;
    let security = match tls {
        Some(tls) => peer::PeerSecurity::Tls {
            tls,
            names: Arc::new(
                cluster.members.iter().map(|m| (dlm_core::cluster::NodeId(m.id), m.certificate_name())).collect(),
            ),
        },
        None => peer::PeerSecurity::Insecure,
    };
    let context = peer::PeerContext {
        cluster: Arc::new(core),
        driver: driver.clone(),
        metrics: peer::PeerMetrics::new(metrics, &ids),
        view: handover.peer_view.clone(),
        security,
    };
    peer::spawn(context, listener, handover.dialers);
    // Registered for every cluster (the dashboards show them at zero).
    let membership_metrics = membership::MembershipMetrics::new(metrics);
    if cluster.membership != MembershipSource::Corosync {
        return Ok(None);
    }
    membership::start(
        cluster,
        handover.peer_view.own(),
        (handover.generation, config.state_dir.clone()),
        driver.clone(),
        handover.fence_acks,
        membership_metrics,
        handover.lease,
    )
    .await
    .map_err(ServeError::Config)
}

/// The client servers: gRPC and framed sessions on the Unix socket, gRPC on
/// TCP, HTTP (metrics, status), and the TLS reload on SIGHUP.
struct ClientServers<'a> {
    config: &'a Config,
    metrics: &'a Arc<Metrics>,
    driver: &'a DriverHandle,
    access: &'a Arc<Access>,
}

/// What the client servers run as: each ends when told to stop, or fails.
type ServerTasks = tokio::task::JoinSet<Result<(), tonic::transport::Error>>;

impl ClientServers<'_> {
    fn spawn(
        &self,
        unix: UnixListener,
        tcp: Option<TcpListener>,
        http: Option<TcpListener>,
        tls: Option<Arc<Tls>>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> ServerTasks {
        let config = self.config;
        let stopped = || {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|stop| *stop).await;
            }
        };
        let service = || {
            DlmServer::new(DlmService::new(
                self.driver.clone(),
                config.node.clone(),
                config.session_queue_max,
                self.access.clone(),
            ))
            .max_decoding_message_size(CLIENT_MESSAGE_LEN_MAX)
        };
        let server = || {
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(config.keepalive))
                .http2_keepalive_timeout(Some(config.keepalive))
                .max_concurrent_streams(Some(config.limits.sessions_max.saturating_add(CALL_STREAMS_MAX)))
        };
        let mut tasks = ServerTasks::new();
        // One socket, two protocols: gRPC and framed sessions (`framing`).
        // One count of connections for every client listener: a client that
        // fills it on TCP leaves none on the Unix socket, and the other way round.
        let admission = Admission {
            connections: Quota::new(config.clients.connections_max, config.clients.connections_per_client_max),
            handshakes: Quota::new(HANDSHAKES_MAX, HANDSHAKES_PER_CLIENT_MAX),
            answering: Quota::new(ANSWERING_MAX, ANSWERING_PER_CLIENT_MAX),
            rings: Quota::new(config.clients.ring_sessions_max, config.clients.connections_per_client_max),
            handshake_timeout: config.clients.handshake_timeout,
            refused: self.metrics.refused.clone(),
        };
        let framed_settings = framed::FramedSettings {
            node: config.node.clone(),
            session_queue_max: config.session_queue_max,
            keepalive: config.keepalive,
            admission: admission.clone(),
            ring_sessions: self.metrics.ring_sessions.clone(),
            rings_declined: self.metrics.rings_declined.clone(),
        };
        let (grpc_incoming, framed_task) = framed::spawn(unix, self.driver.clone(), framed_settings, stopped());
        tasks.spawn(async move {
            let _ = framed_task.await;
            Ok(())
        });
        tasks.spawn(server().add_service(service()).serve_with_incoming_shutdown(grpc_incoming, stopped()));
        if let Some(tcp) = tcp {
            tasks.spawn(
                server()
                    .add_service(service())
                    .serve_with_incoming_shutdown(tcp::spawn(tcp, admission, tls.clone()), stopped()),
            );
        }
        if let Some(http) = http {
            let router = http::router(self.driver.clone(), self.metrics.clone());
            let stop = stopped();
            tasks.spawn(async move {
                axum::serve(http, router)
                    .with_graceful_shutdown(stop)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "http server failed");
                    })
                    .ok();
                Ok(())
            });
        }
        tasks.spawn(async move {
            reload_on_hangup(tls.as_deref()).await;
            Ok(())
        });
        tasks
    }
}

/// Serves until `shutdown` completes or a server fails, then stops in
/// order: pending requests are answered (cancelled), locks revoked,
/// sessions ended; then the servers stop, letting the ended streams drain;
/// then the driver.
async fn stop_in_order(
    shutdown: impl Future<Output = ()>,
    mut tasks: ServerTasks,
    driver: DriverHandle,
    driver_task: tokio::task::JoinHandle<()>,
    watchdog: Option<Watchdog>,
    stop: tokio::sync::watch::Sender<bool>,
) -> Result<(), ServeError> {
    let mut result = Ok(());
    tokio::select! {
        () = shutdown => tracing::info!("stopping: answering pending requests"),
        Some(ended) = tasks.join_next() => {
            if let Ok(Err(error)) = ended {
                result = Err(ServeError::Serve(error));
            }
        }
    }
    let _ = driver.ask(|reply| Command::Shutdown { reply }).await;
    if let Some(watchdog) = watchdog {
        // Every lock is revoked: a clean stop may leave the machine running.
        let _ = tokio::task::spawn_blocking(move || watchdog.disarm()).await;
    }
    let _ = stop.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("connections still open after {SHUTDOWN_DRAIN_TIMEOUT:?}; closing them");
    }
    drop(driver);
    let _ = driver_task.await;
    result
}
