//! The eBPF programs against workloads each test makes itself: real kernel
//! programs on real tracepoints. They need root (or CAP_BPF+CAP_PERFMON):
//! elsewhere they say so and return; under `CI=true` that is a failure.

use std::{
    process::{Command, Stdio},
    sync::{Arc, Barrier, Mutex},
    time::{Duration, Instant},
};

use dlm_agent::ebpf::{
    Family, Probes, Settings, programs,
    report::{self, Filter},
    symbols::KernelSymbols,
    tracefs,
};
use support::{Agent, LowMemoryCgroup, ebpf_available};

fn probes(settings: Settings, family: Family) -> Probes {
    let mut probes = Probes::load(&settings).expect("load");
    probes.attach(&[family]).expect("attach");
    probes
}

fn only(pid: u32) -> Filter {
    Filter { pids: Some([pid].into()), comm: None }
}

#[test]
fn tracepoint_field_offsets_match_the_running_kernel() {
    if !ebpf_available("tracepoint_field_offsets_match_the_running_kernel") {
        return;
    }
    let root = tracefs::ensure_mounted().expect("tracefs");
    for (category, name, field, offset, size) in programs::FIELD_OFFSETS {
        let fields = tracefs::read_format(&root, category, name).unwrap_or_else(|e| panic!("{category}/{name}: {e}"));
        let found = fields
            .iter()
            .find(|f| f.name == *field)
            .unwrap_or_else(|| panic!("{category}/{name} has no field {field}: {fields:?}"));
        assert_eq!(
            (found.offset, found.size),
            (*offset, *size),
            "{category}/{name}.{field}: the programs read it at offset {offset} size {size}"
        );
    }
    // BTF tracepoints read task_struct fields at offsets from the kernel's BTF.
    let (offsets, futex) = dlm_agent::ebpf::btf::task_offsets().expect("task_struct offsets from BTF");
    if cfg!(target_arch = "x86_64") {
        assert!(futex.is_some_and(|f| f.offset > 0), "pt_regs.orig_ax from BTF: {futex:?}");
    }
    let (pid, tgid, run_delay) = (offsets.pid, offsets.tgid, offsets.run_delay);
    assert!(pid > 0 && tgid > 0 && pid != tgid, "pid at {pid}, tgid at {tgid}");
    assert!(run_delay > 0 && run_delay % 8 == 0 && run_delay != pid && run_delay != tgid, "run_delay at {run_delay}");
    for attachment in programs::ATTACHMENTS.iter().filter(|a| a.category != programs::BTF) {
        assert!(
            root.join("events").join(attachment.category).join(attachment.tracepoint).is_dir(),
            "missing tracepoint {}:{}",
            attachment.category,
            attachment.tracepoint
        );
    }
}

