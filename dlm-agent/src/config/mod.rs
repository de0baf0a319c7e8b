//! The agent's configuration: an embedded default, a TOML file, `DLM_*`
//! environment variables and flags, in increasing precedence (the last two
//! through clap). Validated as a whole, with a message that names the key.
//! Imports only leaves (`bounds`, `codes`, `access`, `resident`): everything
//! else reads it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dlm_core::Limits;
use serde::Deserialize;

use crate::access::Policy;
use crate::bounds::SESSION_QUEUE_MAX_RANGE;
use crate::codes::Family;
use crate::resident::Residency;

mod access;
mod clients;
mod cluster;
pub mod memory;
mod tls;

pub use clients::ClientLimits;
pub use cluster::{ClusterSettings, FencingSettings, MemberEntry, MembershipSource};
use cluster::{FileCluster, cluster_settings};
pub use tls::{ClientCertificates, TlsFiles, TlsSettings};

/// Everything the agent runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's name, reported to clients and in metrics.
    pub node: String,
    /// The Unix socket of the client API.
    pub socket: PathBuf,
    /// The TCP address of the client API; off when `None`.
    pub tcp: Option<SocketAddr>,
    /// The HTTP address of `/metrics`, `/healthz`, `/readyz`; off when `None`.
    pub http: Option<SocketAddr>,
    /// Where the agent keeps its generation (fencing tokens across restarts).
    pub state_dir: PathBuf,
    /// HTTP/2 ping interval on client connections; a connection that does not
    /// answer within the same time again is closed and its session ended.
    pub keepalive: Duration,
    /// Messages queued to one client before it counts as not reading and its
    /// session is ended.
    pub session_queue_max: usize,
    /// The engine's bounds.
    pub limits: Limits,
    /// The agent's bounds on client connections and sessions.
    pub clients: ClientLimits,
    /// Lockspaces created at start.
    pub lockspaces: Vec<LockspaceEntry>,
    /// Create a span per lock request (set when OTLP export is configured,
    /// from the standard `OTEL_*` variables, not from the file).
    pub lock_spans: bool,
    /// Load and attach the eBPF programs at start (when permitted).
    pub ebpf: bool,
    /// How often the eBPF maps are read into metrics.
    pub ebpf_interval: Duration,
    /// Memory stalls at least this long also become spans.
    pub ebpf_long_stall: Duration,
    /// The program families to attach ([`Family::AGENT_DEFAULT`] unless
    /// configured): `futex` and `sched` cost every system call or context
    /// switch of the node and are opt-in.
    pub ebpf_families: Vec<Family>,
    /// The cluster this agent is a member of; `None` for a single node.
    pub cluster: Option<ClusterSettings>,
    /// Who may do what (`[access]`).
    pub access: Policy,
    /// TLS on the TCP listeners (`[tls]`).
    pub tls: TlsSettings,
    /// Whether the agent's memory is locked in RAM (`[memory] resident`).
    pub resident: Residency,
    /// Locks the agent sets aside room for at start (`[memory] reserve_locks`).
    pub reserve_locks: u64,
}

/// A lockspace the agent creates at start.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockspaceEntry {
    /// Its name.
    pub name: String,
    /// Its value block length in bytes.
    #[serde(default = "default_lvb_len")]
    pub lvb_len: usize,
    /// Its lock-delay, if not `[cluster] lock_delay` (a duration: "500ms").
    #[serde(default, deserialize_with = "optional_duration")]
    pub lock_delay: Option<Duration>,
}

/// A duration written as in the rest of the file ("1s", "500ms").
fn optional_duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map(Some).map_err(serde::de::Error::custom)
}

/// The longest lock-delay accepted: a lock taken from a lost node stays
/// unavailable this long at most.
pub const LOCK_DELAY_MAX: Duration = Duration::from_secs(600);

fn default_lvb_len() -> usize {
    dlm_core::LVB_LEN_DEFAULT
}

