//! Deadlock detection over a wait-for graph between sessions.
//!
//! A session waits for another when one of its pending requests cannot be
//! granted before a lock of the other changes: one granted in an incompatible
//! mode, or a request ahead of it in queue order (see `Lockspace::wait_edges`). A cycle means none of its sessions can proceed
//! unless one gives up, so one request on the cycle is failed with
//! [`crate::Status::Deadlock`].
//!
//! **Victim rule:** the request on the cycle that started waiting last (the
//! highest wait sequence number): it has waited least, and it is usually the
//! one that closed the cycle. The rule needs only the edges, so it works the
//! same when the edges come from several masters in a cluster.
//!
//! A session waiting for its own lock is not a cycle: the session can still
//! release that lock (clients are asynchronous), so such a request simply
//! waits. Orphans are not in the graph: they never release, but they wait
//! for nothing either, so they cannot close a cycle.
//!
//! Searches start from the sessions that gained an edge in an event (a
//! request was queued, or a lock was granted while others wait on its
//! resource): any new cycle passes through one of them. A search visits at
//! most `Limits::deadlock_search_sessions_max` sessions; past that, a full
//! scan runs `NodeConfig::deadlock_rescan_delay` later.
//!
//! The search is generic over [`WaitForGraph`], so a cluster can feed it
//! edges gathered from other nodes as well as local ones.

// hashbrown's maps, as the rest of the core: a search runs after every
// hand-off of a contended lock, and std's SipHash showed in the agent's
// profile there (side by side the change was within the runs' noise). The
// search only looks keys up, never iterates, so the hasher changes no result.
use hashbrown::{HashMap, HashSet};

use crate::ids::{LockspaceId, SessionId};

/// A pending request that makes its session wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WaitRef {
    /// The lockspace of the waiting lock.
    pub lockspace: LockspaceId,
    /// The waiting lock (an engine-internal index).
    pub lock: u32,
    /// When it started waiting: larger is younger.
    pub seq: u64,
}

/// The lock that makes a wait wait, as it is for one episode: a lock that
/// is granted anew (a new token) or waits anew (a new sequence number), or a
/// lock that took over its index, is another blocker. An edge that names the
/// same wait and the same blocker at two moments existed all along between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Blocker {
    /// The blocking lock (an engine-internal index).
    pub lock: u32,
    /// The fencing token of its latest grant (0 before the first).
    pub token: u64,
    /// The sequence number of its latest wait.
    pub seq: u64,
}

/// An edge of the wait-for graph: the session it leaves waits, through
/// `wait`, for session `to`, whose lock `blocker` is in the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    /// The session waited for.
    pub to: SessionId,
    /// The waiting request.
    pub wait: WaitRef,
    /// The lock of `to` in the way.
    pub blocker: Blocker,
}

/// A source of wait-for edges.
pub trait WaitForGraph {
    /// Appends the edges out of `session` to `edges`.
    fn edges_from(&self, session: SessionId, edges: &mut Vec<Edge>);
}

/// The outcome of a search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Search {
    /// No cycle is reachable from the roots.
    NoCycle,
    /// The waits that form a cycle, in the order of the cycle.
    Cycle(Vec<WaitRef>),
    /// The search visited its budget of sessions without finishing.
    BudgetExhausted,
}

/// Looks for a cycle reachable from any of `roots`, visiting at most `budget`
/// sessions. Depth-first with the usual three colours; a session fully
/// explored from one root is not explored again from another. A caller that
/// searches often keeps a [`Searcher`] instead (no allocation per search).
pub fn find_cycle(graph: &impl WaitForGraph, roots: &[SessionId], budget: u32) -> Search {
    Searcher::default().find_cycle(graph, roots, budget)
}

/// The memory of [`find_cycle`], kept between searches: a node searches
/// after every event that queues a request or grants one while others
/// wait (every hand-off of a contended lock), and allocating the maps and
/// each visited session's edges anew each time showed in the agent's
/// profile. What one search leaves is cleared by the next.
#[derive(Default)]
pub struct Searcher {
    /// Sessions fully explored.
    done: HashSet<SessionId>,
    /// Sessions on the current path, with their depth.
    on_path: HashMap<SessionId, usize>,
    /// The current path.
    path: Vec<Frame>,
    /// The edges out of the path's sessions, each frame's after its
    /// parent's (a stack: a frame's are dropped when it is).
    edges: Vec<Edge>,
}

/// A session on the current path.
struct Frame {
    session: SessionId,
    /// Where its edges start in [`Searcher::edges`] (they run to the next
    /// frame's start, or to the end for the last frame).
    edges_start: usize,
    /// Its next edge to follow.
    next: usize,
    /// The edge this frame was entered by (none for a root).
    entered_by: Option<Edge>,
}

