//! The agent's generation: a number kept on disk (`<state_dir>/generation`)
//! and raised at every start, before any lock is granted. Fencing tokens of
//! generation `g` start above `g << 40` ([`token_floor`]), so a restarted
//! agent, whose lockspaces start again from nothing, never hands out a
//! token at or below one it handed out before, whether it stopped cleanly
//! or was killed. One write (and fsync) per start; nothing on the lock path.
//!
//! With corosync membership, tokens of epoch `e` start above `e << 40`
//! too, and the agreed epochs start again after a restart of the whole
//! cluster. So the membership records each view's epoch here ([`raise`])
//! before the view is taken, and the agent reports its generation as the
//! epoch it last agreed to: the first view after any restart is later than
//! every epoch a member of it took before. (Any two quorate views share a
//! member, so the epoch of the last quorate view before the restart is
//! known to the first one after it.)
//!
//! A generation has 2^40 tokens before the next one's floor (at 10^5
//! grants a second, 127 days). An agent that runs longer moves on by itself:
//! [`keep`] looks at the node's highest token every second and raises
//! the generation on disk once that token is half-way through it, so the
//! next start's floor is always above every token handed out.
//!
//! The file is text (`generation N`); a file that does not parse stops the
//! start rather than being reset, since a reset would let tokens go back.
//!
//! This is part 3 (and, for epochs, part of 6) of the story of why fencing
//! tokens never go back, told whole in [`dlm_core::tokens`].

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use dlm_core::cluster::{TOKEN_EPOCH_SHIFT, TOKEN_LIMIT};

/// The file's name in the state directory.
pub const FILE: &str = "generation";

/// The highest generation: its floor must leave the token space room.
pub const GENERATION_MAX: u64 = (TOKEN_LIMIT >> TOKEN_EPOCH_SHIFT) - 1;

/// How often [`keep`] looks at the node's highest token.
const KEEP_EVERY: Duration = Duration::from_secs(1);

/// How far ahead of the highest token the generation on disk is kept: far
/// more tokens than can be granted between two looks of [`keep`].
const KEEP_AHEAD: u64 = 1 << (TOKEN_EPOCH_SHIFT - 1);

/// One writer of the file at a time (the membership's epochs and [`keep`]).
static WRITING: Mutex<()> = Mutex::new(());

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

/// Raises the generation in `dir` to `generation` (if it is lower),
/// durably: before a view of that epoch is taken, or as tokens grow ([`keep`]).
///
/// # Errors
/// The file cannot be read, parsed or written.
pub fn raise(dir: &Path, generation: u64) -> Result<(), String> {
    let _writing = WRITING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = dir.join(FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let current = parse(&text).ok_or_else(|| format!("{}: not a generation", path.display()))?;
    if generation > current {
        write(dir, generation.min(GENERATION_MAX))?;
    }
    Ok(())
}

/// The generation the file must hold while the node's highest token is
/// `highest`: the next start's floor ([`token_floor`] of one more) is then
/// above `highest` with [`KEEP_AHEAD`] tokens to spare.
#[must_use]
pub fn needed(highest: u64) -> u64 {
    highest.saturating_add(KEEP_AHEAD) >> TOKEN_EPOCH_SHIFT
}

/// Keeps the generation on disk ahead of the tokens the node hands out,
/// from `kept`, the one this start wrote. Each second, `highest` tells the
/// node's highest token (the server asks the driver: this module is a
/// leaf), until it says `None` (the driver has stopped). A failed write is
/// logged and tried again. The file is touched only when it must grow:
/// nothing is written, and no blocking thread started, while the tokens
/// stay in the generation of the start.
pub async fn keep<F: Future<Output = Option<u64>>>(dir: PathBuf, mut kept: u64, mut highest: impl FnMut() -> F) {
    loop {
        tokio::time::sleep(KEEP_EVERY).await;
        let Some(highest) = highest().await else { return };
        let generation = needed(highest);
        if generation <= kept {
            continue;
        }
        let at = dir.clone();
        match tokio::task::spawn_blocking(move || raise(&at, generation)).await.map_err(|e| e.to_string()) {
            Ok(Ok(())) => kept = generation,
            Ok(Err(error)) | Err(error) => {
                tracing::error!(%error, highest, "cannot raise the generation: after a crash, tokens could go back");
            }
        }
    }
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
        raise(&dir, 10).expect("raised");
        raise(&dir, 4).expect("raised");
        assert_eq!(advance(&dir), Ok(11));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_generation_kept_puts_the_next_floor_above_every_token() {
        let generation = 7;
        let first = token_floor(generation) + 1;
        // Early in a generation, nothing to raise.
        assert_eq!(needed(first), generation);
        // Half-way through it: the next one, and the next start's floor
        // is above the highest token with room to spare.
        for highest in [first + KEEP_AHEAD - 1, first + KEEP_AHEAD, token_floor(generation + 1) - 1] {
            let kept = needed(highest);
            assert!(token_floor(kept + 1) > highest + KEEP_AHEAD, "{highest}: {kept}");
            assert!(kept <= generation + 1);
        }
        assert_eq!(needed(u64::MAX), u64::MAX >> TOKEN_EPOCH_SHIFT);
    }
}