/// The default state directory: `/var/lib/dlm` for root (or when no
/// home is known), `$XDG_STATE_HOME/dlm` or `~/.local/state/dlm` for a user.
#[must_use]
pub fn default_state_dir() -> PathBuf {
    let is_root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state"));
    match std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).or(home) {
        Some(dir) if !is_root => dir.join("dlm"),
        _ => PathBuf::from("/var/lib/dlm"),
    }
}

/// The default socket (the clients' rule, so that both agree).
pub use dlm_client::default_socket;

impl Default for Config {
    fn default() -> Self {
        Config {
            node: hostname(),
            socket: default_socket(),
            tcp: None,
            http: Some(SocketAddr::from(([127, 0, 0, 1], 9420))),
            state_dir: default_state_dir(),
            keepalive: Duration::from_secs(10),
            session_queue_max: 4096,
            limits: Limits {
                locks_max: memory::available().map_or(Limits::default().locks_max, memory::locks_max_for),
                ..Limits::default()
            },
            clients: ClientLimits::resolve(
                &clients::FileClients::default(),
                clients::descriptor_limit(),
                Limits::default().sessions_max,
            )
            .unwrap_or(ClientLimits {
                connections_max: 1024,
                ring_sessions_max: 0,
                connections_per_client_max: 256,
                sessions_per_uid_max: Limits::default().sessions_max / 4,
                handshake_timeout: Duration::from_secs(2),
            }),
            lockspaces: vec![LockspaceEntry { name: "default".into(), lvb_len: default_lvb_len(), lock_delay: None }],
            lock_spans: false,
            ebpf: true,
            ebpf_interval: Duration::from_secs(5),
            ebpf_long_stall: Duration::from_millis(10),
            ebpf_families: Family::AGENT_DEFAULT.to_vec(),
            cluster: None,
            access: Policy::default(),
            tls: TlsSettings::Unset,
            resident: Residency::Auto,
            reserve_locks: 0,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The TOML file's shape: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: Option<String>,
    socket: Option<PathBuf>,
    tcp: Option<String>,
    http: Option<String>,
    state_dir: Option<PathBuf>,
    keepalive: Option<String>,
    handshake_timeout: Option<String>,
    session_queue_max: Option<usize>,
    limits: Option<FileLimits>,
    #[serde(default)]
    lockspace: Vec<LockspaceEntry>,
    ebpf: Option<FileEbpf>,
    cluster: Option<FileCluster>,
    access: Option<access::FileAccess>,
    tls: Option<tls::FileTls>,
    memory: Option<memory::FileMemory>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEbpf {
    enabled: Option<bool>,
    interval: Option<String>,
    long_stall: Option<String>,
    families: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    lockspaces_max: Option<u32>,
    sessions_max: Option<u32>,
    locks_per_session_max: Option<u32>,
    locks_per_lockspace_max: Option<u32>,
    locks_max: Option<u64>,
    resources_per_lockspace_max: Option<u32>,
    waiters_per_resource_max: Option<u32>,
    request_timeout_max: Option<String>,
    deadlock_search_sessions_max: Option<u32>,
    connections_max: Option<usize>,
    connections_per_client_max: Option<usize>,
    sessions_per_uid_max: Option<u32>,
}

/// A configuration that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the line and key).
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// "must be from A to B", from the bound itself.
fn in_range<T: std::fmt::Display>(range: &std::ops::RangeInclusive<T>) -> String {
    format!("must be from {} to {}", range.start(), range.end())
}

/// Parses a duration such as `250ms`, `5s`, `2m`, `1h`.
///
/// # Errors
/// A message saying what is expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 250ms, 5s, 2m or 1h"))?;
    let scale = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    let duration = scale
        .checked_mul(u32::try_from(value).map_err(|_| format!("{text:?} is too large"))?)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if duration > DURATION_MAX {
        return Err(format!("{text:?} is longer than {}h", DURATION_MAX.as_secs() / 3600));
    }
    Ok(duration)
}

/// The longest duration any setting takes: a week is more than any timeout
/// or interval needs, and the clock's arithmetic stays far from overflow.
pub const DURATION_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

fn parse_addr(key: &'static str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if text.is_empty() || text == "off" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| invalid(key, format!("{text:?} is not an address like 127.0.0.1:9420 (or \"off\")")))
}

/// Overrides from flags and `DLM_*` variables (clap fills them).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--node` / `DLM_NODE`.
    pub node: Option<String>,
    /// `--socket` / `DLM_SOCKET`.
    pub socket: Option<PathBuf>,
    /// `--tcp` / `DLM_TCP`.
    pub tcp: Option<String>,
    /// `--http` / `DLM_HTTP`.
    pub http: Option<String>,
    /// `--state-dir` / `DLM_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--no-ebpf` / `DLM_NO_EBPF`.
    pub no_ebpf: bool,
}

impl Config {
    /// The embedded default, then the file (if any), then the overrides.
    ///
    /// # Errors
    /// The file is unreadable or invalid, or a value is out of range.
    pub fn load(path: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => {
                Some(std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?)
            }
            None => None,
        };
        Config::from_text(path, text.as_deref(), overrides)
    }

