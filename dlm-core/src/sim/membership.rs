//! The simulated membership layer, with corosync's guarantees: every live
//! member of a component is handed the same views in the same order, each
//! with a larger epoch; a crashed process is seen gone at once (CPG's
//! PROCDOWN) and is fenced by being dead; a node cut off from the others is
//! handed a view without quorum first (it fences itself), and the majority
//! its view without that node only after that (the fence has acted). Nodes
//! crash, restart with a new incarnation (a join), are cut off and heal,
//! and pause for less than failure detection takes.
//!
//! The checks that recovery needs are here too: what clients believe they
//! hold never conflicts across the cluster, a surviving lock is still held
//! after recovery in the same mode under the same token, and directories
//! and masters agree at the end.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crate::cluster::{ClusterNode, Membership, NodeId, View, ViewMember};
use crate::mode::Mode;
use crate::time::Instant;

use crate::sim::{Belief, Client, LOCKSPACE, Sim, Slot, belief, cpg};

/// Membership events a run may have (after them, it settles).
const EVENTS_MAX: u32 = 8;
/// How long the membership layer takes to hand out a view, at most.
const VIEW_DELAY_MAX_NS: u64 = 300_000;
/// How long after a cut the majority's view comes (the fence acting).
const FENCE_DELAY: Duration = Duration::from_millis(2);

pub(super) struct MembershipLayer {
    pub(super) alive: Vec<bool>,
    pub(super) paused_until: Vec<Instant>,
    /// When each node's last pause began.
    pub(super) paused_from: Vec<Instant>,
    pub(super) incarnations: Vec<u64>,
    /// The members of the majority's current view (0-based).
    members: BTreeSet<usize>,
    epoch: u64,
    /// Views due per node, in order.
    due: Vec<VecDeque<(Instant, View)>>,
    /// The node cut off from the others, and when the cut heals.
    partition: Option<(usize, Instant)>,
    /// Since when a node has been dead.
    dead_since: Vec<Instant>,
    events: u32,
    /// A recovery ended since the surviving locks were last checked.
    pub(super) recovered: bool,
    /// Whether each node was recovering when last looked at.
    recovering: Vec<bool>,
}

impl MembershipLayer {
    pub(super) fn new(nodes: usize) -> MembershipLayer {
        MembershipLayer {
            alive: vec![true; nodes],
            paused_until: vec![Instant::ZERO; nodes],
            paused_from: vec![Instant::ZERO; nodes],
            incarnations: vec![1; nodes],
            members: (0..nodes).collect(),
            epoch: 1,
            due: vec![VecDeque::new(); nodes],
            partition: None,
            dead_since: vec![Instant::ZERO; nodes],
            events: 0,
            recovered: false,
            recovering: vec![false; nodes],
        }
    }

    pub(super) fn paused(&self, n: usize, now: Instant) -> bool {
        self.paused_until[n] > now
    }

    pub(super) fn next_view_at(&self) -> Option<Instant> {
        self.due.iter().filter_map(|q| q.front().map(|(at, _)| *at)).min()
    }

    fn view(&self, members: &BTreeSet<usize>, weights: &[u8], quorate: bool) -> View {
        let members = members
            .iter()
            .map(|&n| ViewMember { id: NodeId(n as u16 + 1), weight: weights[n], incarnation: self.incarnations[n] })
            .collect();
        View { epoch: self.epoch, members, quorate }
    }
}

impl Sim {
    /// The next time node `n`'s timers need it, if it runs.
    pub(super) fn timer_of(&self, n: usize) -> Option<Instant> {
        if !self.members.alive[n] {
            return None;
        }
        let at = self.nodes[n].poll_timeout()?;
        Some(at.max(self.members.paused_until[n]))
    }

    pub(super) fn weights(&self) -> Vec<u8> {
        let all = self.configs[0].membership.members();
        (0..self.nodes.len()).map(|n| all.get(n).map_or(1, |m| m.weight)).collect()
    }

    /// Hands `view` to each of `to`, after the layer's delay plus `after`.
    fn schedule_view(&mut self, to: &[usize], view: &View, after: Duration) {
        for &n in to {
            let delay = Duration::from_nanos(self.rng.below(VIEW_DELAY_MAX_NS));
            let earliest = self.members.due[n].back().map_or(Instant::ZERO, |(at, _)| *at);
            let at = self.now.saturating_add(after + delay).max(earliest);
            self.members.due[n].push_back((at, view.clone()));
        }
    }

