//! Admission of client connections: how many may be open at once, in all
//! and per client, so that one local user (or one remote address) cannot
//! take every slot and lock the others out.
//!
//! A [`Quota`] counts what is open by [`Key`]; [`Quota::admit`] gives a
//! [`Ticket`] while the bounds hold, and the ticket gives its slot back when
//! it is dropped, however the connection ends. The client transports keep
//! two quotas: connections still reading their first bytes (a short-lived
//! state, bounded tightly), and connections open at all.
//!
//! A connection over a quota is refused with a reason ([`Refused`]) that
//! names the limit and how to raise it: counted
//! (`dlm_client_refused_total`), logged as a warning once per episode (the
//! first refusal of a key, not again until it has had room), and answered
//! on the connection when a slot of a third, small quota allows
//! (`transport::refuse`); past that, closed.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Whom a connection counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A Unix socket client's user id (`SO_PEERCRED`).
    Uid(u32),
    /// A TCP client's address.
    Address(IpAddr),
    /// A client the socket did not name (no credentials).
    Unknown,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Uid(uid) => write!(f, "uid {uid}"),
            Key::Address(ip) => write!(f, "address {ip}"),
            Key::Unknown => f.write_str("an unnamed client"),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Full,
    /// This key holds all the slots it may.
    KeyFull,
}

/// Bounds on open things, in all and per key.
#[derive(Debug)]
pub struct Quota {
    total_max: usize,
    per_key_max: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_key: HashMap<Key, usize>,
    /// Keys refused since they last had room (logged once per episode).
    told: HashSet<Key>,
    /// Every slot was taken and a refusal was logged.
    told_full: bool,
}

/// A refusal, and whether it is the first of its episode (to be logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusing {
    /// Why.
    pub refusal: Refusal,
    /// No refusal of this key (or of everyone, when full) since it had room.
    pub first: bool,
}

impl Quota {
    /// At most `total_max` at once, and `per_key_max` for one key.
    #[must_use]
    pub fn new(total_max: usize, per_key_max: usize) -> Arc<Quota> {
        Arc::new(Quota { total_max, per_key_max: per_key_max.min(total_max), open: Mutex::new(Open::default()) })
    }

    /// A slot for `key`, held until the ticket is dropped.
    ///
    /// # Errors
    /// Every slot is taken, or `key`'s share is.
    pub fn admit(self: &Arc<Self>, key: Key) -> Result<Ticket, Refusing> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.total >= self.total_max {
            let first = !std::mem::replace(&mut open.told_full, true);
            return Err(Refusing { refusal: Refusal::Full, first });
        }
        let held = open.by_key.get(&key).copied().unwrap_or(0);
        if held >= self.per_key_max {
            let first = open.told.insert(key);
            return Err(Refusing { refusal: Refusal::KeyFull, first });
        }
        *open.by_key.entry(key).or_insert(0) += 1;
        open.total += 1;
        Ok(Ticket { quota: self.clone(), key })
    }

    /// The most open at once.
    #[must_use]
    pub fn total_max(&self) -> usize {
        self.total_max
    }

    /// The most open at once for one key.
    #[must_use]
    pub fn per_key_max(&self) -> usize {
        self.per_key_max
    }

    /// How many are open in all.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).total
    }

    fn release(&self, key: Key) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        // Room again: the next refusal starts an episode, logged.
        open.told_full = false;
        open.told.remove(&key);
        if let Some(held) = open.by_key.get_mut(&key) {
            *held -= 1;
            if *held == 0 {
                // Keys come and go (addresses, uids): no entry outlives its last slot.
                open.by_key.remove(&key);
            }
        }
    }
}

/// One admitted slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    quota: Arc<Quota>,
    key: Key,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.quota.release(self.key);
    }
}

/// How many connections an accept loop takes in a row before it gives the
/// runtime a turn ([`Turns`]).
pub const ACCEPTS_PER_TURN: u32 = 8;

/// Makes an accept loop yield every [`ACCEPTS_PER_TURN`] connections.
///
/// Why: under a storm of connections the listener is always ready, and
/// tokio lets a task make 128 ready I/O calls before it must yield (here
/// about 2.5 ms of accepting, refusing and closing), while a worker that
/// is never idle polls its I/O driver only every 61 task polls: another
/// client's answer then waited 100–350 ms to be seen, and another user's
/// `status` took 0.5–1.4 s under `tests/admission.rs`'s storm on a 2-CPU
/// VM. A yielded task is woken only after its worker has polled the I/O
/// driver, so each turn lets the admitted clients' readiness in.
#[derive(Debug, Default)]
pub struct Turns {
    taken: u32,
}

