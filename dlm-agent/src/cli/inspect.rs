//! `dlm-agent status`, `ls` and `dump`: read-only views, as text or `--json`.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Args;
use dlm_core::{LockFlags, Mode};
use dlm_proto::proto;
use serde_json::{Value, json};

use super::AgentAddress;

/// Options of `dlm-agent status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// Options of `dlm-agent ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// Options of `dlm-agent dump`.
#[derive(Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// The lockspace to show
    #[arg(long, short, default_value = "default")]
    lockspace: String,
    /// Show only this resource
    name: Option<String>,
    /// Show at most this many resources (0: all); a resource is shown with
    /// all its locks, however many (they are fetched a page at a time)
    #[arg(long, default_value_t = 1000)]
    max: u32,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

fn print(json: bool, value: &Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value:#}");
    } else {
        print!("{}", text());
    }
}

/// A node's pressure figures, as `status --json` gives them (ratios).
fn pressure_json(p: &proto::Pressure) -> Value {
    let ratio = |permille: u32| f64::from(permille) / 1000.0;
    json!({"memory_some": ratio(p.memory_some_permille), "memory_full": ratio(p.memory_full_permille),
           "cpu_some": ratio(p.cpu_some_permille), "age_ms": p.age_ms})
}

/// A node's pressure figures in a line (percent of the last 10 s).
fn pressure_text(p: &proto::Pressure) -> String {
    let pct = |permille: u32| f64::from(permille) / 10.0;
    format!(
        "memory some {:.1}% full {:.1}%, cpu some {:.1}% (of the last 10 s)",
        pct(p.memory_some_permille),
        pct(p.memory_full_permille),
        pct(p.cpu_some_permille)
    )
}

pub async fn status(args: StatusArgs) -> ExitCode {
    let client = match args.agent.connect().await {
        Ok(client) => client,
        Err(code) => return ExitCode::from(code),
    };
    match client.status().await {
        Ok(s) => {
            let peers: Vec<_> = s
                .peers
                .iter()
                .map(|p| {
                    json!({"node_id": p.node_id, "address": p.address, "up": p.up, "unacked": p.unacked,
                           "pressure": p.pressure.as_ref().map(pressure_json)})
                })
                .collect();
            let mut value = json!({
                "node": s.node, "version": s.version, "uptime_ms": s.uptime_ms, "sessions": s.sessions,
                "lockspaces": s.lockspaces, "locks": s.locks, "waiting": s.waiting, "ebpf": s.ebpf,
                "cluster": s.cluster, "node_id": s.node_id, "peers": peers, "mastered": s.mastered,
                "directory_entries": s.directory_entries, "remote_locks": s.remote_locks,
                "pressure": s.pressure.as_ref().map(pressure_json), "run_delay_ms": s.run_delay_ms,
            });
            if !s.cluster.is_empty()
                && let (Some(object), Value::Object(cluster)) = (value.as_object_mut(), super::cluster::json(&s))
            {
                object.extend(cluster);
            }
            print(args.json, &value, || {
                let mut text = format!(
                    "node {}\nversion {}\nuptime {:.1}s\nsessions {}\nlockspaces {}\nlocks {} ({} waiting)\nebpf {}\n",
                    s.node,
                    s.version,
                    s.uptime_ms as f64 / 1000.0,
                    s.sessions,
                    s.lockspaces,
                    s.locks,
                    s.waiting,
                    if s.ebpf { "on" } else { "off" }
                );
                if let Some(p) = &s.pressure {
                    text += &format!("pressure {}\n", pressure_text(p));
                }
                text += &format!("agent waited for a CPU {:.3}s in all\n", s.run_delay_ms as f64 / 1000.0);
                if !s.cluster.is_empty() {
                    text += &format!(
                        "cluster {} (node id {})\nmastered here {}, directory entries {}, locks mastered elsewhere {}\n",
                        s.cluster, s.node_id, s.mastered, s.directory_entries, s.remote_locks
                    );
                    text += &super::cluster::text(&s);
                    for p in &s.peers {
                        let state = if p.up { "up" } else { "down" };
                        text += &format!("peer {} {} {state} ({} unacknowledged)", p.node_id, p.address, p.unacked);
                        if let Some(pressure) = &p.pressure {
                            let age = pressure.age_ms as f64 / 1000.0;
                            text += &format!(", reported {} {age:.1}s ago", pressure_text(pressure));
                        }
                        text += "\n";
                    }
                }
                text
            });
            ExitCode::from(super::cluster::exit_status(&s))
        }
        Err(error) => ExitCode::from(super::call_failed(&error)),
    }
}

pub async fn ls(args: LsArgs) -> ExitCode {
    let client = match args.agent.connect().await {
        Ok(client) => client,
        Err(code) => return ExitCode::from(code),
    };
    match client.lockspaces().await {
        Ok(reply) => {
            let value = Value::Array(
                reply
                    .lockspaces
                    .iter()
                    .map(|ls| json!({"name": ls.name, "lvb_len": ls.lvb_len, "resources": ls.resources, "locks": ls.locks, "waiting": ls.waiting}))
                    .collect(),
            );
            print(args.json, &value, || {
                let mut out =
                    format!("{:<24} {:>7} {:>10} {:>8} {:>8}\n", "LOCKSPACE", "LVB", "RESOURCES", "LOCKS", "WAITING");
                for ls in &reply.lockspaces {
                    let _ = writeln!(
                        out,
                        "{:<24} {:>7} {:>10} {:>8} {:>8}",
                        ls.name, ls.lvb_len, ls.resources, ls.locks, ls.waiting
                    );
                }
                out
            });
            ExitCode::SUCCESS
        }
        Err(error) => ExitCode::from(super::call_failed(&error)),
    }
}

