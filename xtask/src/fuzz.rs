//! `cargo xtask fuzz`: runs every cargo-fuzz target of `tests/fuzz` in
//! turn (nightly toolchain, coverage-guided libFuzzer, debug assertions on
//! so the engine's invariant checks run), from the seed corpus in the
//! repository, and reports each target's executions and crashes. A crash
//! leaves its input in `tests/fuzz/artifacts/<target>/`: replay it with
//! `cargo +nightly fuzz run --fuzz-dir tests/fuzz -s none -a <target> <file>`
//! (`-s address` if it was found with `--sanitizer address`)
//! and make it a regression test.

/// Every target, in the order they run.
pub const TARGETS: &[&str] = &["framed_frames", "client_messages", "peer_wire", "config_toml"];

const FUZZ_DIR: &str = "tests/fuzz";

/// What one target did.
pub struct Outcome {
    /// The target.
    pub target: &'static str,
    /// Inputs run.
    pub executions: u64,
    /// Whether it found a crash.
    pub crashed: bool,
}

/// How a run of the targets goes.
pub struct Options {
    /// Seconds per target.
    pub seconds: u64,
    /// Inputs per target, if fewer than the time allows.
    pub runs: Option<u64>,
    /// cargo-fuzz's sanitizer: `none` (fast; the workspace has no unsafe
    /// code) or `address` (ASan: memory errors in dependencies' unsafe code).
    pub sanitizer: &'static str,
}

/// The short run of each target in the test command.
pub const SMOKE: Options = Options { seconds: 10, runs: None, sanitizer: "none" };

const USAGE: &str = "usage: cargo xtask fuzz [--time T] [--runs N] [--sanitizer none|address]";

/// Parses `--time T` (seconds per target: `30`, `30s`, `10m`), `--runs N`
/// and `--sanitizer none|address`.
fn options(args: &[String]) -> Result<Options, String> {
    let mut options = Options { seconds: 60, runs: None, sanitizer: "none" };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--time" => options.seconds = crate::seconds_of("--time", args.next())?,
            "--runs" => {
                let text = args.next().ok_or("--runs needs a number")?;
                options.runs = Some(text.parse().map_err(|_| format!("--runs {text}: not a number"))?);
            }
            "--sanitizer" => {
                options.sanitizer = match args.next().map(String::as_str) {
                    Some("none") => "none",
                    Some("address") => "address",
                    other => return Err(format!("--sanitizer {other:?}: none or address; {USAGE}")),
                };
            }
            other => return Err(format!("unknown option {other:?}; {USAGE}")),
        }
    }
    Ok(options)
}

/// Runs one target for `options.seconds` (or `options.runs` inputs,
/// whichever ends first).
pub fn run_target(target: &'static str, options: &Options) -> Result<Outcome, String> {
    let corpus = format!("{FUZZ_DIR}/corpus/{target}");
    std::fs::create_dir_all(&corpus).map_err(|e| format!("{corpus}: {e}"))?;
    let mut args = vec![
        "+nightly".to_string(),
        "fuzz".into(),
        "run".into(),
        "--fuzz-dir".into(),
        FUZZ_DIR.into(),
        "--sanitizer".into(),
        options.sanitizer.into(),
        "--debug-assertions".into(),
        target.into(),
        "--".into(),
        format!("-max_total_time={}", options.seconds),
        "-print_final_stats=1".into(),
        "-max_len=4096".into(),
    ];
    if let Some(runs) = options.runs {
        args.push(format!("-runs={runs}"));
    }
    eprintln!("xtask: $ cargo {}", args.join(" "));
    let mut child = crate::cargo()
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
    // libFuzzer reports on stderr: its periodic lines are shown as
    // progress, and everything is kept for the figures and a crash's report.
    let mut stderr = String::new();
    let reader = std::io::BufReader::new(child.stderr.take().expect("piped"));
    for line in std::io::BufRead::lines(reader).map_while(Result::ok) {
        // libFuzzer's lines are "#<count>\t<event> …": pulse (at each power
        // of two) and DONE are the progress worth showing.
        if line.contains("\tpulse") || line.contains("\tDONE") {
            eprintln!("xtask: {target}: {line}");
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = child.wait().map_err(|e| format!("cargo fuzz: {e}"))?;
    let executions = stderr
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let crashed = !status.success();
    if crashed {
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok(Outcome { target, executions, crashed })
}

/// `cargo xtask fuzz [--time T] [--runs N] [--sanitizer none|address]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let options = options(args)?;
    let mut outcomes = Vec::new();
    for target in TARGETS {
        outcomes.push(run_target(target, &options)?);
    }
    report(&outcomes)
}

/// Prints a line per target; an error if any crashed or ran nothing.
pub fn report(outcomes: &[Outcome]) -> Result<(), String> {
    println!("{:<18} {:>14} crashes", "target", "executions");
    for o in outcomes {
        println!("{:<18} {:>14} {}", o.target, o.executions, u8::from(o.crashed));
    }
    let failed: Vec<&str> = outcomes.iter().filter(|o| o.crashed || o.executions == 0).map(|o| o.target).collect();
    if failed.is_empty() {
        println!("fuzz: {} targets, 0 crashes", outcomes.len());
        Ok(())
    } else {
        Err(format!("fuzz targets crashed or ran nothing: {failed:?} (inputs in {FUZZ_DIR}/artifacts/)"))
    }
}
