//! The transports: how clients, peers and scrapers reach the driver. Each
//! turns its protocol into [`Command`](crate::command::Command)s sent
//! through a [`DriverHandle`](crate::command::DriverHandle); none imports
//! the driver itself, nor another transport.
//!
//! | module | protocol |
//! |---|---|
//! | `framed` | the Unix socket: framed sessions served here, gRPC connections handed to tonic |
//! | `grpc` | the `dlm.v1.Dlm` gRPC service (sessions and admin calls, Unix socket and TCP) |
//! | `peer` | TCP links between the agents of a cluster: dialers, acceptor, handshake |
//! | `http` | `/metrics`, `/healthz`, `/readyz` |

pub mod framed;
pub mod grpc;
pub mod http;
pub mod peer;