    /// As [`Config::load`], the file's `text` given (`path` names it in errors).
    ///
    /// # Errors
    /// The text is invalid, or a value is out of range.
    pub fn from_text(
        path: Option<&std::path::Path>,
        text: Option<&str>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let mut clients = clients::FileClients::default();
        if let Some(text) = text {
            let path = path.unwrap_or(std::path::Path::new("(configuration)"));
            let file: File =
                toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
            clients = config.apply_file(file)?;
        }
        if let Some(node) = &overrides.node {
            config.node.clone_from(node);
        }
        if let Some(socket) = &overrides.socket {
            config.socket.clone_from(socket);
        }
        if let Some(tcp) = &overrides.tcp {
            config.tcp = parse_addr("tcp", tcp)?;
        }
        if let Some(http) = &overrides.http {
            config.http = parse_addr("http", http)?;
        }
        if let Some(dir) = &overrides.state_dir {
            config.state_dir.clone_from(dir);
        }
        if overrides.no_ebpf {
            config.ebpf = false;
        }
        config.clients = ClientLimits::resolve(&clients, clients::descriptor_limit(), config.limits.sessions_max)?;
        config.validate()?;
        Ok(config)
    }

    /// Takes what `file` says; returns its client bounds, which are
    /// resolved once every other value is known.
    fn apply_file(&mut self, file: File) -> Result<clients::FileClients, ConfigError> {
        let mut clients = clients::FileClients { handshake_timeout: file.handshake_timeout, ..Default::default() };
        if let Some(node) = file.node {
            self.node = node;
        }
        if let Some(socket) = file.socket {
            self.socket = socket;
        }
        if let Some(tcp) = file.tcp {
            self.tcp = parse_addr("tcp", &tcp)?;
        }
        if let Some(http) = file.http {
            self.http = parse_addr("http", &http)?;
        }
        if let Some(dir) = file.state_dir {
            self.state_dir = dir;
        }
        if let Some(keepalive) = file.keepalive {
            self.keepalive = parse_duration(&keepalive).map_err(|m| invalid("keepalive", m))?;
        }
        if let Some(n) = file.session_queue_max {
            self.session_queue_max = n;
        }
        if let Some(limits) = file.limits {
            clients.connections_max = limits.connections_max;
            clients.connections_per_client_max = limits.connections_per_client_max;
            clients.sessions_per_uid_max = limits.sessions_per_uid_max;
            let l = &mut self.limits;
            macro_rules! take {
                ($($field:ident),*) => { $( if let Some(v) = limits.$field { l.$field = v; } )* };
            }
            take!(
                lockspaces_max,
                sessions_max,
                locks_per_session_max,
                locks_per_lockspace_max,
                locks_max,
                resources_per_lockspace_max,
                waiters_per_resource_max,
                deadlock_search_sessions_max
            );
            if let Some(t) = limits.request_timeout_max {
                l.request_timeout_max = parse_duration(&t).map_err(|m| invalid("limits.request_timeout_max", m))?;
            }
        }
        if !file.lockspace.is_empty() {
            self.lockspaces = file.lockspace;
        }
        if let Some(cluster) = file.cluster {
            self.cluster = Some(cluster_settings(cluster)?);
        }
        if let Some(file_tls) = file.tls {
            self.tls = tls::tls_settings(file_tls)?;
        }
        if let Some(file_access) = file.access {
            self.access = access::policy(file_access)?;
        }
        if let Some(file_memory) = file.memory {
            (self.resident, self.reserve_locks) = memory::settings(file_memory)?;
        }
        if let Some(ebpf) = file.ebpf {
            if let Some(enabled) = ebpf.enabled {
                self.ebpf = enabled;
            }
            if let Some(interval) = ebpf.interval {
                self.ebpf_interval = parse_duration(&interval).map_err(|m| invalid("ebpf.interval", m))?;
                if self.ebpf_interval < Duration::from_millis(100) {
                    return Err(invalid("ebpf.interval", "must be at least 100ms"));
                }
            }
            if let Some(families) = ebpf.families {
                self.ebpf_families = families
                    .iter()
                    .map(|name| {
                        Family::parse(name).ok_or_else(|| {
                            invalid(
                                "ebpf.families",
                                format!("unknown family {name:?} (locks, futex, sched, holders, memory)"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            if let Some(long_stall) = ebpf.long_stall {
                self.ebpf_long_stall = parse_duration(&long_stall).map_err(|m| invalid("ebpf.long_stall", m))?;
            }
        }
        Ok(clients)
    }

    /// The engine's settings of a lockspace: its own lock-delay, else the
    /// cluster's, else the default.
    #[must_use]
    pub fn lockspace_config(&self, entry: &LockspaceEntry) -> dlm_core::LockspaceConfig {
        let cluster = self.cluster.as_ref().map(|c| c.lock_delay);
        let lock_delay = entry.lock_delay.or(cluster).unwrap_or(dlm_core::LOCK_DELAY_DEFAULT);
        dlm_core::LockspaceConfig { lvb_len: entry.lvb_len, lock_delay }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node.is_empty() || self.node.len() > 64 {
            return Err(invalid("node", "must be 1 to 64 characters"));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(invalid("socket", "must be a path"));
        }
        if self.keepalive < Duration::from_millis(100) {
            return Err(invalid("keepalive", "must be at least 100ms"));
        }
        if !SESSION_QUEUE_MAX_RANGE.contains(&self.session_queue_max) {
            return Err(invalid("session_queue_max", in_range(&SESSION_QUEUE_MAX_RANGE)));
        }
        self.limits.validate().map_err(|m| invalid("limits", m))?;
        if let Some(cluster) = &self.cluster {
            cluster.membership().map_err(|m| invalid("cluster.member", m))?;
            tls::check_listener(&self.tls, "the peer listener ([cluster] listen)")?;
        }
        if self.tcp.is_some() {
            tls::check_listener(&self.tls, "the client listener (tcp)")?;
        }
        let mut names = std::collections::BTreeSet::new();
        for entry in &self.lockspaces {
            if !names.insert(&entry.name) {
                return Err(invalid("lockspace", format!("{:?} is listed twice", entry.name)));
            }
            // What the lock engine would refuse at start is refused here, as configuration.
            self.lockspace_config(entry)
                .validate(entry.name.as_bytes())
                .map_err(|e| invalid("lockspace", format!("{:?}: {e}", entry.name)))?;
            if entry.lock_delay.is_some_and(|d| d > LOCK_DELAY_MAX) {
                return Err(invalid("lockspace", format!("{:?}: lock_delay must be at most 10m", entry.name)));
            }
        }
        if self.lockspaces.len() > self.limits.lockspaces_max as usize {
            return Err(invalid(
                "lockspace",
                format!("more than limits.lockspaces_max ({})", self.limits.lockspaces_max),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999h").is_err());
    }

    #[test]
    fn a_lock_delay_comes_from_its_lockspace_then_the_cluster_then_the_default() {
        let text = |cluster_delay: &str, lockspace_delay: &str| {
            format!(
                "[[lockspace]]\nname = \"a\"\n{lockspace_delay}[[lockspace]]\nname = \"b\"\n[tls]\ninsecure = true\n\
                 [cluster]\nname = \"c\"\nnode_id = 1\n{cluster_delay}[[cluster.member]]\nid = 1\naddress = \"127.0.0.1:7400\"\n"
            )
        };
        let load = |text: &str| Config::from_text(None, Some(text), &Overrides::default());
        let delays = |config: &Config| -> Vec<Duration> {
            config.lockspaces.iter().map(|entry| config.lockspace_config(entry).lock_delay).collect()
        };
        let config = load(&text("", "")).expect("valid");
        assert_eq!(delays(&config), vec![dlm_core::LOCK_DELAY_DEFAULT; 2]);
        let config = load(&text("lock_delay = \"2s\"\n", "lock_delay = \"0s\"\n")).expect("valid");
        assert_eq!(delays(&config), vec![Duration::ZERO, Duration::from_secs(2)]);
        let error = load(&text("lock_delay = \"11m\"\n", "")).expect_err("too long").to_string();
        assert!(error.contains("cluster.lock_delay"), "{error}");
        let error = load(&text("", "lock_delay = \"1h\"\n")).expect_err("too long").to_string();
        assert!(error.contains("lock_delay"), "{error}");
        let error = load(&text("", "lock_delay = \"soon\"\n")).expect_err("not a duration").to_string();
        assert!(error.contains("lock_delay") || error.contains("unit"), "{error}");
    }

    #[test]
    fn the_membership_threads_priority_defaults_and_is_bounded() {
        let text = |line: &str| {
            format!(
                "[tls]\ninsecure = true\n[cluster]\nname = \"c\"\nnode_id = 1\n{line}[[cluster.member]]\nid = 1\n\
                 address = \"127.0.0.1:7400\"\n"
            )
        };
        let load = |text: &str| Config::from_text(None, Some(text), &Overrides::default());
        let priority = |config: Config| config.cluster.expect("a cluster").realtime_priority;
        assert_eq!(priority(load(&text("")).expect("valid")), crate::bounds::REALTIME_PRIORITY_DEFAULT);
        assert_eq!(priority(load(&text("realtime_priority = 0\n")).expect("valid")), 0);
        let error = load(&text("realtime_priority = 99\n")).expect_err("corosync's").to_string();
        assert!(error.contains("cluster.realtime_priority") && error.contains("0 to 98"), "{error}");
    }

    #[test]
    fn a_file_overrides_defaults_and_bad_values_name_their_key() {
        let dir = std::env::temp_dir().join(format!("dlm-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "node = \"n1\"\nkeepalive = \"2s\"\n[limits]\nwaiters_per_resource_max = 9\n[[lockspace]]\nname = \"a\"\n",
        )
        .expect("write");
        let config = Config::load(Some(&path), &Overrides::default()).expect("valid");
        assert_eq!(config.node, "n1");
        assert_eq!(config.keepalive, Duration::from_secs(2));
        assert_eq!(config.limits.waiters_per_resource_max, 9);
        assert_eq!(config.lockspaces, vec![LockspaceEntry { name: "a".into(), lvb_len: 32, lock_delay: None }]);

        std::fs::write(&path, "keepalive = \"soon\"\n").expect("write");
        let error = Config::load(Some(&path), &Overrides::default()).expect_err("invalid").to_string();
        assert!(error.contains("keepalive"), "{error}");
        std::fs::write(&path, "[ebpf]\nfamilies = [\"sched\", \"memory\"]\n").expect("write");
        let config = Config::load(Some(&path), &Overrides::default()).expect("valid");
        assert_eq!(config.ebpf_families, vec![Family::Sched, Family::Memory]);
        std::fs::write(&path, "[ebpf]\nfamilies = [\"disk\"]\n").expect("write");
        let error = Config::load(Some(&path), &Overrides::default()).expect_err("bad family").to_string();
        assert!(error.contains("ebpf.families") && error.contains("disk"), "{error}");
        std::fs::write(&path, "colour = \"blue\"\n").expect("write");
        let error = Config::load(Some(&path), &Overrides::default()).expect_err("unknown key").to_string();
        assert!(error.contains("colour"), "{error}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
