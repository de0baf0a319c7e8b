//! The agent's generation: a number kept on disk (`<state_dir>/generation`)
//! and raised at every start, before any lock is granted. Fencing tokens of
//! generation `g` start above `g << 40` ([`token_floor`]), so a restarted
//! agent, whose lockspaces start again from nothing, never hands out a
//! token at or below one it handed out before, whether it stopped cleanly
//! or was killed. One write (and fsync) per start; nothing on the lock path.
//!
//! With corosync membership, tokens of epoch `e` start above `e << 40`
//! too, and the agreed epochs start again after a restart of the whole
//! cluster. So the membership records each view's epoch here ([`record`])
//! before the view is taken, and the agent reports its generation as the
//! epoch it last agreed to: the first view after any restart is later than
//! every epoch a member of it took before. (Any two quorate views share a
//! member, so the epoch of the last quorate view before the restart is
//! known to the first one after it.)
//!
//! A generation has 2^40 tokens before the next one's floor: at 10^5
//! grants a second, 127 days of uptime. The file is text (`generation N`);
//! a file that does not parse stops the start rather than being reset,
//! since a reset would let tokens go back.

use std::io::Write as _;
use std::path::Path;

use dlm_core::cluster::{TOKEN_EPOCH_SHIFT, TOKEN_LIMIT};

/// The file's name in the state directory.
pub const FILE: &str = "generation";

/// The highest generation: its floor must leave the token space room.
pub const GENERATION_MAX: u64 = (TOKEN_LIMIT >> TOKEN_EPOCH_SHIFT) - 1;

/// Every token of `generation` is above this.
#[must_use]
pub fn token_floor(generation: u64) -> u64 {
    generation.min(GENERATION_MAX) << TOKEN_EPOCH_SHIFT
}

/// Reads the generation in `dir` (0 if there is none yet), writes the next
/// one durably (a new file, synced, renamed over the old, the directory
/// synced), and returns it.
///
/// # Errors
/// The directory cannot be made or written, the file does not parse, or
/// the generations are used up; the message names the file.
pub fn advance(dir: &Path) -> Result<u64, String> {
    let path = dir.join(FILE);
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).ok_or_else(|| {
            format!(
                "{}: not a generation (\"generation N\"); it keeps fencing tokens growing across restarts, \
                 so it is not reset: restore it, or remove it only if no client keeps tokens",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(at(e)),
    };
    let next = previous + 1;
    if next > GENERATION_MAX {
        return Err(format!("{}: generation {previous} is the last one", path.display()));
    }
    write(dir, next)?;
    Ok(next)
}

/// Raises the generation in `dir` to `epoch` (if it is lower), durably:
/// called before a view of that epoch is taken.
///
/// # Errors
/// The file cannot be read, parsed or written.
pub fn record(dir: &Path, epoch: u64) -> Result<(), String> {
    let path = dir.join(FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let current = parse(&text).ok_or_else(|| format!("{}: not a generation", path.display()))?;
    if epoch > current {
        write(dir, epoch.min(GENERATION_MAX))?;
    }
    Ok(())
}

/// Writes `generation` durably: a new file, synced, renamed over the old,
/// the directory synced.
fn write(dir: &Path, generation: u64) -> Result<(), String> {
    let path = dir.join(FILE);
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let temporary = dir.join(format!("{FILE}.new.{}", std::process::id()));
    let mut file = std::fs::File::create(&temporary).map_err(at)?;
    file.write_all(format!("generation {generation}\n").as_bytes()).map_err(at)?;
    file.sync_all().map_err(at)?;
    std::fs::rename(&temporary, &path).map_err(at)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))
}

fn parse(text: &str) -> Option<u64> {
    text.trim().strip_prefix("generation ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_takes_the_next_generation_and_a_broken_file_stops_the_start() {
        let dir = std::env::temp_dir().join(format!("dlm-generation-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(advance(&dir), Ok(1));
        assert_eq!(advance(&dir), Ok(2));
        assert_eq!(std::fs::read_to_string(dir.join(FILE)).expect("file"), "generation 2\n");
        assert!(token_floor(2) > token_floor(1) + (1 << 39));
        std::fs::write(dir.join(FILE), "garbage").expect("write");
        assert!(advance(&dir).unwrap_err().contains("not reset"));
        std::fs::write(dir.join(FILE), format!("generation {GENERATION_MAX}")).expect("write");
        assert!(advance(&dir).unwrap_err().contains("last one"));
        assert!(token_floor(GENERATION_MAX) < TOKEN_LIMIT);
        // A view's epoch raises it; an older one does not lower it.
        std::fs::write(dir.join(FILE), "generation 3\n").expect("write");
        record(&dir, 10).expect("recorded");
        record(&dir, 4).expect("recorded");
        assert_eq!(advance(&dir), Ok(11));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
