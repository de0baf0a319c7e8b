//! The wire of dlm's client API, shared by the agent (`dlm-agent`) and every
//! client (`dlm-client`, and through `proto/dlm/v1/dlm.proto` the clients in
//! other languages): nothing here does I/O of its own but read and write
//! frames on a stream it is given.
//!
//! | module | its one job |
//! |---|---|
//! | [`proto`] | the generated gRPC messages and services of `proto/dlm/v1/dlm.proto` |
//! | [`framing`] | the framed-session protocol: the same messages without HTTP/2, on the Unix socket |
//! | [`codes`] | every wire code and metric label as an enum, with its text |
//! | [`convert`] | the lock engine's types (`dlm_core`) to and from the wire's |
//!
//! It depends on `dlm-core` (the modes, flags and statuses the messages
//! carry), prost and tonic's code generation, and tokio's I/O traits; not on
//! any transport, TLS, eBPF or corosync.

pub mod codes;
pub mod convert;
pub mod framing;
pub mod proto;

/// Largest client message the agent accepts, over gRPC or in a frame: names
/// are 64 bytes and value blocks 256, so anything near this is garbage.
pub const CLIENT_MESSAGE_LEN_MAX: usize = 64 * 1024;
