//! The transports: how clients, peers and scrapers reach the driver. Each
//! turns its protocol into [`Command`](crate::command::Command)s sent
//! through a [`DriverHandle`](crate::command::DriverHandle); none imports
//! the driver itself, nor another transport: they share only the helpers
//! `admission`, `authority`, `buffers`, `preface`, `refuse` and `tls`, which import
//! only each other (the crate's layering test checks it).
//!
//! | module | protocol |
//! |---|---|
//! | `admission` | how many client connections may be open, in all and per uid or address; accept loops that give the admitted clients a turn under a storm |
//! | `buffers` | fixed kernel buffers for every TCP socket: listeners and dials |
//! | `preface` | a client connection's first bytes, read under a deadline and replayed to tonic |
//! | `refuse` | a Unix socket connection over a quota told why: a framed `Rejected`, or gRPC calls failing `RESOURCE_EXHAUSTED` |
//! | `authority` | gRPC requests on the Unix socket given a valid `:authority` (grpc-core sends the socket path) |
//! | `framed` | the Unix socket: framed sessions served here, gRPC connections handed to tonic |
//! | `tcp` | the TCP client listener: gRPC connections handed to tonic |
//! | `grpc` | the `dlm.v1.Dlm` gRPC service (sessions and admin calls, Unix socket and TCP) |
//! | `tls` | TLS for the TCP listeners and the dials to peers, from `[tls]`, reloadable |
//! | `peer` | TCP links between the agents of a cluster: dialers, acceptor, handshake (TLS below the hello) |
//! | `http` | `/metrics`, `/healthz`, `/readyz` |

pub mod admission;
pub mod authority;
pub mod buffers;
pub mod framed;
pub mod grpc;
pub mod http;
pub mod peer;
pub mod preface;
pub mod refuse;
pub mod tcp;
pub mod tls;
