//! [`Node`]: one node's lock engine, the type drivers use.

mod cluster_layer;
mod recovery;

use std::collections::BTreeMap;

// Session and handle maps are keyed by ids clients choose: hashbrown's
// default hasher is randomly seeded (so not predictable by them) and fast.
use hashbrown::HashMap;
use std::time::Duration;

use crate::deadlock::{self, Edge, Search, WaitForGraph};
use crate::dump::{DumpCursor, DumpPage, LockInfo, LockspaceInfo, PageBounds, ResourceInfo};
use crate::effect::{Effect, Status};
use crate::ids::{LockHandle, LockspaceId, SessionId};
use crate::limits::{Limit, Limits};
use crate::lockspace::{Lockspace, LockspaceConfig};
use crate::outbox::Outbox;
use crate::request::{ClientRequest, RequestError};
use crate::time::Instant;

/// Settings of a node's engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Bounds on everything that grows.
    pub limits: Limits,
    /// Look for wait-for cycles between sessions and fail a victim.
    pub deadlock_detection: bool,
    /// When a targeted deadlock search runs out of budget, a full scan runs
    /// this long after.
    pub deadlock_rescan_delay: Duration,
    /// Every fencing token this node hands out is larger than this: the
    /// agent raises it at each start (from a generation kept on disk), so
    /// that tokens never go back across a restart (part 3 of [`crate::tokens`]).
    pub token_floor: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            limits: Limits::default(),
            deadlock_detection: true,
            deadlock_rescan_delay: Duration::from_secs(1),
            token_floor: 0,
        }
    }
}

/// Where a session's lock lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LockRef {
    lockspace: LockspaceId,
    lock: u32,
}

#[derive(Default)]
struct Session {
    locks: HashMap<LockHandle, LockRef>,
}

/// The lock engine of one node: lockspaces, sessions, and the locks they hold.
///
/// Deterministic and sans-IO: it never reads a clock, never blocks and
/// performs no I/O. Time comes in as `now` arguments, requests as method
/// calls, and what the outside world must be told comes out of
/// [`Node::poll_effect`].
///
/// Methods, by group:
/// - getters: [`Node::lockspace_id`], [`Node::lockspaces`], [`Node::dump`],
///   [`Node::session_count`], [`Node::check_invariants`];
/// - events: [`Node::handle_client`] (a client request),
///   [`Node::handle_timeout`] (time passed);
/// - mutators for the driver's own commands: lockspaces
///   ([`Node::create_lockspace`], [`Node::release_lockspace`],
///   [`Node::purge_orphans`]) and sessions ([`Node::open_session`],
///   [`Node::end_session`]);
/// - polls: after any event or mutator, drain [`Node::poll_effect`] until it
///   returns `None`, then ask [`Node::poll_timeout`] when to call
///   [`Node::handle_timeout`] next;
/// - for the cluster layer (in `cluster_layer.rs`): freed resources,
///   fencing-token floors, wait-for edges, checks of requests sent to a
///   remote master; and recovery (in `recovery.rs`).
///
/// Every accepted request (`Ok` from `handle_client`) ends in exactly one
/// [`crate::Completion`], unless its session ends first; a rejected one
/// (`Err`) changes nothing.
pub struct Node {
    config: NodeConfig,
    lockspaces: BTreeMap<LockspaceId, Lockspace>,
    lockspace_names: BTreeMap<Box<[u8]>, LockspaceId>,
    next_lockspace: u32,
    /// The highest fencing token any released lockspace handed out: a
    /// lockspace created later starts above it, so tokens never go back on
    /// this node across a release and a re-creation (of that name or
    /// another; part 2 of [`crate::tokens`]).
    released_tokens: u64,
    sessions: HashMap<SessionId, Session>,
    out: Outbox,
    /// When a full deadlock scan is due (a targeted search ran out of budget).
    full_scan_at: Option<Instant>,
    /// The deadlock search's memory, kept between searches (as large as
    /// the largest search yet: at most every session).
    searcher: deadlock::Searcher,
}

