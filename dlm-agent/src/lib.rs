//! # dlm-agent
//!
//! The dlm node service and its command line. One agent runs per node; the
//! applications on the node take locks through it over gRPC (a Unix socket
//! by default, TCP when configured). The lock semantics are `dlm-core`'s;
//! this crate owns the sockets, the sessions' lifetimes, the clock, metrics,
//! the eBPF loader and the CLI.
//!
//! ```text
//!  app ─┐  gRPC Session stream        ┌──────────── dlm-agent ─────────────┐
//!  app ─┼──(Unix socket / TCP)──────▶ │ service ──▶ engine task (Node) ──┐ │
//!  CLI ─┘  ◀── completions, BASTs ─── │    ◀───── bounded session queues ─┘ │
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
//! It is not (yet) a cluster member: every lockspace is local to the node.
//! The Rust client library is [`client`].

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