    fn quorate(&self, members: usize) -> bool {
        members * 2 > self.nodes.len()
    }

    /// A view to every live member of the majority.
    fn announce(&mut self, after: Duration) {
        self.members.epoch += 1;
        let members = self.members.members.clone();
        let quorate = self.quorate(members.len());
        let view = self.members.view(&members, &self.weights(), quorate);
        let to: Vec<usize> = members.iter().copied().filter(|&n| self.members.alive[n]).collect();
        self.schedule_view(&to, &view, after);
    }

    fn recovering_anywhere(&self) -> bool {
        (0..self.nodes.len()).any(|n| self.members.alive[n] && self.nodes[n].recovery_status().is_some())
    }

    /// Starts or ends membership faults, now and then.
    pub(super) fn membership_tick(&mut self) -> Result<(), String> {
        if let Some((x, heal)) = self.members.partition
            && heal <= self.now
        {
            self.members.partition = None;
            if self.members.alive[x] {
                self.members.members.insert(x);
                self.announce(Duration::ZERO);
            }
        }
        if self.draining || !self.config.membership_faults {
            return Ok(());
        }
        if self.cpg.is_some() {
            return self.cpg_tick();
        }
        let (dead, restartable) = self.dead_and_restartable();
        if self.members.events >= EVENTS_MAX {
            // The faults are over: the dead come back, one at a time.
            if let Some(x) = restartable
                && self.members.next_view_at().is_none()
            {
                return self.restart(x);
            }
            return Ok(());
        }
        let views_pending = self.members.next_view_at().is_some();
        let during = self.recovering_anywhere();
        // A second failure while recovering, now and then.
        let chance = if during { 8 } else { 2 };
        if self.members.partition.is_some() || (views_pending && !during) || !self.rng.chance(chance) {
            return Ok(());
        }
        self.members.events += 1;
        if let Some(x) = restartable
            && (dead.len() > 1 || self.rng.chance(60))
        {
            return self.restart(x);
        }
        let live: Vec<usize> = self.members.members.iter().copied().filter(|&x| self.members.alive[x]).collect();
        if live.len() <= 1 {
            // The last member stays: a cluster with nobody left makes no progress.
            return Ok(());
        }
        let x = live[self.rng.below(live.len() as u64) as usize];
        if during {
            self.report.faults.during_recovery += 1;
        }
        match self.rng.below(10) {
            0..=3 => self.crash(x),
            4..=6 => self.cut_off(x),
            _ => {
                let pause = Duration::from_micros(200 + self.rng.below(2_500));
                self.members.paused_until[x] = self.now.saturating_add(pause);
                self.report.faults.pauses += 1;
                if during {
                    self.report.faults.during_recovery -= 1;
                }
                Ok(())
            }
        }
    }

    /// The dead nodes, and the first of them if it has been dead long
    /// enough to start again.
    fn dead_and_restartable(&self) -> (Vec<usize>, Option<usize>) {
        let dead: Vec<usize> = (0..self.nodes.len()).filter(|&x| !self.members.alive[x]).collect();
        let restartable = dead
            .first()
            .copied()
            .filter(|&x| self.members.dead_since[x].saturating_add(Duration::from_millis(3)) <= self.now);
        (dead, restartable)
    }