impl Searcher {
    /// [`find_cycle`], with this searcher's memory.
    pub fn find_cycle(&mut self, graph: &impl WaitForGraph, roots: &[SessionId], budget: u32) -> Search {
        self.done.clear();
        self.on_path.clear();
        self.path.clear();
        self.edges.clear();
        let mut visited = 0u32;
        for &root in roots {
            if self.done.contains(&root) {
                continue;
            }
            self.enter(graph, root, None);
            visited += 1;
            while let Some(frame) = self.path.last_mut() {
                // The last frame's edges run to the end of the stack.
                if frame.next == self.edges.len() {
                    let frame = self.path.pop().expect("non-empty path");
                    self.edges.truncate(frame.edges_start);
                    self.on_path.remove(&frame.session);
                    self.done.insert(frame.session);
                    continue;
                }
                let edge = self.edges[frame.next];
                frame.next += 1;
                if let Some(&depth) = self.on_path.get(&edge.to) {
                    let mut cycle: Vec<WaitRef> =
                        self.path[depth + 1..].iter().filter_map(|f| f.entered_by.map(|e| e.wait)).collect();
                    cycle.push(edge.wait);
                    return Search::Cycle(cycle);
                }
                if self.done.contains(&edge.to) {
                    continue;
                }
                if visited >= budget {
                    return Search::BudgetExhausted;
                }
                visited += 1;
                self.enter(graph, edge.to, Some(edge));
            }
        }
        Search::NoCycle
    }

    /// Puts `session` on the path, with its edges.
    fn enter(&mut self, graph: &impl WaitForGraph, session: SessionId, entered_by: Option<Edge>) {
        let edges_start = self.edges.len();
        graph.edges_from(session, &mut self.edges);
        self.on_path.insert(session, self.path.len());
        self.path.push(Frame { session, edges_start, next: edges_start, entered_by });
    }
}

/// The request to fail on a cycle: the youngest wait.
#[must_use]
pub fn victim(cycle: &[WaitRef]) -> Option<WaitRef> {
    cycle.iter().copied().max_by_key(|wait| wait.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Graph(Vec<(u64, u64, u64)>);

    impl WaitForGraph for Graph {
        fn edges_from(&self, session: SessionId, edges: &mut Vec<Edge>) {
            for &(from, to, seq) in &self.0 {
                if from == session.0 {
                    edges.push(Edge {
                        to: SessionId(to),
                        wait: WaitRef { lockspace: LockspaceId(0), lock: seq as u32, seq },
                        blocker: Blocker { lock: 0, token: 0, seq: 0 },
                    });
                }
            }
        }
    }

    fn seqs(search: Search) -> Vec<u64> {
        match search {
            Search::Cycle(waits) => waits.iter().map(|w| w.seq).collect(),
            other => panic!("expected a cycle, got {other:?}"),
        }
    }

    #[test]
    fn finds_a_two_session_cycle() {
        let graph = Graph(vec![(1, 2, 10), (2, 1, 11)]);
        assert_eq!(seqs(find_cycle(&graph, &[SessionId(1)], 100)), vec![10, 11]);
    }

    #[test]
    fn finds_a_cycle_not_through_the_root() {
        let graph = Graph(vec![(1, 2, 1), (2, 3, 2), (3, 4, 3), (4, 2, 4)]);
        assert_eq!(seqs(find_cycle(&graph, &[SessionId(1)], 100)), vec![2, 3, 4]);
    }

    #[test]
    fn a_diamond_is_not_a_cycle() {
        let graph = Graph(vec![(1, 2, 1), (1, 3, 2), (2, 4, 3), (3, 4, 4)]);
        assert_eq!(find_cycle(&graph, &[SessionId(1), SessionId(3)], 100), Search::NoCycle);
    }

    #[test]
    fn the_budget_bounds_the_search() {
        let chain: Vec<_> = (0..100).map(|i| (i, i + 1, i)).collect();
        assert_eq!(find_cycle(&Graph(chain), &[SessionId(0)], 10), Search::BudgetExhausted);
    }

    #[test]
    fn a_searcher_kept_between_searches_finds_what_a_fresh_one_does() {
        // Each search left midway (a cycle found, the budget spent) must
        // leave nothing that changes the next one.
        let graphs = [
            (Graph(vec![(1, 2, 1), (2, 3, 2), (3, 4, 3), (4, 2, 4)]), vec![SessionId(1)], 100),
            (Graph((0..100).map(|i| (i, i + 1, i)).collect()), vec![SessionId(0)], 10),
            (Graph(vec![(1, 2, 1), (1, 3, 2), (2, 4, 3), (3, 4, 4)]), vec![SessionId(1), SessionId(3)], 100),
            (Graph(vec![(1, 2, 10), (2, 1, 11)]), vec![SessionId(2)], 100),
            (Graph(vec![(5, 6, 1), (6, 7, 2), (7, 5, 3), (1, 5, 4)]), vec![SessionId(1), SessionId(6)], 100),
        ];
        let mut kept = Searcher::default();
        for _ in 0..2 {
            for (graph, roots, budget) in &graphs {
                assert_eq!(kept.find_cycle(graph, roots, *budget), find_cycle(graph, roots, *budget));
            }
        }
    }

    #[test]
    fn the_victim_is_the_youngest_wait() {
        let cycle = [
            WaitRef { lockspace: LockspaceId(0), lock: 0, seq: 5 },
            WaitRef { lockspace: LockspaceId(0), lock: 1, seq: 9 },
            WaitRef { lockspace: LockspaceId(0), lock: 2, seq: 7 },
        ];
        assert_eq!(victim(&cycle).map(|w| w.seq), Some(9));
    }
}
