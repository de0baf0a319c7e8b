//! Admission of client connections: how many may be open at once, in all
//! and per client, so that one local user (or one remote address) cannot
//! take every slot and lock the others out.
//!
//! A [`Quota`] counts what is open by [`Key`]; [`Quota::admit`] gives a
//! [`Ticket`] while the bounds hold, and the ticket gives its slot back when
//! it is dropped, however the connection ends. The client transports keep
//! two quotas: connections still reading their first bytes (a short-lived
//! state, bounded tightly), and connections open at all.

use std::collections::HashMap;
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
    pub fn admit(self: &Arc<Self>, key: Key) -> Result<Ticket, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.total >= self.total_max {
            return Err(Refusal::Full);
        }
        let held = open.by_key.entry(key).or_insert(0);
        if *held >= self.per_key_max {
            return Err(Refusal::KeyFull);
        }
        *held += 1;
        open.total += 1;
        Ok(Ticket { quota: self.clone(), key })
    }

    /// How many are open in all.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).total
    }

    fn release(&self, key: Key) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
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
    /// How long a new connection may take to send its first bytes.
    pub handshake_timeout: std::time::Duration,
}

impl Admission {
    /// A connection from `key`'s two tickets (open, and handshaking), or
    /// `None` when it must be closed at once.
    #[must_use]
    pub fn admit(&self, key: Key) -> Option<(Ticket, Ticket)> {
        let refused = |what: &str, refusal: Refusal| match refusal {
            Refusal::Full => tracing::debug!(%key, "every {what} slot is taken; closing a new connection"),
            Refusal::KeyFull => {
                tracing::debug!(%key, "{key} holds its share of {what} slots; closing its new connection")
            }
        };
        let open = self.connections.admit(key).map_err(|r| refused("connection", r)).ok()?;
        let handshake = self.handshakes.admit(key).map_err(|r| refused("handshake", r)).ok()?;
        Some((open, handshake))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_share_and_no_more_and_others_still_get_theirs() {
        let quota = Quota::new(5, 2);
        let a = Key::Uid(1);
        let b = Key::Uid(2);
        let held: Vec<Ticket> = (0..2).map(|_| quota.admit(a).expect("within a's share")).collect();
        assert_eq!(quota.admit(a).unwrap_err(), Refusal::KeyFull);
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
        assert_eq!(quota.admit(Key::Uid(3)).unwrap_err(), Refusal::Full);
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