impl Node {
    /// An engine with no lockspace and no session.
    ///
    /// # Errors
    /// The limits are inconsistent (see [`Limits::validate`]).
    pub fn new(config: NodeConfig) -> Result<Node, String> {
        config.limits.validate()?;
        let released_tokens = config.token_floor;
        Ok(Node {
            config,
            lockspaces: BTreeMap::new(),
            lockspace_names: BTreeMap::new(),
            next_lockspace: 0,
            released_tokens,
            sessions: HashMap::new(),
            out: Outbox::default(),
            full_scan_at: None,
            searcher: deadlock::Searcher::default(),
        })
    }

    /// The configuration the engine runs with.
    #[must_use]
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    // ----- lockspaces -----

    /// Creates a lockspace.
    ///
    /// # Errors
    /// A bad name or value block length, a name in use, or too many lockspaces.
    pub fn create_lockspace(&mut self, name: &[u8], config: LockspaceConfig) -> Result<LockspaceId, RequestError> {
        config.validate(name)?;
        if self.lockspace_names.contains_key(name) {
            return Err(RequestError::LockspaceExists);
        }
        if self.lockspaces.len() >= self.config.limits.lockspaces_max as usize {
            return Err(RequestError::LimitExceeded(Limit::Lockspaces));
        }
        let id = LockspaceId(self.next_lockspace);
        self.next_lockspace =
            self.next_lockspace.checked_add(1).ok_or(RequestError::LimitExceeded(Limit::Lockspaces))?;
        let mut lockspace = Lockspace::new(id, name.into(), config);
        lockspace.raise_token_floor(self.released_tokens);
        self.lockspaces.insert(id, lockspace);
        self.lockspace_names.insert(name.into(), id);
        Ok(id)
    }

    /// The id of the lockspace with this name.
    #[must_use]
    pub fn lockspace_id(&self, name: &[u8]) -> Option<LockspaceId> {
        self.lockspace_names.get(name).copied()
    }

    /// Releases a lockspace. With locks in it, only with `force`: pending
    /// requests then complete as cancelled and granted locks are revoked.
    ///
    /// # Errors
    /// Unknown lockspace, or locks left and no `force`.
    pub fn release_lockspace(&mut self, id: LockspaceId, force: bool) -> Result<(), RequestError> {
        let lockspace = self.lockspaces.get_mut(&id).ok_or(RequestError::UnknownLockspace)?;
        let locks = lockspace.lock_count();
        if locks > 0 && !force {
            return Err(RequestError::LockspaceBusy { locks });
        }
        lockspace.drop_all(&mut self.out, Status::Cancelled, crate::effect::RevokeReason::LockspaceReleased);
        let lockspace = self.lockspaces.remove(&id).expect("looked up above");
        self.released_tokens = self.released_tokens.max(lockspace.last_token());
        // Orphans go with the lockspace without being destroyed one by one.
        self.out.locks -= u64::from(lockspace.locks.len());
        self.lockspace_names.remove(&lockspace.name);
        self.apply_freed();
        Ok(())
    }

    /// Unlocks the orphans of a lockspace (of one resource, if named), and
    /// returns how many. Waiters they blocked are granted.
    ///
    /// # Errors
    /// Unknown lockspace.
    pub fn purge_orphans(&mut self, now: Instant, id: LockspaceId, name: Option<&[u8]>) -> Result<usize, RequestError> {
        let lockspace = self.lockspaces.get_mut(&id).ok_or(RequestError::UnknownLockspace)?;
        let purged = lockspace.purge_orphans(&mut self.out, name);
        self.finish(now);
        Ok(purged)
    }

    // ----- sessions -----

