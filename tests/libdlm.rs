//! Programs written for the Linux DLM's libdlm, unchanged, on dlm: C
//! programs (`tests/libdlm/*.c`) compiled against Debian's `libdlm-dev`
//! header and linked `-ldlm` / `-ldlm_lt` against Debian's library, then run
//! with dlm's `libdlm.so.3` / `libdlm_lt.so.3` first on `LD_LIBRARY_PATH`,
//! on a three-node cluster, across nodes: lvmlockd's call sequence (NOQUEUE
//! refusals, value blocks, orphans adopted and purged), a threaded program's
//! completion and blocking callbacks, and a polling program's
//! `dlm_get_fd` / `dlm_dispatch`. And every function Debian's library
//! exports, exported by dlm's. `cargo xtask setup` installs `libdlm-dev` and
//! the compiler; without them these tests say so and skip (a failure under
//! `CI=true`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::libdlm::{available, compile, library_dir};
use support::{Agent, Cluster, under_ci};

/// Debian's libraries, whose exports dlm's must have.
const DEBIAN_LIBS: &str = "/usr/lib/x86_64-linux-gnu";
const TIMINGS: &str = "deadlock_interval = \"50ms\"\nrelease_delay = \"300ms\"";
/// `EAGAIN` on Linux: a NOQUEUE refusal's `sb_status`.
const EAGAIN: i32 = 11;
/// libdlm's `ECANCEL`: a cancelled request's `sb_status`.
const ECANCEL: i32 = 0x10001;
/// How long one command of a program may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// A running C program: a command in, a line out.
struct Program {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Program {
    fn start(binary: &Path, args: &[&str], agent: &Agent) -> Program {
        let mut child = Command::new(binary)
            .args(args)
            .env("DLM_SOCKET", &agent.socket)
            .env("LD_LIBRARY_PATH", library_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the program starts");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let name = format!("{} {}", binary.file_name().unwrap_or_default().to_string_lossy(), args.join(" "));
        Program { name, stdin: child.stdin.take(), child, lines, seen: Vec::new() }
    }

    /// The next line the program prints.
    fn line(&mut self) -> String {
        let line = self.lines.recv_timeout(ANSWER_WITHIN).unwrap_or_else(|_| {
            panic!("{}: no line within {ANSWER_WITHIN:?}; it printed:\n{}", self.name, self.seen.join("\n"))
        });
        self.seen.push(line.clone());
        line
    }

    /// Sends a line to the program.
    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("the program reads its commands");
    }

    /// Sends a command; its one line of answer.
    fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.line()
    }

    /// Sends a command and checks its answer starts with `expected`.
    fn expect(&mut self, command: &str, expected: &str) -> String {
        let answer = self.ask(command);
        assert!(answer.starts_with(expected), "{}: `{command}` answered {answer:?}, not {expected:?}", self.name);
        answer
    }

    /// Closes stdin and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = support::wait_with_timeout(&mut self.child, ANSWER_WITHIN).expect("the program exits");
        assert!(status.success(), "{} exited {status}; it printed:\n{}", self.name, self.seen.join("\n"));
    }
}