    /// The faults of the CPG model, now and then: an agent killed, a node
    /// crashed, a restart, a partition, a corosync frozen, a node paused
    /// (each stop either shorter than the lease's bound or past detection
    /// and the grace).
    fn cpg_tick(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        let (dead, restartable) = self.dead_and_restartable();
        if self.members.events >= EVENTS_MAX {
            if let Some(x) = restartable {
                return self.restart(x);
            }
            return Ok(());
        }
        let during = self.recovering_anywhere();
        if !self.rng.chance(if during { 8 } else { 2 }) {
            return Ok(());
        }
        self.members.events += 1;
        if let Some(x) = restartable
            && (dead.len() > 1 || self.rng.chance(50))
        {
            return self.restart(x);
        }
        let live: Vec<usize> = (0..n).filter(|&x| self.members.alive[x] && !self.members.paused(x, self.now)).collect();
        if live.len() <= 1 {
            return Ok(());
        }
        let x = live[self.rng.below(live.len() as u64) as usize];
        if during {
            self.report.faults.during_recovery += 1;
        }
        // A stop shorter than the lease's bound, or longer than detection
        // and the grace: a node that wakes into a newer view.
        let stop = if self.rng.chance(50) {
            Duration::from_micros(100 + self.rng.below(800))
        } else {
            Duration::from_micros(4_000 + self.rng.below(6_000))
        };
        match self.rng.below(12) {
            0..=1 => self.crash_as(x, false),
            2..=3 => self.crash_as(x, true),
            4..=6 => {
                if self.cpg.as_ref().is_some_and(|c| c.partition_heals.is_none()) {
                    self.cpg_partition();
                }
                Ok(())
            }
            7..=8 => {
                self.report.faults.freezes += 1;
                self.cpg_freeze(x, stop);
                Ok(())
            }
            _ => {
                self.report.faults.pauses += 1;
                self.cpg_pause(x, stop);
                Ok(())
            }
        }
    }

    /// Node `x` dies with everything it had; its clients die with it.
    fn crash(&mut self, x: usize) -> Result<(), String> {
        self.crash_as(x, true)
    }

    /// Node `x`'s agent dies (with its whole node when `node_down`), with
    /// everything it had; its clients die with it.
    fn crash_as(&mut self, x: usize, node_down: bool) -> Result<(), String> {
        self.report.faults.crashes += 1;
        self.members.alive[x] = false;
        self.members.recovering[x] = false;
        self.members.dead_since[x] = self.now;
        self.members.due[x].clear();
        for c in 0..self.clients.len() {
            if self.clients[c].node == x {
                let until = self.now.saturating_add(self.lockspace.lock_delay);
                for &(slot, resource) in &self.clients[c].slots {
                    if matches!(slot, Slot::Granted(Mode::Pw | Mode::Ex)) {
                        self.value_blocks.writer_died(resource, self.now);
                    }
                    if let Some(held) = belief(slot).filter(|_| until > self.now) {
                        self.ghosts.push((resource, held, until));
                    }
                }
                self.kill_client(c);
            }
        }
        if self.cpg.is_some() {
            self.cpg_gone(x, node_down);
        } else if self.members.members.remove(&x) {
            self.announce(Duration::ZERO);
        }
        Ok(())
    }

    fn kill_client(&mut self, c: usize) {
        let session = self.clients[c].session;
        self.owners.retain(|&(s, _), _| s != session);
        self.tokens.retain(|&(s, _), _| s != session);
        let client = &mut self.clients[c];
        client.slots.iter_mut().for_each(|slot| *slot = (Slot::Empty, 0));
        client.handles.clear();
        client.next_action = Instant::from_nanos(u64::MAX);
        // Dead, it believes nothing (the crash's ghosts stand for it).
        client.pause = None;
    }

    /// Node `x` starts again (a new incarnation, nothing of the old one) and joins.
    fn restart(&mut self, x: usize) -> Result<(), String> {
        self.report.faults.joins += 1;
        self.members.alive[x] = true;
        self.members.incarnations[x] += 1;
        self.members.paused_until[x] = Instant::ZERO;
        self.members.members.insert(x);
        let mut config = self.configs[x].clone();
        config.membership = if self.cpg.is_some() {
            self.cpg_restart(x)
        } else {
            let members = self.members.view(&self.members.members, &self.weights(), true).membership()?;
            Membership::new(members.members().to_vec(), 0)?
        };
        let mut node = ClusterNode::new(config)?;
        node.create_lockspace(LOCKSPACE, self.lockspace).map_err(|e| e.to_string())?;
        for c in 0..self.clients.len() {
            if self.clients[c].node != x {
                continue;
            }
            self.next_session += 1;
            let session = NodeId(x as u16 + 1).session(self.next_session);
            node.open_session(session).map_err(|e| e.to_string())?;
            let start = self.now.saturating_add(Duration::from_nanos(self.rng.below(1_000_000)));
            self.clients[c] = Client {
                node: x,
                session,
                slots: vec![(Slot::Empty, 0); 2],
                next_handle: 1,
                handles: std::collections::HashMap::new(),
                next_action: start,
                pause: None,
            };
        }
        self.report.paths.add(&self.nodes[x].stats());
        self.nodes[x] = node;
        if self.cpg.is_none() {
            self.announce(Duration::ZERO);
        }
        Ok(())
    }