    /// Opens a session.
    ///
    /// # Errors
    /// The id is in use, or too many sessions are open.
    pub fn open_session(&mut self, session: SessionId) -> Result<(), RequestError> {
        if self.sessions.contains_key(&session) {
            return Err(RequestError::SessionExists);
        }
        if self.sessions.len() >= self.config.limits.sessions_max as usize {
            return Err(RequestError::LimitExceeded(Limit::Sessions));
        }
        self.sessions.insert(session, Session::default());
        Ok(())
    }

    /// Ends a session: its pending requests are dropped, its `PERSISTENT`
    /// granted locks become orphans, its other locks are unlocked (a PW/EX
    /// holder's value block is marked invalid: it may have been half written).
    ///
    /// # Errors
    /// Unknown session.
    pub fn end_session(&mut self, now: Instant, session: SessionId) -> Result<(), RequestError> {
        let ended = self.sessions.remove(&session).ok_or(RequestError::UnknownSession)?;
        let mut locks: Vec<(LockHandle, LockRef)> = ended.locks.into_iter().collect();
        locks.sort_unstable_by_key(|&(handle, _)| handle);
        let mut by_lockspace: BTreeMap<LockspaceId, Vec<u32>> = BTreeMap::new();
        for (_, lock) in locks {
            by_lockspace.entry(lock.lockspace).or_default().push(lock.lock);
        }
        for (id, locks) in by_lockspace {
            if let Some(lockspace) = self.lockspaces.get_mut(&id) {
                lockspace.end_session(&mut self.out, &locks);
            }
        }
        self.finish(now);
        Ok(())
    }

    /// How many sessions are open.
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    // ----- events -----

    /// A request from a client session.
    ///
    /// # Errors
    /// The request was rejected and changed nothing; see [`RequestError`].
    pub fn handle_client(
        &mut self,
        now: Instant,
        session: SessionId,
        request: ClientRequest,
    ) -> Result<(), RequestError> {
        let result = self.apply_client(now, session, request);
        self.finish(now);
        result
    }

    fn apply_client(&mut self, now: Instant, session: SessionId, request: ClientRequest) -> Result<(), RequestError> {
        let limits = &self.config.limits;
        let owner = self.sessions.get_mut(&session).ok_or(RequestError::UnknownSession)?;
        match request {
            ClientRequest::Lock(request) => {
                if owner.locks.contains_key(&request.handle) {
                    return Err(RequestError::HandleInUse);
                }
                if owner.locks.len() >= limits.locks_per_session_max as usize {
                    return Err(RequestError::LimitExceeded(Limit::LocksPerSession));
                }
                let lockspace = self.lockspaces.get_mut(&request.lockspace).ok_or(RequestError::UnknownLockspace)?;
                let handle = request.handle;
                if let Some(lock) = lockspace.request(&mut self.out, now, limits, session, request)? {
                    owner.locks.insert(handle, LockRef { lockspace: lockspace.id, lock });
                }
                Ok(())
            }
            ClientRequest::Convert(request) => {
                let lock = *owner.locks.get(&request.handle).ok_or(RequestError::UnknownHandle)?;
                let lockspace = self.lockspaces.get_mut(&lock.lockspace).ok_or(RequestError::UnknownLockspace)?;
                lockspace.convert(&mut self.out, now, limits, lock.lock, request)
            }
            ClientRequest::Unlock(request) => {
                let lock = *owner.locks.get(&request.handle).ok_or(RequestError::UnknownHandle)?;
                let lockspace = self.lockspaces.get_mut(&lock.lockspace).ok_or(RequestError::UnknownLockspace)?;
                lockspace.unlock(&mut self.out, lock.lock, &request)
            }
            ClientRequest::Cancel { handle } => {
                let lock = *owner.locks.get(&handle).ok_or(RequestError::UnknownHandle)?;
                let lockspace = self.lockspaces.get_mut(&lock.lockspace).ok_or(RequestError::UnknownLockspace)?;
                lockspace.cancel(&mut self.out, lock.lock)
            }
        }
    }

