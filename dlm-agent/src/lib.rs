//! # dlm-agent
//!
//! The dlm node service and its command line. One agent runs per node; the
//! applications on the node take locks through it on a Unix socket (framed
//! sessions, [`framing`], or gRPC) or over TCP (gRPC over TLS) when
//! configured; what each client may do is the [`access`] policy's. The
//! lock semantics are `dlm-core`'s; this crate owns the sockets, the
//! sessions' lifetimes, the clock, the peer transport, metrics, the eBPF
//! loader and the CLI.
//!
//! ```text
//!  app ─┐  framed / gRPC sessions     ┌──────────── dlm-agent ────────────────┐
//!  app ─┼──(Unix socket / TCP)──────▶ │ transports ──Command──▶ driver ─────┐ │ ◀──▶ peers
//!  CLI ─┘  ◀── completions, BASTs ─── │    ◀──── bounded session queues ────┘ │  (transport::peer)
//!                                     │ http: /metrics /healthz /readyz        │
//!                                     └────────────────────────────────────────┘
//! ```
//!
//! ## Layers
//!
//! From the bottom up; each module imports only modules listed before it
//! (a test, `modules_import_only_modules_below_them`, checks it from the
//! sources). Public modules are what applications, the CLI and the
//! workspace's tests use; the rest are the agent's own.
//!
//! The wire — [`proto`], [`framing`], [`codes`], [`convert`] — is the
//! `dlm-proto` crate's, and the Rust client library, [`client`], is
//! `dlm-client`: both are re-exported here under their old names, and
//! neither depends on the agent, eBPF or corosync.
//!
//! | module | its one job |
//! |---|---|
//! | `clock` | the agent's one clock: tokio's, mapped to the lock engine's `Instant` |
//! | `bounds` | fixed bounds on messages, frames and queues, with their relations checked at compile time |
//! | [`access`] | who may do what: identities of clients, rights per lockspace, the policy |
//! | `generation` | the generation kept on disk, raised at each start and as tokens grow: fencing tokens never go back across restarts |
//! | [`resident`] | keeps the agent's memory locked in RAM, so memory pressure on the node cannot stall it |
//! | [`spin`] | the runtime's park hooks: a worker may spin briefly before it sleeps while requests flow (`DLM_SPIN_US`) |
//! | [`psi`] | the node's pressure stall figures (`/proc/pressure`) and the agent's own scheduling delay |
//! | [`pki`] | a cluster's own CA and the certificates it signs (`dlm-agent certs`, tests, benchmarks) |
//! | [`telemetry`] | logs, and one OpenTelemetry span per lock request when OTLP is configured |
//! | [`config`] | the settings: embedded default, TOML file, `DLM_*` variables and flags, validated |
//! | `metrics` | the Prometheus registry and the agent's lock and session metrics |
//! | [`ebpf`] | loading the eBPF programs, reading their maps, attribution maps for the driver |
//! | `peer_view` | what the peer transport must know of the views to let a peer in: updated by the driver, read at each hello |
//! | `command` | what transports share with the driver: commands, the driver's handle, session and peer outputs |
//! | `driver` | the task that owns the `ClusterNode`: dispatch, session output, peer batching, observation, admin |
//! | `transport` | framed sessions and gRPC on the Unix socket, gRPC on TCP, peer links, HTTP |
//! | `membership` | views from corosync (CPG and votequorum), agreed among the agents, handed to the driver |
//! | [`server`] | `dlm-agent run`: the one module that wires everything |
//!
//! The command line (`src/cli/`, in the binary) uses only the public
//! modules.
//!
//! ## Words, each with one meaning
//!
//! The core's words (engine, node, membership, view, links, term,
//! generation…) are in `dlm_core`'s crate docs; the agent adds these:
//!
//! | word | means | not |
//! |---|---|---|
//! | driver | the task that owns the `ClusterNode`; what it is wired to at start is `driver::Wiring` | the core's links |
//! | membership | the task that gets views from corosync (`membership/`) | the core's member list |
//! | framing | the byte format of framed messages (`dlm_proto::framing`) | |
//! | framed | the server of framed sessions on the Unix socket (`transport::framed`) | the format |
//! | probe | an instrumentation point: an eBPF program's attach point or a USDT probe | the lease's *asker*, which asks corosync |
//! | collector | a Prometheus collector | the eBPF map reader (`ebpf::map_reader`) |
//! | resident | the agent's memory locked in RAM (`resident`; what the start got is a `ResidentState`) | |
//!
//! ## Where to look
//!
//! - A request's path: `transport::framed` or `transport::grpc` →
//!   `driver::requests` → `dlm_core` → `driver::output` (effects to the
//!   session) and `driver::observe` (metrics, span, USDT probes, kernel
//!   evidence).
//! - Cluster traffic: `driver::peers` batches the node's envelopes to
//!   `transport::peer`'s dialers; the acceptor hands incoming ones to the
//!   driver as `Command::Peer`.
//! - Membership: corosync's callbacks (`membership::corosync`) → the
//!   agreement on views (`dlm_core::cluster::agree`, driven by `membership`) → `Command::View` →
//!   `driver::views` → `ClusterNode::handle_view`; fencing in
//!   `membership::fencing`.
//! - The membership lease (grant only while corosync answers): `lease` (the
//!   bound, lapses), `membership::ask` (the thread asking corosync, and its
//!   timeouts read at start), `driver::views` (fencing on a lapse before
//!   anything is handled).
//! - A metric's name or label: `metrics`, `driver::observe`, the peer
//!   transport's `PeerMetrics`, [`ebpf::kernel_metrics`]; label values in
//!   [`codes`].
//! - A limit: `bounds` (fixed), [`config`] (configured), `dlm_core::Limits`
//!   (the lock engine's).
//!
//! With root or CAP_BPF+CAP_PERFMON the agent also loads the eBPF programs
//! of `dlm-ebpf` ([`ebpf`]): kernel lock, futex, scheduler and
//! memory-pressure statistics as metrics, and, for each lock, where its
//! client's time went while it waited and held. With a `[cluster]` section
//! it is a member of a cluster: the driver drives a
//! `dlm_core::cluster::ClusterNode`, the peer transport carries its
//! messages to the other agents, and with `membership = "corosync"` the
//! `membership` module turns corosync's view of the cluster into the views
//! the node recovers from, fencing lost nodes first.

pub use dlm_client as client;
pub use dlm_proto::{codes, convert, framing, proto};

pub mod access;
pub mod config;
pub mod ebpf;
pub mod pki;
pub mod psi;
pub mod resident;
pub mod server;
pub mod spin;
pub mod telemetry;

mod bounds;
mod clock;
mod command;
mod driver;
mod generation;
mod lease;
mod membership;
mod metrics;
mod peer_view;
mod transport;

#[cfg(test)]
mod layering;