pub fn mode_name(mode: Option<i32>) -> &'static str {
    mode.and_then(|m| usize::try_from(m).ok()).and_then(Mode::from_index).map_or("--", Mode::name)
}

/// A resource name as text when it is printable, else as hex.
fn display_name(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(text) if text.chars().all(|c| !c.is_control()) => format!("{text:?}"),
        _ => name.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock_json(lock: &proto::LockInfo) -> Value {
    json!({
        "session": lock.session, "handle": lock.handle, "pid": lock.pid, "uid": lock.uid, "orphan": lock.orphan,
        "granted": lock.granted.map(|m| mode_name(Some(m))), "requested": lock.requested.map(|m| mode_name(Some(m))),
        "fencing_token": lock.fencing_token,
        "flags": LockFlags::from_bits(lock.flags).map(|f| f.to_string()).unwrap_or_default(),
        "phase_ms": lock.phase_ms,
        "attribution": lock.attribution.as_ref().map(attribution_json),
    })
}

/// The kernel attribution of a lock's current phase, as JSON.
pub fn attribution_json(a: &proto::KernelAttribution) -> Value {
    json!({
        "oncpu_ns": a.oncpu_ns, "runqueue_ns": a.runqueue_ns, "blocked_ns": a.blocked_ns,
        "reclaim_ns": a.reclaim_ns, "kernel_lock_ns": a.kernel_lock_ns, "futex_ns": a.futex_ns,
    })
}

/// The kernel attribution in one line of milliseconds.
pub fn attribution_text(a: &proto::KernelAttribution) -> String {
    let ms = |ns: u64| ns as f64 / 1e6;
    format!(
        "on-cpu {:.1}ms runq {:.1}ms blocked {:.1}ms (futex {:.1}ms, kernel locks {:.1}ms) reclaim {:.1}ms",
        ms(a.oncpu_ns),
        ms(a.runqueue_ns),
        ms(a.blocked_ns),
        ms(a.futex_ns),
        ms(a.kernel_lock_ns),
        ms(a.reclaim_ns)
    )
}

fn lock_line(out: &mut String, lock: &proto::LockInfo) {
    let owner = match (lock.orphan, lock.uid) {
        (true, _) => "orphan".to_string(),
        (false, Some(uid)) => format!("pid {} uid {uid}", lock.pid),
        (false, None) => format!("pid {}", lock.pid),
    };
    let modes = match lock.requested {
        Some(requested) => format!("{} -> {}", mode_name(lock.granted), mode_name(Some(requested))),
        None => mode_name(lock.granted).to_string(),
    };
    let _ = writeln!(
        out,
        "    session {:<6} handle {:<6} {:<20} {:<10} token {:<6} for {}ms",
        lock.session, lock.handle, owner, modes, lock.fencing_token, lock.phase_ms
    );
    if let Some(attribution) = &lock.attribution {
        let _ = writeln!(out, "        kernel: {}", attribution_text(attribution));
    }
}

pub async fn dump(args: DumpArgs) -> ExitCode {
    let client = match args.agent.connect().await {
        Ok(client) => client,
        Err(code) => return ExitCode::from(code),
    };
    // A big dump takes many pages: say how it goes, where someone watches.
    let interactive = std::io::stderr().is_terminal();
    let progress = |locks: usize| {
        if interactive {
            eprint!("\rdump: {locks} locks so far");
        }
    };
    let name = args.name.map(String::into_bytes);
    let gathered = client.dump_all(&args.lockspace, name.as_deref(), args.max as usize, progress).await;
    if interactive {
        eprint!("\r\x1b[K");
    }
    match gathered {
        Ok(mut resources) => {
            // Pages come in the agent's order; people read names in order.
            resources.sort_by(|a, b| a.name.cmp(&b.name));
            let value = Value::Array(
                resources
                    .iter()
                    .map(|r| {
                        json!({
                            "name": String::from_utf8_lossy(&r.name), "name_hex": hex(&r.name),
                            "lvb": r.lvb.as_deref().map(hex), "lvb_valid": r.lvb_valid, "last_token": r.last_token,
                            "granted": r.granted.iter().map(lock_json).collect::<Vec<_>>(),
                            "converting": r.converting.iter().map(lock_json).collect::<Vec<_>>(),
                            "waiting": r.waiting.iter().map(lock_json).collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
            );
            print(args.json, &value, || {
                let mut out = String::new();
                for r in &resources {
                    let lvb = match &r.lvb {
                        Some(lvb) => format!("lvb {}{}", hex(lvb), if r.lvb_valid { "" } else { " (not valid)" }),
                        None => "no lvb".into(),
                    };
                    let _ = writeln!(
                        out,
                        "Resource {} in {} (last token {}, {lvb})",
                        display_name(&r.name),
                        args.lockspace,
                        r.last_token
                    );
                    for (title, queue) in
                        [("Granted", &r.granted), ("Converting", &r.converting), ("Waiting", &r.waiting)]
                    {
                        if !queue.is_empty() {
                            let _ = writeln!(out, "  {title}");
                            for lock in queue {
                                lock_line(&mut out, lock);
                            }
                        }
                    }
                }
                if resources.is_empty() {
                    out.push_str("no resources\n");
                }
                out
            });
            ExitCode::SUCCESS
        }
        Err(error) => ExitCode::from(super::call_failed(&error)),
    }
}