impl Turns {
    /// Counts a connection taken; every [`ACCEPTS_PER_TURN`], yields.
    pub async fn taken(&mut self) {
        self.taken += 1;
        if self.taken >= ACCEPTS_PER_TURN {
            self.taken = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// What the client listeners admit: connections open (in all and per
/// key) and, among them, those still sending their first bytes, which must
/// do so within `handshake_timeout`.
#[derive(Clone, Debug)]
pub struct Admission {
    /// Connections open at all.
    pub connections: Arc<Quota>,
    /// Connections that have not yet sent their first bytes (the HTTP/2
    /// preface and SETTINGS, or a framed session's preface).
    pub handshakes: Arc<Quota>,
    /// Refused connections being told why (`transport::refuse`).
    pub answering: Arc<Quota>,
    /// Framed sessions through shared-memory rings (each holds two
    /// descriptors more than its socket); past it, sessions use the socket.
    pub rings: Arc<Quota>,
    /// How long a new connection may take to send its first bytes.
    pub handshake_timeout: std::time::Duration,
    /// `dlm_client_refused_total`, by limit.
    pub refused: prometheus::IntCounterVec,
}

/// A connection refused by a quota.
#[derive(Debug)]
pub struct Refused {
    /// What the client is told: the limit, its value, how to raise it.
    pub message: String,
    /// A slot to answer the client in, if one was free: without it the
    /// connection is closed at once.
    pub answer: Option<Ticket>,
}

impl Admission {
    /// A connection from `key`'s two tickets (open, and handshaking).
    ///
    /// # Errors
    /// A quota is full: the refusal, counted and (once per episode) logged.
    pub fn admit(&self, key: Key) -> Result<(Ticket, Ticket), Refused> {
        let open = self.connections.admit(key).map_err(|r| self.refused(key, &self.connections, r, false))?;
        let handshake = self.handshakes.admit(key).map_err(|r| self.refused(key, &self.handshakes, r, true))?;
        Ok((open, handshake))
    }

    fn refused(&self, key: Key, quota: &Quota, refusing: Refusing, handshake: bool) -> Refused {
        let (limit, message) = match (handshake, refusing.refusal) {
            (true, Refusal::Full) => (
                "handshakes",
                format!(
                    "the agent has {} connections that have not sent their first bytes yet, its fixed bound; \
                     try again",
                    quota.total_max()
                ),
            ),
            (true, Refusal::KeyFull) => (
                "handshakes",
                format!(
                    "{key} has {} connections that have not sent their first bytes yet, its fixed bound; a client \
                     must speak as soon as it connects",
                    quota.per_key_max()
                ),
            ),
            (false, Refusal::Full) => (
                "connections_max",
                format!(
                    "the agent has {0} client connections open, its limit (limits.connections_max = {0}); close \
                     connections, or raise connections_max in the [limits] section of the agent's \
                     configuration (at most the descriptor limit, LimitNOFILE, less 256)",
                    quota.total_max()
                ),
            ),
            (false, Refusal::KeyFull) => (
                "connections_per_client_max",
                format!(
                    "{key} has {0} connections open, its limit (limits.connections_per_client_max = {0}); close \
                     connections, or raise connections_per_client_max in the [limits] section of the agent's \
                     configuration",
                    quota.per_key_max()
                ),
            ),
        };
        self.refused.with_label_values(&[limit]).inc();
        if refusing.first {
            tracing::warn!(%key, limit, "refusing new client connections over a limit: {message}");
        }
        Refused { message, answer: self.answering.admit(key).ok() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_accept_loop_gives_the_other_tasks_a_turn_every_few_connections() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let ran = Arc::new(AtomicBool::new(false));
        let other = ran.clone();
        tokio::spawn(async move { other.store(true, Ordering::SeqCst) });
        let mut turns = Turns::default();
        for _ in 1..ACCEPTS_PER_TURN {
            turns.taken().await;
        }
        assert!(!ran.load(Ordering::SeqCst), "no turn before {ACCEPTS_PER_TURN} connections");
        turns.taken().await;
        assert!(ran.load(Ordering::SeqCst), "a turn after {ACCEPTS_PER_TURN}");
    }

    #[test]
    fn a_key_gets_its_share_and_no_more_and_others_still_get_theirs() {
        let quota = Quota::new(5, 2);
        let a = Key::Uid(1);
        let b = Key::Uid(2);
        let held: Vec<Ticket> = (0..2).map(|_| quota.admit(a).expect("within a's share")).collect();
        assert_eq!(quota.admit(a).unwrap_err(), Refusing { refusal: Refusal::KeyFull, first: true });
        assert!(!quota.admit(a).unwrap_err().first, "logged once per episode");
        let other = quota.admit(b).expect("b has its own share");
        assert_eq!(quota.open(), 3);
        drop(held);
        assert_eq!(quota.open(), 1);
        assert!(quota.admit(a).is_ok(), "a's slots came back when its tickets went");
        drop(other);
    }

    #[test]
    fn the_total_bounds_every_key_together() {
        let quota = Quota::new(3, 2);
        let _held: Vec<Ticket> =
            [Key::Uid(1), Key::Uid(2), Key::Unknown].into_iter().map(|k| quota.admit(k).expect("room")).collect();
        assert_eq!(quota.admit(Key::Uid(3)).unwrap_err().refusal, Refusal::Full);
        assert_eq!(quota.open(), 3);
    }

    #[test]
    fn keys_leave_no_entry_behind() {
        let quota = Quota::new(10, 10);
        for n in 0..100u8 {
            drop(quota.admit(Key::Address(IpAddr::from([10, 0, 0, n]))).expect("room"));
        }
        assert!(quota.open.lock().unwrap().by_key.is_empty());
    }
}