#[test]
fn threads_contending_on_a_mutex_show_futex_waits_for_their_process() {
    if !ebpf_available("futex") {
        return;
    }
    let me = std::process::id();
    let probes = probes(Settings { target_tgid: me, ..Settings::default() }, Family::Futex);
    let lock = Arc::new(Mutex::new(0u64));
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (lock, start) = (lock.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..50 {
                    let mut guard = lock.lock().expect("lock");
                    *guard += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    let rows = report::futex_rows(&probes, &only(me)).expect("read");
    let waits: u64 = rows.iter().map(|r| r.stat.count).sum();
    let waited: u64 = rows.iter().map(|r| r.stat.total_ns).sum();
    assert!(waits >= 20, "expected many futex waits in this process, saw {waits}: {rows:?}");
    assert!(waited >= 20_000_000, "expected at least 20 ms of futex waits, saw {waited} ns");
    assert!(rows.iter().all(|r| r.tgid == me), "TARGET_TGID keeps other processes out");
    assert!(rows.iter().any(|r| r.op == "wait_bitset" || r.op == "wait"), "{rows:?}");
}

#[test]
fn a_sleeper_shows_blocked_time_and_busy_processes_on_one_cpu_show_run_queue_delay() {
    if !ebpf_available("offcpu") {
        return;
    }
    let probes = probes(Settings::default(), Family::Sched);
    let mut sleeper = Command::new("sleep").arg("0.3").spawn().expect("sleep");
    // Two busy loops pinned to one CPU: each waits for the other's slices.
    // (taskset execs python, so the pid we know is the spinner's.)
    let busy = || {
        Command::new("taskset")
            .args(["-c", "0", "python3", "-c", "import time\nt = time.time()\nwhile time.time() - t < 1: pass"])
            .spawn()
            .expect("taskset")
    };
    let mut spinners = [busy(), busy()];
    let sleeper_pid = sleeper.id();
    let spinner_pids: Vec<u32> = spinners.iter().map(|c| c.id()).collect();
    sleeper.wait().expect("sleeper");
    for spinner in &mut spinners {
        spinner.wait().expect("spinner");
    }
    let rows = report::offcpu_rows(&probes, &Filter::default()).expect("read");
    let sleeper_row = rows.iter().find(|r| r.tgid == sleeper_pid).expect("the sleeper is seen");
    assert!(
        sleeper_row.stat.blocked.total_ns >= 250_000_000,
        "sleep 0.3 blocks about 300 ms: {:?}",
        sleeper_row.stat.blocked
    );
    assert!(sleeper_row.stat.blocked.total_ns < 1_000_000_000, "nor much more: {:?}", sleeper_row.stat.blocked);
    assert!(sleeper_row.stat.voluntary >= 1);
    let spinners: Vec<_> = rows.iter().filter(|r| spinner_pids.contains(&r.tgid)).collect();
    let queued: u64 = spinners.iter().map(|r| r.stat.runq.total_ns).sum();
    let preempted: u64 = spinners.iter().map(|r| r.stat.involuntary).sum();
    assert!(queued >= 200_000_000, "two spinners on one CPU for 1 s wait ~1 s in total; saw {queued} ns");
    assert!(queued <= 2_500_000_000, "not more than they lived: {queued} ns");
    assert!(preempted >= 2, "the spinners are preempted: {preempted}");
}

#[test]
fn probes_loaded_without_sched_slots_refuse_the_sched_family_and_attach_the_rest() {
    if !ebpf_available("load settings") {
        return;
    }
    let mut probes = Probes::load(&Settings { sched: false, ..Settings::default() }).expect("load");
    let error = probes.attach(&[Family::Sched]).expect_err("no per-thread slots");
    assert!(error.to_string().contains("per-thread slots"), "{error}");
    probes.attach(&[Family::Holders]).expect("holders attach");
    assert!(!probes.attached().contains(&Family::Sched));
    let fill = probes.map_fill();
    let task_sched = fill.iter().find(|f| f.map == "TASK_SCHED").expect("TASK_SCHED in the fill report");
    assert_eq!(task_sched.capacity, 1024, "left at its minimum");
}

#[test]
fn concurrent_mmap_and_munmap_show_kernel_lock_contention_with_a_resolvable_stack() {
    if !ebpf_available("locks") {
        return;
    }
    let me = std::process::id();
    let probes = probes(Settings { target_tgid: me, ..Settings::default() }, Family::Locks);
    let deadline = Instant::now() + Duration::from_millis(1500);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                // Large allocations are mmap'd and munmap'd by malloc; touching
                // them faults under the mmap lock that munmap takes for write.
                while Instant::now() < deadline {
                    let mut block = vec![0u8; 4 << 20];
                    for page in block.iter_mut().step_by(4096) {
                        *page = 1;
                    }
                    std::hint::black_box(&block);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    let rows = report::lock_rows(&probes, &KernelSymbols::load(), &Filter::default()).expect("read");
    assert!(!rows.is_empty(), "no kernel lock contention seen");
    let resolved = rows.iter().find(|row| row.stack.len() >= 2 && !row.stack[0].starts_with("0x"));
    let resolved = resolved.unwrap_or_else(|| panic!("no row with a symbolized stack: {rows:?}"));
    assert_ne!(resolved.caller, "[unknown]");
    assert!(rows.iter().all(|row| row.lock_type != "unknown"), "{rows:?}");
}

#[test]
fn writing_past_a_low_cgroup_limit_shows_reclaim_stalls_and_an_oom_kill() {
    if !ebpf_available("reclaim") {
        return;
    }
    let mut probes = probes(Settings { long_stall: Duration::from_micros(1), ..Settings::default() }, Family::Memory);
    let mut events = probes.take_events().expect("ring buffer");
    let cgroup = LowMemoryCgroup::create("reclaim", 16 << 20).expect("a memory cgroup (root needed)");
    // Page cache beyond the limit: reclaimed (not killed) on every charge.
    // On disk (the target directory), not tmpfs: clean page cache is what
    // memcg reclaim can take back.
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reclaim-{}.bin", std::process::id()));
    let status = cgroup.run(&format!("dd if=/dev/zero of={} bs=1M count=96 conv=fsync status=none", file.display()));
    let _ = std::fs::remove_file(&file);
    assert!(status.success(), "dd in the cgroup failed");
    // Anonymous memory beyond the limit, with no swap: the OOM killer.
    let status = cgroup.run("exec python3 -c 'a = bytearray(256 << 20); a[::4096] = b\"x\" * len(a[::4096])'");
    assert!(!status.success(), "the allocation past the limit should have been killed");
    std::thread::sleep(Duration::from_millis(200));

    let rows = report::stall_rows(&probes, &Filter::default()).expect("read");
    let memcg: Vec<_> = rows.iter().filter(|r| r.kind == "memcg_reclaim").collect();
    assert!(!memcg.is_empty(), "no memcg reclaim stall seen: {rows:?}");
    assert!(memcg.iter().map(|r| r.stat.count).sum::<u64>() >= 1);
    assert!(memcg.iter().any(|r| r.comm == "dd"), "dd has exited; its recorded name stays: {memcg:?}");
    let mut kinds = Vec::new();
    while let Some(item) = events.next() {
        if let Some(event) = dlm_agent::ebpf::decode_event(&item) {
            let comm = String::from_utf8_lossy(&event.comm).trim_end_matches('\0').to_owned();
            kinds.push((event.kind, event.pid, comm, event.value));
        }
    }
    assert!(
        kinds.iter().any(|(kind, _, comm, anon_pages)| {
            // It was killed past a 16 MiB limit: most of that is its own
            // anonymous memory (4 KiB pages).
            *kind == dlm_ebpf_common::event_kinds::OOM_VICTIM && comm == "python3" && *anon_pages >= 1024
        }),
        "no OOM victim event for python3 with its anonymous pages: {kinds:?}"
    );
    assert!(
        kinds.iter().any(|(kind, _, _, _)| *kind == dlm_ebpf_common::event_kinds::LONG_STALL),
        "no long-stall event with a 1 µs threshold: {kinds:?}"
    );
}

#[test]
fn trace_commands_print_json_views() {
    if !ebpf_available("trace commands") {
        return;
    }
    for family in ["locks", "futex", "offcpu", "reclaim"] {
        let output = Command::new(support::bin())
            .args(["trace", family, "--duration", "300ms", "--json"])
            .output()
            .expect("dlm-agent trace");
        assert!(output.status.success(), "trace {family}: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8_lossy(&output.stdout);
        let view: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("trace {family} --json printed {text:?}: {e}"));
        assert!(view["elapsed_s"].as_f64().is_some_and(|s| s >= 0.3), "{view}");
    }
    let output = Command::new(support::bin())
        .args(["trace", "offcpu", "--duration", "500ms", "--folded", "--min-block", "10ms"])
        .output()
        .expect("dlm-agent trace offcpu --folded");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let folded: Vec<&str> = text.lines().filter(|line| !line.starts_with("---")).collect();
    assert!(!folded.is_empty(), "no folded stacks in 500 ms on a live machine");
    for line in folded {
        let (stack, value) = line.rsplit_once(' ').expect("stack and value");
        assert!(value.parse::<u64>().is_ok_and(|us| us > 0), "{line}");
        assert!(stack.contains(';'), "comm;frames: {line}");
    }
}

/// Sleeps in 20 ms naps until `until`, entering the kernel from this very
/// function (a raw `nanosleep`, not libc's wrapper), so that the innermost
/// user frame of its off-CPU stacks is this function whatever the unwinder.
#[inline(never)]
#[allow(unsafe_code)]
fn dlm_offcpu_test_sleeper(until: Instant) {
    let nap: [i64; 2] = [0, 20_000_000];
    while Instant::now() < until {
        // SAFETY: nanosleep(2) reads the timespec above and writes nothing
        // (no remainder pointer); rcx and r11 are clobbered by `syscall`.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") 35i64 => _,
                in("rdi") nap.as_ptr(),
                in("rsi") 0usize,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
    }
}

#[test]
fn folded_offcpu_stacks_name_user_space_functions_and_render_a_flame_graph() {
    if !ebpf_available("named user frames") {
        return;
    }
    let until = Instant::now() + Duration::from_secs(3);
    let sleeper = std::thread::spawn(move || dlm_offcpu_test_sleeper(until));
    let dir = support::Scratch::new("offcpu");
    let svg = dir.join("offcpu.svg");
    let output = Command::new(support::bin())
        .args(["trace", "offcpu", "--duration", "1500ms", "--folded", "--min-block", "5ms", "--flamegraph"])
        .arg(&svg)
        .output()
        .expect("dlm-agent trace offcpu");
    sleeper.join().expect("the sleeper");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let ours: Vec<&str> = text.lines().filter(|line| line.contains("dlm_offcpu_test_sleeper")).collect();
    assert!(!ours.is_empty(), "no folded stack names the sleeping function:\n{text}");
    for line in &ours {
        // comm;user frames;kernel frames count, innermost last: the sleeper
        // enters the kernel's nanosleep, and no BPF frame is left in.
        assert!(line.contains("nanosleep") && !line.contains("bpf_prog_"), "{line}");
    }
    let picture = std::fs::read_to_string(&svg).expect("the flame graph was written");
    assert!(picture.contains("<svg") && picture.contains("dlm_offcpu_test_sleeper"), "the SVG names the function");
    // With --lines, the frame says where in this file it slept.
    let until = Instant::now() + Duration::from_secs(2);
    let sleeper = std::thread::spawn(move || dlm_offcpu_test_sleeper(until));
    let output = Command::new(support::bin())
        .args(["trace", "offcpu", "--duration", "1s", "--folded", "--lines", "--min-block", "5ms"])
        .output()
        .expect("dlm-agent trace offcpu --lines");
    sleeper.join().expect("the sleeper");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.lines().any(|line| line.contains("dlm_offcpu_test_sleeper_[ebpf.rs:")),
        "no frame of the sleeper with its file and line:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_that_sleeps_has_its_blocked_time_in_dump_and_metrics() {
    if !ebpf_available("attribution") {
        return;
    }
    let agent = Agent::start_with_env("attribution", "", &[("DLM_NO_EBPF", "false".into())]);
    // The CLI holds the lock; the command it runs (a child) does the
    // sleeping and the spinning, and is accounted to the CLI's lock.
    let mut holder = agent
        .cli()
        .args([
            "lock",
            "squeezed",
            "--",
            "sh",
            "-c",
            // Sleeps, then two spinners share one CPU (each waits on the run
            // queue about half the time), then a thread waits 300 ms for a
            // lock another holds (a futex wait).
            "sleep 0.4; spin() { taskset -c 0 timeout 0.3 sh -c 'while :; do :; done'; }; spin & spin; wait; \
             python3 -c 'import threading, time; held = threading.Lock(); held.acquire(); \
             waiter = threading.Thread(target=held.acquire); waiter.start(); time.sleep(0.3); held.release(); waiter.join()'; true",
        ])
        .spawn()
        .expect("dlm-agent lock");
    tokio::time::sleep(Duration::from_millis(550)).await;
    let output = agent.cli().args(["dump", "--json", "squeezed"]).output().expect("dump");
    let dump: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let lock = &dump[0]["granted"][0];
    let blocked = lock["attribution"]["blocked_ns"].as_u64().expect("attribution in dump");
    assert!(blocked >= 300_000_000, "the holder's child slept 400 ms: {lock}");
    assert!(lock["phase_ms"].as_u64().is_some_and(|ms| ms >= 400), "{lock}");
    let output = agent.cli().args(["trace", "dlm", "--json", "--duration", "100ms"]).output().expect("trace dlm");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let view: serde_json::Value = serde_json::from_slice(&output.stdout).expect("trace dlm --json");
    let traced = &view["locks"][0];
    assert_eq!(traced["resource"], "squeezed", "{view}");
    assert_eq!(traced["state"], "holding", "{view}");
    assert!(traced["attribution"]["blocked_ns"].as_u64().is_some_and(|ns| ns >= 300_000_000), "{view}");
    assert!(holder.wait().expect("holder").success());

    let metrics = agent.metrics();
    let value = |state: &str| {
        let prefix = format!("dlm_lock_kernel_attributed_seconds_total{{phase=\"hold\",state=\"{state}\"}} ");
        metrics.lines().find_map(|line| line.strip_prefix(&prefix)?.parse::<f64>().ok()).unwrap_or(0.0)
    };
    assert!(value("blocked") >= 0.3, "hold blocked time: {}", value("blocked"));
    assert!(value("oncpu") >= 0.1, "the spinning children's CPU time counts for the hold: {}", value("oncpu"));
    assert!(value("runqueue") >= 0.1, "the spinners waited for the CPU they share: {}", value("runqueue"));
    assert!(value("futex") >= 0.2, "a thread waited 300 ms for a lock: {}", value("futex"));
    assert!(value("futex") <= value("blocked"), "futex waits are part of the blocked time");
    assert!(metrics.contains("dlm_ebpf_enabled 1"), "{metrics}");
}

#[test]
fn as_another_user_with_only_cap_bpf_and_cap_perfmon_the_agent_attaches_all_its_default_programs() {
    if !ebpf_available("capabilities") {
        return;
    }
    // Switching to another user takes root.
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|status| status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    if !root {
        assert!(!support::under_ci(), "capabilities: this test needs root under CI=true");
        eprintln!("skipping capabilities: needs root to run the agent as another user");
        return;
    }
    let caps = "-all,+bpf,+perfmon";
    let (inheritable, ambient, bounding) =
        (format!("--inh-caps={caps}"), format!("--ambient-caps={caps}"), format!("--bounding-set={caps}"));
    let wrapper = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", &inheritable, &ambient, &bounding];
    let agent = Agent::start_wrapped("caps", "", &[("DLM_NO_EBPF", "false".into())], &wrapper);
    let metrics = agent.metrics();
    assert!(metrics.contains("dlm_ebpf_enabled 1"), "log:\n{}", agent.log());
    // Every program of the default families is a BTF tracepoint: they need
    // no tracefs, which this user cannot read.
    let default_links = programs::ATTACHMENTS.iter().filter(|a| Family::AGENT_DEFAULT.contains(&a.family)).count();
    // The gauge comes with the collector's first reading of the maps.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut links = support::metric_value(&metrics, "dlm_ebpf_programs_attached");
    while links == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        links = support::metric_value(&agent.metrics(), "dlm_ebpf_programs_attached");
    }
    assert_eq!(links, default_links as f64, "log:\n{}", agent.log());
    assert!(!agent.log().contains("not attached") && !agent.log().contains("in part"), "{}", agent.log());
    let status = agent.cli().args(["lock", "caps", "--", "true"]).status().expect("dlm-agent lock");
    assert!(status.success(), "a lock works; log:\n{}", agent.log());
}

#[test]
fn without_permission_the_agent_runs_on_and_says_so() {
    // `--no-ebpf` is the same path as a refusal: one log line, the metric at
    // 0, and locks still work.
    let agent = Agent::start("no-ebpf", "");
    let metrics = agent.metrics();
    assert!(metrics.contains("dlm_ebpf_enabled 0"), "{metrics}");
    assert!(metrics.contains("dlm_ebpf_programs_attached 0"), "{metrics}");
    let status = agent.cli().args(["lock", "plain", "--", "true"]).status().expect("lock");
    assert!(status.success());
    assert!(agent.log().contains("eBPF observation is off"), "{}", agent.log());
}

#[test]
fn bpftrace_sees_the_agents_probe_points() {
    if !ebpf_available("bpftrace probes") {
        return;
    }
    if Command::new("bpftrace").arg("--version").output().is_err() {
        assert!(!support::under_ci(), "bpftrace is required under CI=true (cargo xtask setup installs it)");
        eprintln!("skipping bpftrace_sees_the_agents_probe_points: bpftrace is not installed");
        return;
    }
    let agent = Agent::start("probes", "");
    let binary = std::fs::canonicalize(support::bin()).expect("binary path");
    let binary = binary.display();
    let script = format!(
        r#"usdt:{binary}:dlm:lock__request {{ printf("request %s/%s mode=%d\n", str(arg0), str(arg1), arg2); }}
usdt:{binary}:dlm:lock__grant {{ printf("grant %s/%s mode=%d wait=%d token=%d pid=%d\n", str(arg0), str(arg1), arg2, arg3, arg4, arg5); }}
usdt:{binary}:dlm:lock__blocking {{ printf("blocking %s/%s mode=%d\n", str(arg0), str(arg1), arg2); }}
usdt:{binary}:dlm:lock__release {{ printf("release %s/%s hold=%d token=%d\n", str(arg0), str(arg1), arg3, arg4); }}"#
    );
    let out_path = agent.dir.join("bpftrace.out");
    let mut tracer = Command::new("bpftrace")
        .args(["-e", &script])
        .stdout(std::fs::File::create(&out_path).expect("out"))
        .stderr(Stdio::null())
        .spawn()
        .expect("bpftrace");
    let deadline = Instant::now() + Duration::from_secs(30);
    // bpftrace says "Attaching" before the probes are live: lock a warm-up
    // resource until it sees that.
    while !std::fs::read_to_string(&out_path).unwrap_or_default().contains("request default/warmup") {
        assert!(Instant::now() < deadline, "bpftrace did not attach");
        agent.cli().args(["lock", "warmup", "--", "true"]).status().expect("warm-up lock");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut holder = agent.cli().args(["lock", "probed", "--", "sleep", "0.3"]).spawn().expect("holder");
    std::thread::sleep(Duration::from_millis(100));
    let waiter = agent.cli().args(["lock", "probed", "--", "true"]).status().expect("waiter");
    assert!(waiter.success() && holder.wait().expect("holder").success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let output = loop {
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        if output.matches("release default/probed").count() >= 2 || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = tracer.kill();
    let _ = tracer.wait();
    assert_eq!(output.matches("request default/probed mode=5").count(), 2, "{output}");
    assert!(output.contains("blocking default/probed mode=5"), "{output}");
    // Fencing tokens come from one counter per lockspace (the warm-up took
    // some): the two grants are consecutive, and the second waited.
    let grants: Vec<(u64, u64)> = output
        .lines()
        .filter(|line| line.starts_with("grant default/probed"))
        .filter_map(|line| {
            let field = |name: &str| line.split(name).nth(1)?.split(' ').next()?.parse::<u64>().ok();
            Some((field("wait=")?, field("token=")?))
        })
        .collect();
    assert_eq!(grants.len(), 2, "{output}");
    assert_eq!(grants[1].1, grants[0].1 + 1, "{output}");
    assert!(grants[1].0 >= 100_000_000, "the waiter waited for the 300 ms holder: {output}");
    assert_eq!(output.matches("release default/probed").count(), 2, "{output}");
}
