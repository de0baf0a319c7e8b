//! # dlm-agent
//!
//! The dlm node service and its command line. One agent runs per node; the
//! applications on the node take locks through it on a Unix socket (framed
//! sessions, [`framing`], or gRPC) or over TCP (gRPC) when configured. The
//! lock semantics are `dlm-core`'s; this crate owns the sockets, the
//! sessions' lifetimes, the clock, the peer transport, metrics, the eBPF
//! loader and the CLI.
//!
//! ```text
//!  app ─┐  framed / gRPC sessions     ┌──────────── dlm-agent ──────────────┐
//!  app ─┼──(Unix socket / TCP)──────▶ │ framed, service ──▶ engine task ──┐ │ ◀──▶ peers
//!  CLI ─┘  ◀── completions, BASTs ─── │    ◀───── bounded session queues ─┘ │     (peer)
//!                                     │ axum: /metrics /healthz /readyz      │
//!                                     └──────────────────────────────────────┘
//! ```
//!
//! With root or CAP_BPF+CAP_PERFMON it also loads the eBPF programs of
//! `dlm-ebpf` ([`ebpf`]): kernel lock, futex, scheduler and memory-pressure
//! statistics as metrics, and, for each lock, where its client's time went
//! while it waited and held ([`kernel_evidence`]). [`probes`] are USDT probe
//! points for bpftrace.
//!
//! With a `[cluster]` section it is a member of a static cluster: the engine
//! task drives a `dlm_core::cluster::ClusterNode`, and [`peer`] carries its
//! messages to the other agents. The Rust client library is [`client`].

pub mod client;
pub mod clock;
pub mod cluster_metrics;
pub mod config;
pub mod convert;
pub mod ebpf;
pub mod engine;
pub mod framed;
pub mod framing;
pub mod http;
pub mod kernel_evidence;
pub mod metrics;
pub mod peer;
pub mod probes;
pub mod proto;
pub mod server;
pub mod service;
pub mod telemetry;
