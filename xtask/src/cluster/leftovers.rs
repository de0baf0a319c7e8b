//! What a local cluster consists of, found by what it is rather than by the
//! state files `up` writes: a failed or interrupted `up`, a node stopped by
//! SIGSTOP, or state files removed by hand must not leave daemons and
//! network objects that the next `up` trips over.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a cluster's objects are named.
pub(crate) struct Names<'a> {
    /// The state directory; processes whose command line names it belong.
    pub dir: &'a Path,
    /// Namespaces are `<namespace><i>`.
    pub namespace: &'a str,
    /// Host ends of the veth pairs are `<veth><i>`.
    pub veth: &'a str,
    pub bridge: &'a str,
}

/// A running process of the cluster.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Process {
    pub pid: u32,
    pub name: String,
    pub stopped: bool,
}

/// Everything of a cluster found on the machine.
#[derive(Debug, Default)]
pub(crate) struct Leftovers {
    pub processes: Vec<Process>,
    pub namespaces: Vec<String>,
    /// Bridge and veth host ends.
    pub links: Vec<String>,
}

impl Leftovers {
    pub(crate) fn find(names: &Names) -> Leftovers {
        let mut namespaces: Vec<String> = command_lines("ip", &["netns", "list"])
            .iter()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|ns| numbered(ns, names.namespace))
            .map(str::to_string)
            .collect();
        namespaces.sort();
        let mut pids: Vec<u32> = namespaces
            .iter()
            .flat_map(|ns| command_lines("ip", &["netns", "pids", ns]))
            .filter_map(|line| line.trim().parse().ok())
            .collect();
        pids.extend(naming(names.dir));
        pids.sort_unstable();
        pids.dedup();
        let me = std::process::id();
        let processes = pids.into_iter().filter(|&pid| pid != me).filter_map(process).collect();
        let links = command_lines("ip", &["-o", "link", "show"])
            .iter()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name))
            .filter(|name| *name == names.bridge || numbered(name, names.veth))
            .map(str::to_string)
            .collect();
        Leftovers { processes, namespaces, links }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.namespaces.is_empty() && self.links.is_empty()
    }

    /// One line per kind of object, for a message.
    pub(crate) fn describe(&self) -> String {
        let mut lines = Vec::new();
        if !self.processes.is_empty() {
            let each: Vec<String> = self
                .processes
                .iter()
                .map(|p| format!("{} {}{}", p.name, p.pid, if p.stopped { " (stopped)" } else { "" }))
                .collect();
            lines.push(format!("processes: {}", each.join(", ")));
        }
        if !self.namespaces.is_empty() {
            lines.push(format!("network namespaces: {}", self.namespaces.join(", ")));
        }
        if !self.links.is_empty() {
            lines.push(format!("links: {}", self.links.join(", ")));
        }
        lines.join("\n")
    }

    /// Stops every process (continued first: a stopped process does not act
    /// on SIGTERM until it runs), then removes the namespaces and links.
    /// Returns what could not be removed.
    pub(crate) fn remove(&self) -> Result<(), String> {
        for p in &self.processes {
            signal(p.pid, "CONT");
            signal(p.pid, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.processes.iter().any(|p| alive(p.pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in self.processes.iter().filter(|p| alive(p.pid)) {
            eprintln!("xtask: {} {} did not stop on SIGTERM within 10 s: SIGKILL", p.name, p.pid);
            signal(p.pid, "KILL");
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        // A veth pair goes with its namespace; what is left goes by name.
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).stderr(Stdio::null()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let still: Vec<&Process> = self.processes.iter().filter(|p| alive(p.pid)).collect();
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("still running after SIGKILL: {still:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `name` is `prefix` followed by a number.
fn numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

fn command_lines(program: &str, args: &[&str]) -> Vec<String> {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Processes whose command line names a file under `dir` (agents started
/// with `--config <dir>/nodeI/agent.toml`, corosync with its configuration).
fn naming(dir: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::canonicalize(dir) else { return Vec::new() };
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(PathBuf::from(format!("/proc/{pid}/cmdline")))
                .is_ok_and(|line| line.windows(needle.len()).any(|w| w == needle.as_slice()))
        })
        .collect()
}

fn process(pid: u32) -> Option<Process> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    let name = field("Name:")?.to_string();
    // `T (stopped)`; a zombie is gone already.
    let state = field("State:")?;
    if state.starts_with('Z') {
        return None;
    }
    Some(Process { pid, name, stopped: state.starts_with('T') })
}

fn alive(pid: u32) -> bool {
    process(pid).is_some()
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).stderr(Stdio::null()).status();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
    }

    fn ip(args: &[&str]) {
        assert!(Command::new("ip").args(args).status().expect("ip").success(), "ip {args:?}");
    }

    /// What the issue saw: an interrupted run left a namespace with a
    /// stopped daemon in it, a veth, the bridge, and an agent outside any
    /// namespace, with no state files. All of it is found and removed.
    #[test]
    fn leftovers_are_found_by_what_they_are_and_removed_even_when_stopped() {
        if !is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "network namespaces need root");
            eprintln!("skipped: network namespaces need root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("dlm-leftovers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let names = Names { dir: &dir, namespace: "dlmx-n", veth: "dlmx-v", bridge: "dlmxbr0" };
        ip(&["link", "add", names.bridge, "type", "bridge"]);
        ip(&["netns", "add", "dlmx-n1"]);
        ip(&["link", "add", "dlmx-v1", "type", "veth", "peer", "name", "eth0", "netns", "dlmx-n1"]);
        ip(&["link", "set", "dlmx-v1", "master", names.bridge, "up"]);
        // A daemon in the namespace that ignores SIGTERM until continued
        // (stopped), and an "agent" outside it naming the state directory.
        let mut daemon = Command::new("ip").args(["netns", "exec", "dlmx-n1", "sleep", "600"]).spawn().expect("sleep");
        let config = dir.join("agent.toml");
        std::fs::write(&config, "").expect("config");
        let mut agent = Command::new("tail").arg("-f").arg(&config).spawn().expect("tail");
        std::thread::sleep(Duration::from_millis(200));
        signal(daemon.id(), "STOP");
        std::thread::sleep(Duration::from_millis(100));

        let found = Leftovers::find(&names);
        assert_eq!(found.namespaces, ["dlmx-n1"]);
        assert_eq!(found.links, ["dlmxbr0", "dlmx-v1"]);
        let pids: Vec<u32> = found.processes.iter().map(|p| p.pid).collect();
        assert!(pids.contains(&daemon.id()) && pids.contains(&agent.id()), "{found:?}");
        assert!(found.processes.iter().any(|p| p.pid == daemon.id() && p.stopped), "{found:?}");
        assert!(found.describe().contains("(stopped)"), "{}", found.describe());

        found.remove().expect("remove");
        let _ = daemon.wait();
        let _ = agent.wait();
        let after = Leftovers::find(&names);
        assert!(after.is_empty(), "{after:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
