//! # dlm-core
//!
//! The lock engine of dlm: the lock semantics of the VMS / Linux distributed
//! lock manager — six modes, granted / converting / waiting queues,
//! conversions, lock value blocks, completion and blocking callbacks,
//! try-locks, cancels, timeouts, orphans, deadlock detection — and a fencing
//! token on every grant, as a deterministic state machine.
//!
//! It is **sans-IO**: no sockets, no threads, no clock. The driver (the
//! `dlm-agent` service, a test, a simulator) feeds it events with the current
//! time and carries out the effects it asks for:
//!
//! ```text
//!   client requests ──▶ Node::handle_client(now, session, request)
//!   time passing    ──▶ Node::handle_timeout(now)
//!                          │
//!                          ▼
//!   Node::poll_effect() ──▶ Complete (the request's outcome, fencing token, value block)
//!                       ──▶ Blocking (tell a holder it is in someone's way)
//!                       ──▶ Revoked  (a lock is gone)
//!   Node::poll_timeout() ──▶ when to call handle_timeout next
//! ```
//!
//! It is not a service: the agent owns sockets and sessions' lifetimes.
//! Distribution of resources over nodes is [`cluster::ClusterNode`], the same
//! engine behind a directory, mastering and a peer protocol, still sans-IO;
//! the `sim` module (behind the `sim` feature, for tests and `cargo xtask
//! sim`) drives several of them over a simulated network from one seed.
//!
//! ```
//! use dlm_core::*;
//!
//! let mut node = Node::new(NodeConfig::default()).unwrap();
//! let ls = node.create_lockspace(b"app", LockspaceConfig::default()).unwrap();
//! node.open_session(SessionId(1)).unwrap();
//! let now = Instant::ZERO;
//! node.handle_client(now, SessionId(1), ClientRequest::Lock(LockRequest {
//!     handle: LockHandle(1),
//!     lockspace: ls,
//!     name: b"db/orders".to_vec(),
//!     mode: Mode::Ex,
//!     flags: LockFlags::EMPTY,
//!     timeout: None,
//! })).unwrap();
//! let Some(Effect::Complete(done)) = node.poll_effect() else { panic!() };
//! assert_eq!(done.status, Status::Granted);
//! assert!(done.token.is_some());
//! ```
//!
//! ## Words, each with one meaning
//!
//! | word | means | not |
//! |---|---|---|
//! | engine | one node's lock engine, the type [`Node`] (a [`cluster::ClusterNode`] keeps one as `engine`) | a machine |
//! | node | a machine of the cluster, named by a [`cluster::NodeId`] | the engine type |
//! | membership | the members of an epoch with their weights ([`cluster::Membership`]) | the agent's `membership` task that gets views from corosync |
//! | view, epoch | a membership handed to a node ([`cluster::View`]); its number, larger at each view | |
//! | incarnation | one start of a node's process: a member back with another restarted and lost its state | |
//! | links | a node's ordered, acknowledged message links to its peers (`cluster::links`) | the agent's connections or its driver's wiring |
//! | term | a mastership's number at the directory, larger at each claim | the agent's restart *generation* |
//! | generation | the agent's restart counter kept on disk, which floors its tokens ([`tokens`]) | a mastership's term |
//! | outcome | what became of an accepted request at once ([`cluster::Outcome`]: queued or not) | its final result, a [`Completion`] with a [`Status`] |
//! | ghost | what lock-delay keeps in the way after a hold was taken without an unlock | |

pub mod cluster;
mod deadlock;
mod dump;
mod effect;
mod flags;
mod ids;
mod invariants;
mod limits;
mod lock;
mod lockspace;
mod mode;
mod node;
mod outbox;
mod queue;
mod request;
mod resource;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod slab;
mod time;
pub mod tokens;

pub use deadlock::{Blocker, Edge, Search, Searcher, WaitForGraph, WaitRef, find_cycle, victim};
pub use dump::{DumpCursor, DumpPage, LockInfo, LockspaceInfo, PageBounds, ResourceInfo, SLOTS_PER_PAGE_MAX};
pub use effect::{Completion, Effect, Op, RevokeReason, Status};
pub use flags::{LockFlags, StatusFlags, UnlockFlags};
pub use ids::{FencingToken, LockHandle, LockspaceId, SessionId};
pub use limits::{
    LOCKSPACE_NAME_LEN_MAX, LVB_LEN_DEFAULT, LVB_LEN_MAX, LVB_LEN_MULTIPLE, Limit, Limits, RESOURCE_NAME_LEN_MAX,
};
pub use lockspace::{LOCK_DELAY_DEFAULT, LockspaceConfig};
pub use mode::{ALL_MODES, LvbAction, Mode, ModeCounts, ModeSet};
pub use node::{Node, NodeConfig};
pub use request::{ClientRequest, ConvertRequest, LockRequest, RequestError, UnlockRequest};
pub use time::Instant;
