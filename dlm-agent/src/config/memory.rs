//! The memory this agent may use, and the node-wide lock ceiling derived
//! from it (`limits.locks_max` when the file does not set it): a node
//! whose clients take locks until memory runs out gets `limit_exceeded`
//! naming `locks_max`, not an OOM kill that ends every client's session.
//! Also `[memory]`: whether that memory is kept resident (`crate::resident`).

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::resident::Residency;

/// `[memory]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMemory {
    resident: Option<String>,
    reserve_locks: Option<u64>,
}

/// The most locks `[memory] reserve_locks` may set aside room for (at
/// [`RESERVE_BYTES_PER_LOCK`] each: 128 GiB).
pub const RESERVE_LOCKS_MAX: u64 = 1 << 27;

/// The room set aside per lock of `[memory] reserve_locks`: more than a
/// held lock's [`LOCK_BYTES`], because locks taken from nothing grow the
/// tables by doubling (old and new copies alive at once) and leave freed
/// copies that later blocks do not always fit. Measured with 300,000 locks
/// taken under the squeeze of `tests/memory.rs` (`DLM_SQUEEZE_GROW=5000`):
/// a reserve of 125 MiB (437 B per lock) still let the agent take 40,958
/// fresh pages, 244 MiB (853 B per lock) none.
pub const RESERVE_BYTES_PER_LOCK: u64 = 1024;

/// `[memory] resident`: `auto` (the default), `required` or `off`; and
/// `reserve_locks` (0 by default).
pub(super) fn settings(file: FileMemory) -> Result<(Residency, u64), ConfigError> {
    let residency = match file.resident {
        None => Residency::default(),
        Some(name) => Residency::from_name(&name).ok_or_else(|| {
            invalid("memory.resident", format!("{name:?} is not one of {}", Residency::NAMES.join(", ")))
        })?,
    };
    let reserve_locks = file.reserve_locks.unwrap_or(0);
    if reserve_locks > RESERVE_LOCKS_MAX {
        return Err(invalid("memory.reserve_locks", format!("must be at most {RESERVE_LOCKS_MAX}")));
    }
    Ok((residency, reserve_locks))
}

/// What one held lock costs the agent, engine and records together, as
/// measured at 1,048,576 locks (285 B; `tests/dump.rs` prints it), with room
/// for hash tables that have just grown.
pub const LOCK_BYTES: u64 = 320;

/// The share of the agent's memory that locks may take; the rest is for
/// resources, sessions, buffers and the runtime.
const LOCKS_SHARE_DIVISOR: u64 = 2;

/// The default `limits.locks_max` for `memory` bytes: half of it in locks,
/// at least 1,024.
#[must_use]
pub fn locks_max_for(memory: u64) -> u64 {
    (memory / LOCKS_SHARE_DIVISOR / LOCK_BYTES).max(1024)
}

/// The memory this process may use: the machine's, or its cgroup's limit
/// if lower (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`).
#[must_use]
pub fn available() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| meminfo_total(&text));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|text| cgroup_limit(&text));
    match (total, cgroup) {
        (Some(total), Some(limit)) => Some(total.min(limit)),
        (total, limit) => total.or(limit),
    }
}

fn meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.trim_start_matches("MemTotal:").trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The memory limit of the cgroup named in `/proc/self/cgroup` text.
fn cgroup_limit(cgroups: &str) -> Option<u64> {
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let file = match controllers {
            "" => format!("/sys/fs/cgroup{path}/memory.max"),
            c if c.split(',').any(|c| c == "memory") => format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"),
            _ => continue,
        };
        // "max" (v2) or a huge number (v1) means no limit.
        if let Some(limit) = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse::<u64>().ok()) {
            return Some(limit);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_is_half_the_memory_in_locks() {
        assert_eq!(locks_max_for(24 << 30), (24u64 << 30) / 2 / 320);
        assert_eq!(locks_max_for(1 << 18), 1024, "a floor however small the memory");
    }

    #[test]
    fn a_reserve_is_off_by_default_and_bounded() {
        let file = |reserve_locks| FileMemory { resident: None, reserve_locks };
        assert_eq!(settings(file(None)).expect("valid"), (Residency::Auto, 0));
        assert_eq!(settings(file(Some(300_000))).expect("valid").1, 300_000);
        let error = settings(file(Some(RESERVE_LOCKS_MAX + 1))).expect_err("too many").to_string();
        assert!(error.contains("memory.reserve_locks"), "{error}");
    }

    #[test]
    fn memory_is_read_from_meminfo_and_the_cgroup() {
        assert_eq!(meminfo_total("MemTotal:       24683584 kB\nMemFree: 1 kB\n"), Some(24_683_584 * 1024));
        assert_eq!(meminfo_total("nothing"), None);
        assert_eq!(cgroup_limit("1:cpu:/\n"), None, "no memory controller named");
        let here = available().expect("this machine has /proc/meminfo");
        assert!(here > 64 << 20, "{here}");
    }
}
