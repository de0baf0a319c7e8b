//! Memory cgroups that squeeze the processes put in them, and the memory
//! pressure the kernel counts for them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A memory cgroup with a low limit, removed when dropped.
///
/// On a machine whose memory controller is cgroup v1's, with the v2
/// hierarchy mounted beside it (`/sys/fs/cgroup/unified`, systemd's hybrid
/// layout), the processes also join a v2 cgroup of the same name: v1 keeps
/// no pressure figures per cgroup, and the kernel accounts every task's
/// memory stalls to its v2 cgroup whatever controllers that hierarchy has.
/// So the cgroup's own pressure stall information can be read
/// ([`LowMemoryCgroup::stalls`]), not only the whole machine's.
pub struct LowMemoryCgroup {
    path: PathBuf,
    /// The v2 cgroup whose `memory.pressure` is this one's: `path` itself
    /// on cgroup v2, a companion on v1 (if the v2 hierarchy is mounted).
    pressure: Option<PathBuf>,
}

/// Where cgroup v2 is mounted beside v1 (hybrid) or alone.
const UNIFIED: &str = "/sys/fs/cgroup/unified";

impl LowMemoryCgroup {
    /// A new cgroup limited to `limit` bytes, if the memory controller allows it.
    pub fn create(tag: &str, limit: u64) -> Option<LowMemoryCgroup> {
        let name = format!("dlm-test-{}-{tag}", std::process::id());
        // cgroup v1 memory controller, then v2.
        for (root, limit_file) in [("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), (UNIFIED, "memory.max")] {
            let path = Path::new(root).join(&name);
            if std::fs::create_dir(&path).is_ok() {
                if std::fs::write(path.join(limit_file), limit.to_string()).is_ok() {
                    let pressure = if root == UNIFIED {
                        Some(path.clone())
                    } else {
                        let companion = Path::new(UNIFIED).join(&name);
                        std::fs::create_dir(&companion).is_ok().then_some(companion)
                    };
                    return Some(LowMemoryCgroup { path, pressure });
                }
                let _ = std::fs::remove_dir(&path);
            }
        }
        None
    }

    /// The memory cgroup's directory (its limit, usage and statistics).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's directories: the memory cgroup, and its pressure
    /// companion if it has one.
    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.path).chain(self.pressure.iter().filter(|p| **p != self.path))
    }

    /// A shell command that moves the shell running it (`$$`) into the
    /// cgroup (and its pressure companion).
    pub fn enter(&self) -> String {
        let moves: Vec<String> =
            self.dirs().map(|dir| format!("echo $$ > {}", dir.join("cgroup.procs").display())).collect();
        moves.join(" && ")
    }

    /// Moves process `pid` into the cgroup (and its pressure companion).
    ///
    /// # Panics
    /// The kernel refuses the move.
    pub fn join(&self, pid: u32) {
        for dir in self.dirs() {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
        }
    }

    /// The `some` and `full` totals (µs) of the memory stalls of the
    /// cgroup's own processes, if the kernel keeps them for it.
    pub fn stalls(&self) -> Option<(u64, u64)> {
        memory_stall_totals(&self.pressure.as_ref()?.join("memory.pressure"))
    }

    /// A number the controller reports (`memory.failcnt`, …), 0 if unread.
    pub fn value(&self, file: &str) -> u64 {
        std::fs::read_to_string(self.path.join(file)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// Runs `script` with sh inside the cgroup and waits for it.
    pub fn run(&self, script: &str) -> std::process::ExitStatus {
        Command::new("sh")
            .arg("-c")
            .arg(format!("{} && {script}", self.enter()))
            .stderr(Stdio::null())
            .status()
            .expect("sh")
    }
}

/// A pressure file's (`/proc/pressure/memory`, a v2 cgroup's
/// `memory.pressure`) `some` and `full` totals, in µs.
pub fn memory_stall_totals(file: &Path) -> Option<(u64, u64)> {
    let pressure = dlm_agent::psi::parse(&std::fs::read_to_string(file).ok()?)?;
    Some((pressure.some.total_us, pressure.full?.total_us))
}

impl Drop for LowMemoryCgroup {
    fn drop(&mut self) {
        // Processes must leave first; ours have exited. Retry briefly while
        // the kernel finishes uncharging.
        for dir in self.dirs() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
