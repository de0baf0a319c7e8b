//! The tracing filesystem: where it is, mounting it when it is not, and the
//! tracepoint format files the programs' field offsets come from.

use std::path::{Path, PathBuf};

/// Where tracefs is usually mounted, in the order aya looks.
const MOUNT_POINTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The mounted tracefs, if any.
pub fn find() -> Option<PathBuf> {
    MOUNT_POINTS.iter().map(PathBuf::from).find(|path| path.join("events").is_dir())
}

/// Makes sure tracefs is mounted (tracepoints are attached through it):
/// mounts it on `/sys/kernel/tracing` when it is missing and we may.
pub fn ensure_mounted() -> Result<PathBuf, String> {
    if let Some(path) = find() {
        return Ok(path);
    }
    // Mounted but closed to this user (the usual 0700 root directory, for
    // an agent that has only CAP_BPF and CAP_PERFMON): say so, not "missing".
    for path in MOUNT_POINTS {
        if let Err(error) = std::fs::read_dir(path)
            && error.kind() == std::io::ErrorKind::PermissionDenied
        {
            return Err(format!("tracefs at {path} is not readable by this user ({error})"));
        }
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", MOUNT_POINTS[0]])
        .stderr(std::process::Stdio::null())
        .status();
    match (status, find()) {
        (_, Some(path)) => Ok(path),
        (Ok(status), None) => Err(format!("tracefs is not mounted and `mount -t tracefs` failed ({status})")),
        (Err(error), None) => Err(format!("tracefs is not mounted and `mount` could not run: {error}")),
    }
}

/// A field of a tracepoint's format: name, offset and size in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Field name (the last word of its declaration, without array brackets).
    pub name: String,
    /// Offset in the record.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// Parses a tracepoint `format` file into its fields.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix("field:")?;
            let mut parts = line.split(';').map(str::trim);
            let declaration = parts.next()?;
            let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
            let size = parts.next()?.strip_prefix("size:")?.parse().ok()?;
            let name = declaration.split_whitespace().last()?;
            let name = name.split('[').next()?.trim_start_matches('*');
            Some(Field { name: name.to_owned(), offset, size })
        })
        .collect()
}

/// Reads and parses the format of `category/name` under tracefs `root`.
pub fn read_format(root: &Path, category: &str, name: &str) -> std::io::Result<Vec<Field>> {
    let text = std::fs::read_to_string(root.join("events").join(category).join(name).join("format"))?;
    Ok(parse_format(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_SWITCH: &str = "name: sched_switch
ID: 316
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:u32 * uaddr;\toffset:16;\tsize:8;\tsigned:0;

print fmt: \"prev_comm=%s\"";

    #[test]
    fn format_fields_are_parsed_with_offsets_and_sizes() {
        let fields = parse_format(SCHED_SWITCH);
        let find = |name: &str| fields.iter().find(|f| f.name == name).cloned();
        assert_eq!(find("common_type"), Some(Field { name: "common_type".into(), offset: 0, size: 2 }));
        assert_eq!(find("prev_comm").map(|f| (f.offset, f.size)), Some((8, 16)));
        assert_eq!(find("prev_pid").map(|f| (f.offset, f.size)), Some((24, 4)));
        assert_eq!(find("prev_state").map(|f| (f.offset, f.size)), Some((32, 8)));
        assert_eq!(find("comm").map(|f| (f.offset, f.size)), Some((12, 4)));
        assert_eq!(find("uaddr").map(|f| (f.offset, f.size)), Some((16, 8)));
        assert_eq!(fields.len(), 6);
    }
}
