//! The squeeze of `memory.rs`: hogs that fill a memory cgroup until the
//! kernel OOM-kills them, a thrasher whose evicted pages are read again
//! (what the kernel counts as memory pressure), sessions locking while
//! they run, and the pressure and round trips a squeeze measured.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dlm_agent::client::{LockOptions, Session};
use dlm_core::Mode;
use support::LowMemoryCgroup;

/// Takes memory, 1 MiB at a time, until the cgroup is at its limit and has
/// at most 1 MiB of file pages it could reclaim (`inactive_file +
/// active_file`: resident processes' pages are `unevictable`) beyond the
/// room it is told to leave them (its third argument, in bytes), and keeps
/// checking: every page an agent reads back is then taken again. Nothing
/// else can go without swap, so with no room left the agents' code is what
/// the kernel reclaims. Its OOM score is the highest: when the cgroup runs
/// out, the hog is the one killed.
const HOG: &str = r"
import os, sys, time
open('/proc/self/oom_score_adj', 'w').write('1000')
cgroup, seconds, room = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
MIB = 1 << 20
def read(name):
    return int(open(os.path.join(cgroup, name)).read())
limit = read('memory.limit_in_bytes')
def reclaimable():
    stat = dict(line.split() for line in open(os.path.join(cgroup, 'memory.stat')))
    return int(stat['inactive_file']) + int(stat['active_file'])
held, end = [], time.time() + seconds
while time.time() < end:
    while read('memory.usage_in_bytes') - reclaimable() < limit - room - MIB:
        held.append(b'\x01' * MIB)
    time.sleep(0.005)
";

/// Reads a file over and over, 8 MiB at a time in an order shuffled once,
/// through two read-only mappings of it, until its time is up, and prints
/// how many pages it touched. The hogs leave it [`THRASHER_ROOM`], a little
/// less than the file: a chunk is always evicted before its turn comes
/// again, so every read faults and waits for storage. The kernel counts
/// such a wait as a memory stall (PSI) only if the page was in active use
/// when it was evicted and comes back soon after (a workingset refault):
/// each page is touched through both mappings, and a page two page-table
/// entries reference is kept active at reclaim's first look, where a page
/// touched once is evicted as never used; and the file exceeds the room by
/// little, so the pages come back soon. Chunks of 8 MiB, every page
/// touched, use all that a fault reads around it (up to `read_ahead_kb`,
/// 8 MiB on this VM). The file's pages are dropped first (they may still be
/// cached from its writing, charged elsewhere). Its OOM score is the
/// highest too: the agent is never the one killed.
const THRASHER: &str = r"
import mmap, os, random, sys, time
open('/proc/self/oom_score_adj', 'w').write('1000')
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
size = os.fstat(fd).st_size
CHUNK, PAGE = 8 << 20, 4096
one = mmap.mmap(fd, size, prot=mmap.PROT_READ)
two = mmap.mmap(fd, size, prot=mmap.PROT_READ)
order = list(range(size // CHUNK))
random.shuffle(order)
end, touched, next = time.time() + seconds, 0, 0
while time.time() < end:
    at = order[next % len(order)] * CHUNK
    next += 1
    one[at:at + CHUNK:PAGE]
    two[at:at + CHUNK:PAGE]
    touched += CHUNK // PAGE
print(touched)
";

/// The size of the file the thrasher reads.
pub const THRASHED_FILE: usize = 256 << 20;

/// The room the hogs leave the thrasher's file pages: 32 MiB less than the
/// file. Measured outside the test (the hog and thrasher alone in a 384-MiB
/// cgroup, 30 s each), the cgroup's full pressure was 74 % with this room,
/// 39 % with 192 MiB and 31 % with 128 MiB: with more room missing, pages
/// come back too late to count as thrashing.
const THRASHER_ROOM: usize = THRASHED_FILE - (32 << 20);

/// Writes a file of `size` bytes to storage (flushed, so that its pages
/// can be dropped) for the thrasher to read.
pub fn file_on_storage(path: &Path, size: usize) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("the thrasher's file");
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for _ in 0..size / block.len() {
        file.write_all(&block).expect("the thrasher's file written");
    }
    file.sync_all().expect("the thrasher's file flushed");
}

/// How often a squeeze's sessions lock: a pair at most every millisecond,
/// so that the agent is idle between them, as on a node with other work.
/// The kernel counts full memory pressure only while every task of the
/// cgroup is stalled at once, and an agent kept busy by sessions locking
/// back to back is seldom stalled: in one run each of `memory.rs`'s node tests,
/// the squeezed nodes' full pressure was 23.0 % and 23.6 % with them,
/// 25.5 % and 26.0 % paced.
const LOCK_EVERY: Duration = Duration::from_millis(1);

/// Locks and unlocks in `session` until `end`, a pair every [`LOCK_EVERY`]
/// (at once if the last one took longer), returning each round trip and
/// each request that failed (with when, since the start): a failure does
/// not end the run, so that the test says how many there were.
pub async fn lock_until(session: &Session, end: Instant) -> (Vec<Duration>, Vec<String>) {
    let (mut times, mut failed) = (Vec::new(), Vec::new());
    let began = Instant::now();
    let mut every = tokio::time::interval(LOCK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        every.tick().await;
        let start = Instant::now();
        let outcome = match session.lock("default", "r", Mode::Ex, LockOptions::default()).await {
            Ok(guard) => guard.unlock().await.map_err(|e| format!("unlock: {e:?}")),
            Err(e) => Err(format!("lock: {e:?}")),
        };
        match outcome {
            Ok(()) => times.push(start.elapsed()),
            Err(e) => {
                failed.push(format!("{e} at {:?}", began.elapsed()));
                // A node that fenced itself refuses at once: no hot loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (times, failed)
}

/// What a squeeze did: the round trips of two sessions locking while it
/// ran and their requests that failed, the hogs started and killed, the
/// times the cgroup's limit was hit, and the memory stalls.
pub struct Squeeze {
    pub first: Vec<Duration>,
    pub second: Vec<Duration>,
    pub failed: Vec<String>,
    pub hogs: u32,
    pub killed: u32,
    pub failures: u64,
    pub pressure: Pressure,
    /// Pages the thrasher touched, if one ran.
    pub thrashed: Option<u64>,
}

/// The share of a squeeze's time that some or all tasks stalled on memory,
/// from the pressure totals taken before and after: the machine's
/// (`/proc/pressure/memory`, which every node of the cluster tests shares)
/// and the squeezed cgroup's own (its processes only: the squeezed node's).
#[derive(Debug, Default)]
pub struct Pressure {
    pub machine: Shares,
    pub cgroup: Option<Shares>,
}

/// `some` and `full` as shares of a time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shares {
    pub some: f64,
    pub full: f64,
}

impl Shares {
    fn between(before: (u64, u64), after: (u64, u64), elapsed: Duration) -> Shares {
        let elapsed = elapsed.as_micros() as f64;
        Shares { some: (after.0 - before.0) as f64 / elapsed, full: (after.1 - before.1) as f64 / elapsed }
    }
}

impl std::fmt::Display for Shares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "some {:.1} %, full {:.1} % of the time", self.some * 100.0, self.full * 100.0)
    }
}