    /// Node `x` is cut off from all others until the cut heals: it is handed
    /// a view without quorum at once, the others a view without it once the
    /// fence has acted.
    fn cut_off(&mut self, x: usize) -> Result<(), String> {
        self.report.faults.partitions += 1;
        let heal = self.now.saturating_add(Duration::from_micros(3_000 + self.rng.below(8_000)));
        for y in 0..self.nodes.len() {
            if y != x && !self.is_cut(x, y) {
                self.cuts.push((x.min(y), x.max(y), heal));
            }
        }
        self.members.partition = Some((x, heal));
        self.members.members.remove(&x);
        self.members.epoch += 1;
        let alone = self.members.view(&BTreeSet::from([x]), &self.weights(), false);
        self.schedule_view(&[x], &alone, Duration::ZERO);
        self.announce(FENCE_DELAY);
        Ok(())
    }

    /// Counts a recovery that node `n` has just finished.
    pub(super) fn note_recovery(&mut self, n: usize) {
        let now = self.nodes[n].recovery_status().is_some();
        if self.members.recovering[n] != now {
            self.log(1, || format!("node {} recovering {now}", n + 1));
        }
        if self.members.recovering[n] && !now {
            self.report.faults.recoveries += 1;
            self.members.recovered = true;
        }
        self.members.recovering[n] = now;
    }

    /// Hands out the views that are due.
    pub(super) fn deliver_views(&mut self) -> Result<(), String> {
        for n in 0..self.nodes.len() {
            while self.members.due[n].front().is_some_and(|(at, _)| *at <= self.now) {
                let (_, view) = self.members.due[n].pop_front().expect("front exists");
                if !self.members.alive[n] {
                    continue;
                }
                self.report.faults.views += 1;
                self.log(1, || format!("node {} view {view:?}", n + 1));
                self.nodes[n]
                    .handle_view(self.now, &view, |_| true)
                    .map_err(|e| format!("at {:?}: node {} refused view {}: {e}", self.elapsed(), n + 1, view.epoch))?;
                if self.nodes[n].is_fenced() {
                    self.report.faults.fenced += 1;
                }
                self.after(n)?;
            }
        }
        Ok(())
    }

    /// The drain begins: dead nodes start again and cuts heal, so that the
    /// run ends with every node a member.
    pub(super) fn end_membership_faults(&mut self) -> Result<(), String> {
        if !self.config.membership_faults {
            return Ok(());
        }
        if self.cpg.is_some() {
            self.cpg_end_faults();
        }
        if let Some((x, _)) = self.members.partition.take() {
            self.cuts.retain(|&(a, b, _)| a != x && b != x);
            self.members.members.insert(x);
            self.announce(Duration::ZERO);
        }
        for x in 0..self.nodes.len() {
            if !self.members.alive[x] {
                self.restart(x)?;
            }
        }
        Ok(())
    }

    /// No view is on its way, no cut is open, no node recovers or is fenced.
    pub(super) fn membership_settled(&self) -> bool {
        self.cpg.as_ref().is_none_or(cpg::CpgLayer::settled)
            && self.members.next_view_at().is_none()
            && self.members.partition.is_none()
            && (0..self.nodes.len()).all(|n| {
                !self.members.alive[n] || (self.nodes[n].recovery_status().is_none() && !self.nodes[n].is_fenced())
            })
    }

