//! Directories the tests and benchmarks write in, under the system's
//! temporary directory.
//!
//! Each is removed when its owner drops it; one whose test panicked is kept
//! for inspection (its path printed). Whatever a run leaves behind — a kept
//! directory, a test binary killed by a timeout, a benchmark stopped with
//! Ctrl-C — the next run removes: every run of the test command on a machine
//! shares its `/tmp` with the runs before it, and a few hundred megabytes
//! left per run (an etcd's preallocated log, copies of the agent binary) fill
//! a disk in days.
//!
//! Every name is `dlm-test-<pid>-<tag>-<n>`: the pid of the process that
//! made it, so a later run can tell a dead run's directory from a live one's
//! (two test binaries run at once).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

/// The prefix of every scratch directory's name.
const PREFIX: &str = "dlm-test-";

/// A directory of a test's own, removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A new, empty directory; `tag` says whose it is in its name.
    ///
    /// # Panics
    /// The directory cannot be made.
    pub fn new(tag: &str) -> Scratch {
        static SWEPT: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        SWEPT.call_once(sweep_dead_runs);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{PREFIX}{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot make {}: {e}", path.display()));
        Scratch { path }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection (the next run removes it): {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes what runs that have ended left in the temporary directory: the
/// scratch directories (and files) named for a process that no longer runs.
/// A pid used again since keeps its directory until the next sweep after
/// that process ends: never a live run's.
fn sweep_dead_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner) else { continue };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
}

/// The pid a scratch name was made for, if `name` is one.
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scratch_names_have_an_owner() {
        assert_eq!(owner("dlm-test-1234-agent-0"), Some(1234));
        assert_eq!(owner("dlm-test-1234-x"), Some(1234));
        assert_eq!(owner("dlm-test-config-1234"), None);
        assert_eq!(owner("dlm-memory-1234-copies"), None);
        assert_eq!(owner("dlm-test-1234"), None);
    }

    #[test]
    fn a_dead_runs_directory_goes_and_a_live_ones_stays() {
        // Above the kernel's largest pid (2^22): never a process's. The test's
        // own pid is alive.
        let dead = std::env::temp_dir().join(format!("{PREFIX}{}-swept-0", u32::MAX - 1));
        let live = Scratch::new("kept");
        std::fs::create_dir_all(dead.join("inside")).unwrap();
        sweep_dead_runs();
        assert!(!dead.exists(), "a dead run's directory stayed");
        assert!(live.exists(), "a live run's directory was removed");
        let path = live.to_path_buf();
        drop(live);
        assert!(!path.exists(), "dropped, the directory stayed");
    }
}
