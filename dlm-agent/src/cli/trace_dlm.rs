//! `dlm-agent trace dlm`: live DLM waits and holds with their kernel
//! attribution, polled from a running agent (its dump carries, for every
//! lock of a local client, where that client's time went in the current
//! phase). Needs no privilege of its own: the agent's programs measure.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use dlm_agent::{config::parse_duration, proto};
use serde_json::{Value, json};

use super::{
    AgentAddress, call_failed,
    inspect::{attribution_json, attribution_text, mode_name},
};

/// Options of `dlm-agent trace dlm`.
#[derive(Args, Debug)]
pub struct TraceDlmArgs {
    #[command(flatten)]
    agent: AgentAddress,
    /// Only this lockspace [default: all]
    #[arg(long, short)]
    lockspace: Option<String>,
    /// Stop after this long; default: until Ctrl-C
    #[arg(long, short = 'd', value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Time between views
    #[arg(long, short = 'i', default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Print JSON (one object per view)
    #[arg(long)]
    json: bool,
    /// Only locks of these processes
    #[arg(long = "pid", short = 'p', value_delimiter = ',')]
    pids: Vec<i32>,
    /// Show at most this many locks (longest in their phase first)
    #[arg(long, default_value_t = 20)]
    top: usize,
}

/// One lock in a view.
struct Row {
    lockspace: String,
    resource: String,
    state: &'static str,
    info: proto::LockInfo,
}

async fn snapshot(client: &dlm_client::Client, args: &TraceDlmArgs) -> Result<Vec<Row>, u8> {
    let lockspaces = match &args.lockspace {
        Some(name) => vec![name.clone()],
        None => {
            client.lockspaces().await.map_err(|e| call_failed(&e))?.lockspaces.into_iter().map(|l| l.name).collect()
        }
    };
    let mut rows = Vec::new();
    for lockspace in lockspaces {
        let resources = client.dump_all(&lockspace, None, 0, |_| {}).await.map_err(|e| call_failed(&e))?;
        for resource in resources {
            let name = String::from_utf8_lossy(&resource.name).into_owned();
            let queues =
                [("holding", resource.granted), ("converting", resource.converting), ("waiting", resource.waiting)];
            for (state, locks) in queues {
                for info in locks {
                    if args.pids.is_empty() || args.pids.contains(&info.pid) {
                        rows.push(Row { lockspace: lockspace.clone(), resource: name.clone(), state, info });
                    }
                }
            }
        }
    }
    rows.sort_by_key(|row| std::cmp::Reverse(row.info.phase_ms));
    rows.truncate(args.top);
    Ok(rows)
}

fn render(rows: &[Row], json: bool) -> String {
    if json {
        let locks: Vec<Value> = rows
            .iter()
            .map(|row| {
                json!({
                    "lockspace": row.lockspace, "resource": row.resource, "state": row.state,
                    "pid": row.info.pid, "mode": mode_name(row.info.granted),
                    "requested": row.info.requested.map(|m| mode_name(Some(m))),
                    "phase_ms": row.info.phase_ms, "fencing_token": row.info.fencing_token,
                    "attribution": row.info.attribution.as_ref().map(attribution_json),
                })
            })
            .collect();
        return format!("{}\n", json!({ "locks": locks }));
    }
    let mut out = format!(
        "{:<12} {:<24} {:<10} {:>8} {:<5} {:>10}  kernel attribution\n",
        "lockspace", "resource", "state", "pid", "mode", "for"
    );
    for row in rows {
        let mode = match row.info.requested {
            Some(requested) if row.state != "holding" => mode_name(Some(requested)),
            _ => mode_name(row.info.granted),
        };
        let attribution = row.info.attribution.as_ref().map_or_else(|| "-".to_owned(), attribution_text);
        out.push_str(&format!(
            "{:<12} {:<24} {:<10} {:>8} {:<5} {:>8}ms  {attribution}\n",
            row.lockspace, row.resource, row.state, row.info.pid, mode, row.info.phase_ms
        ));
    }
    out
}

pub async fn run(args: &TraceDlmArgs) -> ExitCode {
    let client = match args.agent.connect().await {
        Ok(client) => client,
        Err(code) => return ExitCode::from(code),
    };
    match client.status().await {
        Ok(status) if !status.ebpf && !args.json => {
            eprintln!("note: the agent's eBPF programs are off: no kernel attribution, only waits and holds");
        }
        Ok(_) => {}
        Err(error) => return ExitCode::from(call_failed(&error)),
    }
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    loop {
        let rows = match snapshot(&client, args).await {
            Ok(rows) => rows,
            Err(code) => return ExitCode::from(code),
        };
        if !args.json {
            println!("--- {} locks ---", rows.len());
        }
        print!("{}", render(&rows, args.json));
        let next = tokio::time::Instant::now() + args.interval;
        if deadline.is_some_and(|d| next > d) {
            return ExitCode::SUCCESS;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        }
    }
}