impl Drop for Program {
    /// A program still running when its test ends (it failed) is killed,
    /// not left holding the test's output open.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The exported functions of a shared library.
fn exported_functions(library: &Path) -> Vec<String> {
    let out = Command::new("nm").args(["-D", "--defined-only"]).arg(library).output().expect("nm runs");
    assert!(out.status.success(), "nm {}", library.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
            [_, "T" | "W", name] => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn dlms_libraries_export_every_function_of_debians() {
    if !available() {
        return;
    }
    for soname in ["libdlm.so.3", "libdlm_lt.so.3"] {
        let debian = exported_functions(&Path::new(DEBIAN_LIBS).join(soname));
        assert!(debian.len() >= 20, "Debian's {soname} exports {debian:?}");
        let ours = exported_functions(&library_dir().join(soname));
        let missing: Vec<&String> = debian.iter().filter(|name| !ours.contains(name)).collect();
        assert!(missing.is_empty(), "dlm's {soname} lacks {missing:?}");
        let soname_of = Command::new("objdump").arg("-p").arg(library_dir().join(soname)).output().expect("objdump");
        assert!(String::from_utf8_lossy(&soname_of.stdout).contains(&format!("SONAME               {soname}")));
        println!("{soname}: all {} functions of Debian's library", debian.len());
    }
}

/// lvmlockd's calls (`lvmlockd_calls.c`) on three nodes: its lockspace made
/// on each, a VG lock's value block (the version lvmlockd keeps) passed
/// from node 1 to node 2, NOQUEUE refusals while another node holds, a
/// persistent lock orphaned by a process that exits and adopted by its
/// successor, and orphans purged.
#[test]
fn lvmlockds_call_sequence_runs_unchanged_across_nodes() {
    if !available() {
        return;
    }
    let binary = compile("lvmlockd_calls", "dlm_lt");
    let cluster = Cluster::start("libdlm-lvm", 3, TIMINGS);
    let [node1, node2, _] = &cluster.agents[..] else { panic!("three nodes") };

    let mut a = Program::start(&binary, &[], node1);
    a.expect("version", "version 6.0.2");
    a.expect("join lvm_vg1", "joined");
    let mut b = Program::start(&binary, &[], node2);
    b.expect("join lvm_vg1", "joined");

    // The VG lock: EX on node 1 refuses node 2 (NOQUEUE), then the version
    // node 1 wrote going down reaches node 2 in the value block.
    a.expect("create VGLK 1", "created VGLK");
    b.expect("create VGLK 1", "created VGLK");
    a.expect("lock VGLK EX", "granted VGLK EX");
    b.expect("lock VGLK EX", "busy VGLK");
    b.expect("lock VGLK PR", "busy VGLK");
    a.expect("version-of VGLK 7", "version-of");
    a.expect("unlock VGLK", "released VGLK");
    b.expect("lock VGLK PR", "granted VGLK PR version=7 vb=0x101");
    a.expect("lock VGLK PR", "granted VGLK PR version=7");
    a.expect("lock VGLK EX", "busy VGLK");
    b.expect("unlock VGLK", "released VGLK");

    // An LV lock held EX by a process that exits: an orphan, which still
    // refuses node 2, until node 1's next process adopts it and lets it go.
    a.expect("create LV1 0", "created LV1");
    a.expect("lock LV1 EX", "granted LV1 EX");
    a.send("quit");
    a.finish();
    b.expect("create LV1 0", "created LV1");
    b.expect("lock LV1 EX", "busy LV1");
    let mut a2 = Program::start(&binary, &[], node1);
    a2.expect("open lvm_vg1", "opened lvm_vg1");
    a2.expect("adopt LV2 EX", "no-orphan LV2");
    a2.expect("adopt LV1 EX", "adopted LV1");
    b.expect("lock LV1 EX", "busy LV1");
    a2.expect("unlock LV1", "released LV1");
    b.expect("lock LV1 EX", "granted LV1 EX");
    b.expect("unlock LV1", "released LV1");

    // Orphans purged: node 1's next process finds none to adopt, and node 2
    // gets the lock.
    a2.expect("create LV3 0", "created LV3");
    a2.expect("lock LV3 EX", "granted LV3 EX");
    a2.send("quit");
    a2.finish();
    let mut a3 = Program::start(&binary, &[], node1);
    a3.expect("open lvm_vg1", "opened");
    a3.expect("purge", "purged");
    a3.expect("adopt LV3 EX", "no-orphan LV3");
    b.expect("create LV3 0", "created LV3");
    b.expect("lock LV3 EX", "granted LV3 EX");
    b.expect("free LV3", "freed LV3 status=0x10002");
    b.expect("leave lvm_vg1", "left");
    a3.expect("leave lvm_vg1", "left");
    b.finish();
    a3.finish();
}

/// The nanoseconds stamp of a program's event line (`<what> <ns> …`).
fn stamp(line: &str) -> u64 {
    line.split_whitespace().nth(1).and_then(|ns| ns.parse().ok()).unwrap_or_else(|| panic!("no stamp in {line:?}"))
}

/// A threaded program (`ast_bast.c`, `-ldlm`, callbacks on the library's
/// thread): node 1 holds EX; node 2's PR request sends node 1 its blocking
/// callback, from which it writes the value block and converts down; node 2
/// is granted after that, reading what node 1 wrote, then converts to EX.
#[test]
fn a_threaded_programs_callbacks_and_value_block_pass_between_nodes() {
    if !available() {
        return;
    }
    let binary = compile("ast_bast", "dlm");
    let cluster = Cluster::start("libdlm-ast", 3, TIMINGS);
    let mut holder = Program::start(&binary, &["default", "holder"], &cluster.agents[0]);
    let granted = holder.line();
    assert!(granted.starts_with("ast ") && granted.contains("granted-ex status=0"), "{granted}");
    let mut waiter = Program::start(&binary, &["default", "waiter"], &cluster.agents[1]);
    let bast = holder.line();
    assert!(bast.starts_with("bast "), "the holder's blocking callback first: {bast}");
    let down = holder.line();
    assert!(down.contains(" down status=0"), "{down}");
    let written = down.split("lvb=").nth(1).expect("the value block written").to_string();
    assert!(written.starts_with("from-holder-"), "{down}");
    let pr = waiter.line();
    assert!(pr.contains("granted-pr status=0"), "{pr}");
    assert!(pr.ends_with(&format!("lvb={written}")), "node 2 reads node 1's value block: {pr}");
    // The holder's conversion was made before node 2's grant (node 2 reads
    // what it wrote); its own completion may run after node 2's.
    assert!(stamp(&bast) < stamp(&down) && stamp(&bast) < stamp(&pr), "order: {bast} / {down} / {pr}");
    let ex = waiter.line();
    assert!(ex.contains("converted-ex status=0"), "{ex}");
    assert!(holder.line().contains("unlocked status=65538"), "EUNLOCK in the status block");
    assert!(waiter.line().contains("unlocked status=65538"));
    for program in [holder, waiter] {
        program.finish();
    }
}

/// A polling program (`poll_fd.c`, `-ldlm_lt`): the default lockspace's
/// descriptor in poll(), callbacks run by `dlm_dispatch`; node 3's NOQUEUE
/// request is refused (`EAGAIN`) while node 1 holds, and its queued request
/// granted once node 1 lets go.
#[test]
fn a_polling_program_gets_its_callbacks_through_dlm_dispatch() {
    if !available() {
        return;
    }
    let binary = compile("poll_fd", "dlm_lt");
    let cluster = Cluster::start("libdlm-poll", 3, TIMINGS);
    let mut first = Program::start(&binary, &["polled", "first"], &cluster.agents[0]);
    assert_eq!(first.line(), "ast try status=0");
    assert_eq!(first.line(), "holding");
    let mut second = Program::start(&binary, &["polled", "second"], &cluster.agents[2]);
    assert_eq!(second.line(), format!("ast try status={EAGAIN}"));
    first.send("go");
    assert_eq!(first.line(), "ast unlock status=65538");
    assert_eq!(first.line(), "done");
    assert_eq!(second.line(), "ast queued status=0");
    assert_eq!(second.line(), "ast unlock status=65538");
    assert_eq!(second.line(), "done");
    first.finish();
    second.finish();
}

/// A waiting lock call cancelled from another thread (`cancel_wait.c`,
/// `-ldlm`) while node 1 holds the resource: the wait returns, with
/// `ECANCEL` in the status block (the threaded library's waiting calls
/// return 0 and leave the outcome there).
#[test]
fn a_waiting_lock_call_cancelled_from_another_thread_returns_ecancel() {
    if !available() {
        return;
    }
    let holder_binary = compile("poll_fd", "dlm_lt");
    let binary = compile("cancel_wait", "dlm");
    let cluster = Cluster::start("libdlm-cancel", 3, TIMINGS);
    let mut holder = Program::start(&holder_binary, &["contended", "first"], &cluster.agents[0]);
    assert_eq!(holder.line(), "ast try status=0");
    assert_eq!(holder.line(), "holding");
    let mut waiter = Program::start(&binary, &["default", "contended"], &cluster.agents[1]);
    assert_eq!(waiter.line(), "cancel sent rv=0");
    assert_eq!(waiter.line(), format!("wait returned rv=0 status={ECANCEL}"));
    waiter.finish();
    holder.send("go");
    assert_eq!(holder.line(), "ast unlock status=65538");
    holder.finish();
}

/// The set-up installs dlm's library with a pkg-config file: a program
/// built with `pkg-config --libs dlm-libdlm_lt` loads it (no
/// `LD_LIBRARY_PATH`) and takes a lock through the agent.
#[test]
fn a_program_built_with_the_installed_pkg_config_file_uses_dlms_library() {
    if !available() {
        return;
    }
    let libs = Command::new("pkg-config").args(["--libs", "dlm-libdlm_lt"]).output().expect("pkg-config runs");
    if !libs.status.success() {
        assert!(!under_ci(), "cargo xtask setup installs dlm-libdlm_lt.pc (CI=true)");
        eprintln!("skipping: dlm's libdlm is not installed (cargo xtask setup installs it)");
        return;
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("libdlm/poll_fd.c");
    let dir = support::Scratch::new("libdlm-pkgconfig");
    let binary = dir.join("poll_fd");
    let flags = String::from_utf8_lossy(&libs.stdout).to_string();
    let compiled =
        Command::new("cc").arg("-o").arg(&binary).arg(&source).args(flags.split_whitespace()).output().expect("cc");
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    let ldd = Command::new("ldd").arg(&binary).output().expect("ldd runs");
    let resolved = String::from_utf8_lossy(&ldd.stdout).to_string();
    assert!(resolved.lines().any(|l| l.contains("libdlm_lt.so.3 => ") && l.contains("/lib/dlm/")), "{resolved}");
    let agent = Agent::start("libdlm-pkgconfig", "");
    let mut program = Command::new(&binary)
        .args(["installed", "second"])
        .env("DLM_SOCKET", &agent.socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the program starts");
    let status = support::wait_with_timeout(&mut program, ANSWER_WITHIN).expect("it finishes");
    let output = program.wait_with_output().expect("output");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(status.success() && printed.starts_with("ast try status=0\n"), "{printed}");
}