    /// What clients believe they hold never conflicts: two clients granted
    /// incompatible modes on one resource at once is the failure a lock
    /// manager exists to prevent. A lock being converted holds its granted
    /// mode (see [`Belief`]). A client of a crashed node holds nothing, but
    /// for the lock-delay after the crash nobody may be granted what
    /// conflicts with what it held; one of a node cut off holds what it was
    /// granted until its node fences and revokes it.
    pub(super) fn check_beliefs(&mut self) -> Result<(), String> {
        let now = self.now;
        self.ghosts.retain(|&(_, _, until)| until > now);
        let mut held: Vec<(u32, Belief, Option<usize>)> = Vec::new();
        for (c, client) in self.clients.iter().enumerate() {
            // A client on a node paused longer than the lock-delay cannot
            // act until it runs again, and its agent, whose lease lapsed,
            // revokes its locks before anything else then: beyond the
            // lock-delay only its fencing tokens protect what it writes.
            // (Woken and not run yet, it is still as good as paused.)
            let node = client.node;
            let asleep = self.members.paused(node, now) || self.woken_before_its_lapse(node);
            let slept =
                now.min(self.members.paused_until[node]).saturating_duration_since(self.members.paused_from[node]);
            if asleep && slept > self.lockspace.lock_delay {
                continue;
            }
            // A paused client still believes what it held when it stopped;
            // past the lock-delay, as above, only fencing tokens cover it.
            if let Some(pause) = client.pause.as_ref().filter(|p| p.until >= now) {
                if now.saturating_duration_since(pause.from) > self.lockspace.lock_delay {
                    continue;
                }
                held.extend(pause.held.iter().map(|&(resource, belief)| (resource, belief, Some(c))));
            }
            for &(slot, resource) in &client.slots {
                if let Some(belief) = belief(slot) {
                    held.push((resource, belief, Some(c)));
                }
            }
        }
        held.extend(self.ghosts.iter().map(|&(resource, belief, _)| (resource, belief, None)));
        held.sort_unstable_by_key(|&(r, _, c)| (r, c));
        let holder = |c: Option<usize>| match c {
            Some(c) => format!("a client of node {}", self.clients[c].node + 1),
            None => "a crashed node's client (within the lock-delay)".to_owned(),
        };
        for (i, &(r, a, c)) in held.iter().enumerate() {
            for &(r2, b, c2) in &held[i + 1..] {
                // (A paused client's belief and its lock now are one lock.)
                if r2 == r && (c.is_some() || c2.is_some()) && c != c2 && a.conflicts(b) {
                    return Err(format!(
                        "at {:?}: r{r} held {a:?} by {} and {b:?} by {}",
                        self.elapsed(),
                        holder(c),
                        holder(c2)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Once recovery is over everywhere: every lock a client believes it
    /// holds is in its master's queues, granted in that mode under the token
    /// the client was told.
    pub(super) fn check_recovered_locks(&mut self) -> Result<(), String> {
        if !self.members.recovered || !self.membership_settled() {
            return Ok(());
        }
        self.members.recovered = false;
        for client in &self.clients {
            let n = client.node;
            if !self.members.alive[n] {
                continue;
            }
            for (&handle, &s) in &client.handles {
                let Slot::Granted(mode) = client.slots[s].0 else { continue };
                let handle = crate::ids::LockHandle(handle);
                let master = self.nodes[n].remote_master(client.session, handle).map_or(n, |m| usize::from(m.0 - 1));
                let info = self.nodes[master].engine().lock_info(client.session, handle);
                let token = self.tokens.get(&(client.session, handle)).copied();
                let found = info.as_ref().map(|i| (i.granted, i.token.map(|t| t.0)));
                if found != Some((Some(mode), token)) {
                    return Err(format!(
                        "at {:?}: after recovery, {} {handle} held {mode:?} token {token:?} is {found:?} at node {}",
                        self.elapsed(),
                        client.session,
                        master + 1
                    ));
                }
            }
        }
        Ok(())
    }

    /// At the end: each mastership is in its directory node's entries, and
    /// each entry names a node that masters the resource.
    pub(super) fn check_directories(&self) -> Result<(), String> {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.members.alive[n]).collect();
        for &n in &live {
            for (_, name) in self.nodes[n].masterships() {
                let d = usize::from(self.nodes[n].config().membership.directory(LOCKSPACE, &name).0 - 1);
                let listed =
                    self.nodes[d].directory_entries().iter().any(|(_, e, m)| *e == name && m.0 as usize == n + 1);
                if !listed {
                    return Err(format!("node {} masters {name:?} but its directory node {} says not", n + 1, d + 1));
                }
            }
            for (_, name, master) in self.nodes[n].directory_entries() {
                let m = usize::from(master.0 - 1);
                if !self.nodes[m].masterships().iter().any(|(_, e)| *e == name) {
                    return Err(format!("node {} lists node {} as master of {name:?}, which it is not", n + 1, m + 1));
                }
            }
        }
        Ok(())
    }
}