    /// Time has passed: requests whose timeout is due complete as
    /// [`Status::TimedOut`], resources whose lock-delay ended grant what
    /// they can, and a due deadlock scan runs.
    pub fn handle_timeout(&mut self, now: Instant) {
        for lockspace in self.lockspaces.values_mut() {
            lockspace.expire(&mut self.out, now);
        }
        if self.full_scan_at.is_some_and(|at| at <= now) {
            self.full_scan_at = None;
            let roots = self.waiting_sessions();
            self.resolve_deadlocks(now, roots, u32::MAX);
        }
        self.finish(now);
    }

    // ----- polls -----

    /// The next effect to carry out, oldest first.
    #[must_use]
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.out.effects.pop_front()
    }

    /// When [`Node::handle_timeout`] should be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadlines = self.lockspaces.values().filter_map(Lockspace::next_deadline);
        deadlines.chain(self.full_scan_at).min()
    }

    // ----- after every event -----

    fn finish(&mut self, now: Instant) {
        let roots = std::mem::take(&mut self.out.deadlock_roots);
        let budget = self.config.limits.deadlock_search_sessions_max;
        self.resolve_deadlocks(now, roots, budget);
        self.apply_freed();
        self.check_touched();
    }

    /// Fails victims until no cycle is reachable from `roots`.
    fn resolve_deadlocks(&mut self, now: Instant, mut roots: Vec<SessionId>, budget: u32) {
        if !self.config.deadlock_detection {
            self.out.deadlock_roots.clear();
            return;
        }
        while !roots.is_empty() {
            roots.sort_unstable();
            roots.dedup();
            match self.searcher.find_cycle(&Graph(&self.lockspaces), &roots, budget) {
                Search::NoCycle => roots.clear(),
                Search::BudgetExhausted => {
                    let at = now.saturating_add(self.config.deadlock_rescan_delay);
                    self.full_scan_at = Some(self.full_scan_at.map_or(at, |due| due.min(at)));
                    roots.clear();
                }
                Search::Cycle(cycle) => {
                    let victim = deadlock::victim(&cycle).expect("a cycle has at least one wait");
                    let lockspace = self.lockspaces.get_mut(&victim.lockspace).expect("cycle in a live lockspace");
                    lockspace.abort_pending(&mut self.out, victim.lock, Status::Deadlock);
                    // The same roots may reach another cycle; grants made by
                    // failing the victim add roots of their own.
                }
            }
            roots.append(&mut self.out.deadlock_roots);
        }
    }

    fn waiting_sessions(&self) -> Vec<SessionId> {
        let mut sessions: Vec<SessionId> =
            self.lockspaces.values().flat_map(|ls| ls.waiting_by_session.iter().map(|&(session, _)| session)).collect();
        sessions.dedup();
        sessions
    }

    fn apply_freed(&mut self) {
        for (session, handle) in self.out.freed.drain(..) {
            if let Some(owner) = self.sessions.get_mut(&session) {
                owner.locks.remove(&handle);
            }
        }
    }

    /// Checks the resources this event touched: always the cheap invariant
    /// (no incompatible modes held at once), everything in debug builds.
    fn check_touched(&mut self) {
        for (id, r) in self.out.touched.drain(..) {
            let Some(lockspace) = self.lockspaces.get(&id) else { continue };
            let Some(resource) = lockspace.resources.get(r) else { continue };
            assert!(crate::invariants::held_modes_compatible(&resource.held), "incompatible locks granted together");
            // The full check walks every queue: done on every event only
            // for resources small enough that it stays cheap, or a debug
            // build (the tests' agent) would be quadratic in a deep queue.
            #[cfg(debug_assertions)]
            if crate::ALL_MODES.iter().map(|&m| resource.held.get(m)).sum::<u32>() + resource.queued
                <= crate::invariants::EVERY_EVENT_CHECK_LOCKS_MAX
                && let Err(message) = lockspace.check_resource(r)
            {
                panic!("invariant violated: {message}");
            }
        }
    }

    /// Checks every invariant of every lockspace and session. For tests and
    /// simulators; costs time proportional to everything held.
    ///
    /// # Errors
    /// A description of the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let (mut owned, mut all) = (0usize, 0u64);
        for lockspace in self.lockspaces.values() {
            lockspace.check_all()?;
            owned += lockspace.locks.iter().filter(|(_, lock)| !lock.orphan).count();
            all += u64::from(lockspace.locks.len());
        }
        if all != self.out.locks {
            return Err(format!("{all} locks exist, {} counted", self.out.locks));
        }
        let mut mapped = 0usize;
        for (&session, owner) in &self.sessions {
            for (&handle, lock) in &owner.locks {
                mapped += 1;
                let found = self
                    .lockspaces
                    .get(&lock.lockspace)
                    .and_then(|ls| ls.locks.get(lock.lock))
                    .ok_or_else(|| format!("{session} {handle}: no such lock"))?;
                if found.session != session || found.handle != handle || found.orphan {
                    return Err(format!("{session} {handle}: maps to another lock"));
                }
            }
        }
        if owned != mapped {
            return Err(format!("{owned} owned locks, {mapped} in session maps"));
        }
        Ok(())
    }

    // ----- getters -----

    /// The highest fencing token of the node: handed out, or a floor that
    /// the next token of a lockspace starts above. A driver that persists
    /// a floor for its next start (the agent's generation) keeps it above this.
    #[must_use]
    pub fn highest_token(&self) -> u64 {
        self.lockspaces.values().map(Lockspace::last_token).fold(self.released_tokens, u64::max)
    }

    /// Every lockspace with its counts, by id.
    #[must_use]
    pub fn lockspaces(&self) -> Vec<LockspaceInfo> {
        self.lockspaces.values().map(Lockspace::info).collect()
    }

    /// The resources of a lockspace (one, if named) with their queues,
    /// sorted by name, at most `max_resources`.
    ///
    /// # Errors
    /// Unknown lockspace.
    pub fn dump(
        &self,
        id: LockspaceId,
        name: Option<&[u8]>,
        max_resources: usize,
    ) -> Result<Vec<ResourceInfo>, RequestError> {
        let lockspace = self.lockspaces.get(&id).ok_or(RequestError::UnknownLockspace)?;
        Ok(lockspace.dump(name, max_resources))
    }

    /// A page of a lockspace's dump (of one resource, if named), from
    /// `from` (the start when `None`), within `bounds`: see [`DumpPage`].
    ///
    /// # Errors
    /// Unknown lockspace.
    pub fn dump_page(
        &self,
        id: LockspaceId,
        name: Option<&[u8]>,
        from: Option<&DumpCursor>,
        bounds: PageBounds,
    ) -> Result<DumpPage, RequestError> {
        let lockspace = self.lockspaces.get(&id).ok_or(RequestError::UnknownLockspace)?;
        Ok(lockspace.dump_page(name, from, bounds))
    }

    /// The lock a session knows by `handle`, as a dump shows it.
    #[must_use]
    pub fn lock_info(&self, session: SessionId, handle: LockHandle) -> Option<LockInfo> {
        let lock = self.sessions.get(&session)?.locks.get(&handle)?;
        self.lockspaces.get(&lock.lockspace)?.lock_info(lock.lock)
    }
}

/// The wait-for graph over every lockspace of the node.
struct Graph<'a>(&'a BTreeMap<LockspaceId, Lockspace>);

impl WaitForGraph for Graph<'_> {
    fn edges_from(&self, session: SessionId, edges: &mut Vec<Edge>) {
        for lockspace in self.0.values() {
            lockspace.wait_edges(session, edges);
        }
    }
}
