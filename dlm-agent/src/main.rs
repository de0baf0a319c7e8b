//! `dlm-agent`: the dlm node service and its command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// The dlm node agent: a distributed lock manager service and its tools.
#[derive(Parser)]
#[command(name = "dlm-agent", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (with no options: single node, embedded default configuration).
    Run(cli::run::RunArgs),
    /// Run a command while holding a lock, like flock(1).
    Lock(cli::lock::LockArgs),
    /// Show the agent's status. Exit status: 0 running, 2 recovering, 3 a lost node waits
    /// for fencing, 4 not in a quorate view (fenced, not quorate, or not joined yet).
    Status(cli::inspect::StatusArgs),
    /// Acknowledge by hand that a lost node is fenced, so that its locks are recovered.
    FenceAck(cli::cluster::FenceAckArgs),
    /// Make a CA and certificates for the peer links and TCP clients.
    Certs(cli::certs::CertsArgs),
    /// List lockspaces.
    Ls(cli::inspect::LsArgs),
    /// Create or release a lockspace (administrators only).
    #[command(subcommand)]
    Lockspace(cli::lockspace::LockspaceCommand),
    /// Show resources with their granted, converting and waiting locks.
    Dump(cli::inspect::DumpArgs),
    /// Profile kernel contention live with eBPF (needs root or CAP_BPF+CAP_PERFMON)
    #[command(subcommand)]
    Trace(cli::trace::TraceCommand),
}

/// The async runtime's worker threads: `DLM_WORKER_THREADS`, else half the
/// CPUs, from 1 to 4. The lock engine is one task whatever the count; more
/// workers only spread the clients' gRPC and the peers' I/O, and every
/// hand-off between workers costs a thread wake-up. On a 2-CPU node one
/// worker measured faster on every row of the benchmarks (lock latency
/// and throughput up to 128 clients), and it leaves a CPU to the
/// applications taking the locks.
fn worker_threads() -> usize {
    if let Some(threads) = std::env::var("DLM_WORKER_THREADS").ok().and_then(|t| t.parse::<usize>().ok()) {
        return threads.max(1);
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (cpus / 2).clamp(1, 4)
}

/// The runtime for `workers` threads. One is a current-thread runtime: every
/// task on the thread that runs `main`, with none of the multi-thread
/// scheduler's work stealing, wake-ups of idle workers or per-poll
/// statistics. Side by side with a one-worker multi-thread runtime (peer
/// benchmark, 2 runs each of 2 repetitions, release), it raised one-CPU
/// throughput 16-19 % at 8 to 128 clients and unpinned 7-14 % at 32 and
/// 128 clients, and cut the agent's CPU per pair 6 %.
fn runtime_builder(workers: usize) -> tokio::runtime::Builder {
    if workers == 1 {
        return tokio::runtime::Builder::new_current_thread();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers);
    builder
}

/// The most threads for blocking work (tokio's default is 512).
const BLOCKING_THREADS_MAX: usize = 16;

/// How long an idle blocking thread is kept (tokio's default is 10 s).
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn main() -> ExitCode {
    let args = Args::parse();
    if matches!(args.command, Command::Run(_)) {
        // Before the runtime's threads exist (see `resident::one_arena`).
        dlm_agent::resident::one_arena();
    }
    let workers = worker_threads();
    let mut builder = runtime_builder(workers);
    builder.on_thread_park(dlm_agent::spin::before_park).on_thread_unpark(dlm_agent::spin::after_unpark);
    // Threads for blocking work (generation writes, file reads) are few and
    // kept: tokio's default ends one after 10 s idle and makes a new one when
    // next needed, a fresh stack of pages each time — allocated, and locked
    // with the rest of a resident agent, when the node may be short of memory.
    builder.max_blocking_threads(BLOCKING_THREADS_MAX).thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE);
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dlm-agent: cannot start the async runtime: {error}");
            return ExitCode::from(cli::EXIT_SOFTWARE);
        }
    };
    if matches!(args.command, Command::Run(_)) {
        // Now, while the runtime's epoll instance is the only one. Why it
        // stays off, if it does, is in the agent's log at start.
        let _ = dlm_agent::spin::enable(dlm_agent::spin::configured(), workers == 1);
    }
    runtime.block_on(async {
        match args.command {
            Command::Run(args) => cli::run::run(args).await,
            Command::Lock(args) => cli::lock::run(args).await,
            Command::Status(args) => cli::inspect::status(args).await,
            Command::FenceAck(args) => cli::cluster::fence_ack(args).await,
            Command::Certs(args) => cli::certs::run(&args),
            Command::Ls(args) => cli::inspect::ls(args).await,
            Command::Lockspace(command) => cli::lockspace::run(command).await,
            Command::Dump(args) => cli::inspect::dump(args).await,
            Command::Trace(command) => cli::trace::run(command).await,
        }
    })
}