/// The machine's memory stall totals, if the kernel has PSI.
fn machine_stalls() -> Option<(u64, u64)> {
    support::memory_stall_totals(Path::new("/proc/pressure/memory"))
}

/// Squeezes `cgroup` for `time` while `first` and `second` lock; with a
/// thrasher reading the file `thrashed` in the cgroup too, if given.
pub async fn squeeze(
    cgroup: &LowMemoryCgroup,
    first: &Session,
    second: &Session,
    time: Duration,
    thrashed: Option<&Path>,
) -> Squeeze {
    let failures = cgroup.value("memory.failcnt");
    let stalls = (machine_stalls(), cgroup.stalls());
    let began = Instant::now();
    let end = began + time;
    let (enter, dir) = (cgroup.enter(), cgroup.path().to_path_buf());
    // `DLM_SQUEEZE_HOGS=0` by hand: the same run with no hog, to tell
    // what the squeeze does from what the load does.
    let hogs_on = std::env::var("DLM_SQUEEZE_HOGS").map_or(true, |v| v != "0");
    let thrasher = thrashed.map(|file| {
        let (enter, file) = (enter.clone(), file.to_path_buf());
        std::thread::spawn(move || thrash_until(&enter, &file, end))
    });
    // With a thrasher, the hogs leave its file room to thrash in.
    let room = if thrashed.is_some() { THRASHER_ROOM } else { 0 };
    let hogs = std::thread::spawn(move || if hogs_on { squeeze_until(&enter, &dir, room, end) } else { (0, 0) });
    let ((first, mut failed), (second, failed_too)) = tokio::join!(lock_until(first, end), lock_until(second, end));
    failed.extend(failed_too);
    let (hogs, killed) = hogs.join().expect("the hogs' waiter");
    let thrashed = thrasher.map(|t| t.join().expect("the thrasher's waiter"));
    let elapsed = began.elapsed();
    let share = |before: Option<(u64, u64)>, after| Some(Shares::between(before?, after?, elapsed));
    let pressure = Pressure {
        machine: share(stalls.0, machine_stalls()).unwrap_or_default(),
        cgroup: share(stalls.1, cgroup.stalls()),
    };
    let failures = cgroup.value("memory.failcnt") - failures;
    Squeeze { first, second, failed, hogs, killed, failures, pressure, thrashed }
}

/// Runs the thrasher on `file` in the cgroup until `end`, again if it was
/// killed; returns the pages it touched.
fn thrash_until(enter: &str, file: &Path, end: Instant) -> u64 {
    let mut read = 0;
    while Instant::now() < end {
        let output =
            python_in(enter, THRASHER, file, end).stderr(Stdio::null()).output().expect("python3 for the thrasher");
        read += String::from_utf8_lossy(&output.stdout).trim().parse::<u64>().unwrap_or(0);
    }
    read
}

/// Runs hogs in the cgroup, one after the other, until `end`: each fills
/// the cgroup but for `room` bytes of file pages; with no room, until the
/// kernel has reclaimed all it can and kills the hog (the highest OOM
/// score), and the next one starts at once. Returns how many ran and how
/// many were killed.
fn squeeze_until(enter: &str, dir: &Path, room: usize, end: Instant) -> (u32, u32) {
    let (mut started, mut killed) = (0, 0);
    while Instant::now() < end {
        let status = python_in(enter, HOG, dir, end)
            .arg(room.to_string())
            .stdout(Stdio::null())
            .status()
            .expect("python3 for the hog");
        started += 1;
        killed += u32::from(std::os::unix::process::ExitStatusExt::signal(&status) == Some(9));
    }
    (started, killed)
}

/// The Python `script` run in the cgroup (`enter`, a shell command), given
/// `path` and the seconds left until `end`.
fn python_in(enter: &str, script: &str, path: &Path, end: Instant) -> Command {
    let seconds = end.saturating_duration_since(Instant::now()).as_secs_f64();
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!("{enter} && exec python3 -c \"$0\" \"$@\"")).args([
        script,
        &path.display().to_string(),
        &seconds.to_string(),
    ]);
    command
}
