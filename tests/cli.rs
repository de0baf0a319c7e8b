//! The agent's command line and configuration, without a running agent:
//! help on every command, configurations refused with a clear message and
//! nothing left behind, and the systemd unit.

use std::process::Command;

const EXIT_CONFIG: i32 = 78;

/// Runs the agent on a configuration file holding `config` (in `dir`, with
/// its socket there too) and returns how it ended.
fn run_with_config(dir: &std::path::Path, config: &str, extra: &[&str]) -> std::process::Output {
    let path = dir.join("bad.toml");
    std::fs::write(&path, config).expect("write");
    Command::new(support::bin())
        .arg("run")
        .args(extra)
        .arg("--config")
        .arg(&path)
        .arg("--socket")
        .arg(dir.join("s"))
        .output()
        .expect("run")
}

/// Every command and subcommand, found by walking the "Commands:" lists
/// of the help texts from the top, has help with a usage line.
#[test]
fn every_command_has_help() {
    let mut pending = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let output = Command::new(support::bin()).args(&path).arg("--help").output().expect("run");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && text.contains("Usage"), "{path:?}: {text}");
        seen += 1;
        let commands = text.split("\nCommands:\n").nth(1).unwrap_or("");
        for line in commands.lines().take_while(|l| l.starts_with("  ")) {
            let name = line.split_whitespace().next().expect("a command name");
            if name != "help" {
                pending.push(path.iter().cloned().chain([name.to_string()]).collect());
            }
        }
    }
    // The top, its nine commands, trace's five and lockspace's two.
    assert!(seen >= 17, "only {seen} help texts found");
}

/// The unit and its drop-ins parse, every key is known, and the unit is
/// hardened (`systemd-analyze security` exposure at most 3.0).
#[test]
fn the_systemd_unit_verifies() {
    let Ok(output) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(std::env::var("CI").is_err(), "systemd-analyze is required under CI");
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(output.status.success());
    let unit =
        include_str!("../dlm-agent/systemd/dlm-agent.service").replace("/usr/local/bin/dlm-agent", support::bin());
    let dir = support::Scratch::new("unit");
    let path = dir.join("dlm-agent.service");
    // The unit alone, then with each drop-in (a drop-in's sections are
    // merged into the unit's, as appending them to it does).
    let drop_ins = [
        ("", ""),
        ("corosync.conf", include_str!("../dlm-agent/systemd/dlm-agent.service.d/corosync.conf")),
        ("tls.conf", include_str!("../dlm-agent/systemd/dlm-agent.service.d/tls.conf")),
    ];
    for (name, drop_in) in drop_ins {
        std::fs::write(&path, format!("{unit}\n{drop_in}")).expect("write");
        let verify = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("run");
        let stderr = String::from_utf8_lossy(&verify.stderr);
        assert!(verify.status.success() && stderr.trim().is_empty(), "with {name:?}: {stderr}");
    }
    // The drop-in for corosync, on a service of its shape (its own unit is
    // corosync's package's).
    let corosync = dir.join("corosync.service");
    let drop_in = include_str!("../dlm-agent/systemd/corosync.service.d/memory.conf");
    std::fs::write(&corosync, format!("[Unit]\nDescription=corosync\n[Service]\nExecStart=/bin/true\n{drop_in}"))
        .expect("write");
    let verify = Command::new("systemd-analyze").arg("verify").arg(&corosync).output().expect("run");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && stderr.trim().is_empty(), "corosync's drop-in: {stderr}");
    std::fs::write(&path, &unit).expect("write");
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=30"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(security.status.success(), "{}", String::from_utf8_lossy(&security.stdout));
}

/// A bad configuration, or a setting that the agent used to take and then
/// fail on or silently change, is refused as configuration (exit 78,
/// "configuration:", naming the key), and a failed start leaves no socket
/// file behind.
#[test]
fn a_bad_configuration_is_refused_with_a_clear_message_and_leaves_nothing() {
    let dir = support::Scratch::new("config");
    for (config, expected) in [
        ("keepalive = \"soon\"\n", "keepalive"),
        ("colour = 1\n", "colour"),
        ("[limits]\nsessions_max = 0\n", "sessions_max"),
        ("http = \"not an address\"\n", "http"),
        ("[[lockspace]]\nname = \"\"\n", "lockspace"),
        ("[[lockspace]]\nname = \"a\"\nlvb_len = 0\n", "value block length"),
        ("[[lockspace]]\nname = \"a\"\nlvb_len = 12\n", "value block length"),
        ("[limits]\nrequest_timeout_max = \"0s\"\n", "request_timeout_max"),
        ("keepalive = \"4294967295h\"\n", "keepalive"),
        ("keepalive = \"169h\"\n", "keepalive"),
    ] {
        let socket = dir.join("s");
        let output = run_with_config(&dir, config, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{config}: {stderr}");
        assert!(stderr.contains("configuration:") && stderr.contains(expected), "{config}: {stderr}");
        assert!(!socket.exists(), "{config}: a socket file was left behind");
    }
    let output = Command::new(support::bin()).args(["run", "--config", "/nonexistent.toml"]).output().expect("run");
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent.toml"));
    // A start that fails after the socket is bound (the HTTP address is taken) removes it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let socket = dir.join("s");
    let http = format!("http = \"{}\"\n", taken.local_addr().expect("address"));
    let output = run_with_config(&dir, &http, &["--no-ebpf"]);
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!socket.exists(), "a failed start left its socket file behind");
}
