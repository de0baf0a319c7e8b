//! The real agent binary, driven by its CLI and by the Rust client library
//! over its Unix socket.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlm_agent::client::{LockError, LockOptions, SessionEvent};
use dlm_agent::proto;
use dlm_core::{LockFlags, Mode};
use support::{Agent, eventually};

const EXIT_NOT_ACQUIRED: i32 = 75;
const EXIT_UNREACHABLE: i32 = 69;
const EXIT_USAGE: i32 = 64;

#[test]
fn two_cli_lockers_of_the_same_name_serialize() {
    let agent = Agent::start("serialize", "");
    let journal = agent.dir.join("journal");
    let script = format!("echo start >> {0}; sleep 0.3; echo end >> {0}", journal.display());
    let mut lockers: Vec<_> = (0..2)
        .map(|_| agent.cli().args(["lock", "--mode", "ex", "x", "--", "sh", "-c", &script]).spawn().expect("spawn"))
        .collect();
    for locker in &mut lockers {
        assert!(locker.wait().expect("wait").success());
    }
    let journal = std::fs::read_to_string(&journal).expect("journal");
    assert_eq!(journal, "start\nend\nstart\nend\n", "the two commands overlapped");
}

#[test]
fn the_command_gets_the_fencing_token_and_its_exit_status_is_kept() {
    let agent = Agent::start("token", "");
    let output =
        agent.cli().args(["lock", "t", "--", "sh", "-c", "echo $DLM_FENCING_TOKEN; exit 7"]).output().expect("run");
    assert_eq!(output.status.code(), Some(7));
    let first: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().expect("a token");
    let output = agent.cli().args(["lock", "t", "--", "sh", "-c", "echo $DLM_FENCING_TOKEN"]).output().expect("run");
    let second: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().expect("a token");
    assert!(second > first, "tokens must increase: {first} then {second}");
}

#[test]
fn try_fails_fast_when_held_and_exit_codes_are_distinct() {
    let agent = Agent::start("try", "");
    let mut holder = agent.cli().args(["lock", "held", "--", "sleep", "30"]).spawn().expect("spawn");
    wait_for_holder(&agent, "held");
    let started = Instant::now();
    let status = agent.cli().args(["lock", "--try", "held", "--", "true"]).status().expect("run");
    assert_eq!(status.code(), Some(EXIT_NOT_ACQUIRED));
    assert!(started.elapsed() < Duration::from_secs(2), "--try took {:?}", started.elapsed());
    let status = agent.cli().args(["lock", "--timeout", "200ms", "held", "--", "true"]).status().expect("run");
    assert_eq!(status.code(), Some(EXIT_NOT_ACQUIRED));
    let status = agent.cli().args(["lock", "-l", "missing", "held", "--", "true"]).status().expect("run");
    assert_eq!(status.code(), Some(EXIT_USAGE));
    let status = Command::new(support::bin())
        .args(["lock", "--socket", "/nonexistent/dlm.sock", "x", "--", "true"])
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert_eq!(status.code(), Some(EXIT_UNREACHABLE));
    holder.kill().expect("kill");
    let _ = holder.wait();
}

/// Polls `dump` until `name` has a granted lock.
fn wait_for_holder(agent: &Agent, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let output = agent.cli().args(["dump", "--json", name]).output().expect("dump");
        let dump: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        if dump[0]["granted"].as_array().is_some_and(|g| !g.is_empty()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{name} never got a holder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holders_lock_goes_to_the_waiter() {
    let agent = Agent::start("kill", "");
    let mut holder = agent.cli().args(["lock", "k", "--", "sleep", "30"]).spawn().expect("spawn");
    wait_for_holder(&agent, "k");
    let request =
        proto::DumpRequest { lockspace: "default".into(), name: Some(b"k".to_vec()), ..proto::DumpRequest::default() };
    let holder_lock = agent.client().await.dump(request).await.expect("dump").resources[0].granted[0];
    assert_eq!(holder_lock.pid, i32::try_from(holder.id()).expect("pid"), "dump shows the holder's pid");
    let uid = std::fs::metadata(format!("/proc/{}", holder.id()))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .expect("uid");
    assert_eq!(holder_lock.uid, Some(uid), "dump shows the holder's uid");

    let client = agent.client().await;
    let session = client.session().await.expect("session");
    let waiter = tokio::spawn(async move {
        let guard = session.lock("default", "k", Mode::Ex, LockOptions::default()).await;
        (guard.map(|g| g.fencing_token()), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "the waiter must wait while the holder lives");
    let killed_at = Instant::now();
    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    let (token, granted_at) =
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("granted in time").expect("task");
    assert!(token.expect("granted") > 1);
    eprintln!("killed holder -> waiter granted in {:?}", granted_at.saturating_duration_since(killed_at));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_callback_reaches_the_holder() {
    let agent = Agent::start("bast", "");
    let client = agent.client().await;
    let holder = client.session().await.expect("session");
    let mut events = holder.events();
    let guard = holder.lock("default", "b", Mode::Pr, LockOptions::default()).await.expect("granted");
    let waiter = client.session().await.expect("session");
    let pending =
        tokio::spawn(
            async move { waiter.lock("default", "b", Mode::Ex, LockOptions::default()).await.map(|g| g.mode()) },
        );
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("a callback").expect("event");
    assert_eq!(event, SessionEvent::Blocking { handle: guard.handle(), mode: Mode::Ex });
    guard.unlock().await.expect("unlock");
    assert_eq!(pending.await.expect("task").expect("granted"), Mode::Ex);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_value_blocks_and_conversions_travel_through_the_api() {
    let agent = Agent::start("lvb", "");
    let client = agent.client().await;
    let session = client.session().await.expect("session");
    let valblk = LockOptions { flags: LockFlags::VALBLK, ..LockOptions::default() };
    let mut writer = session.lock("default", "v", Mode::Ex, valblk.clone()).await.expect("granted");
    let before = writer.fencing_token();
    writer.convert(Mode::Nl, valblk.clone(), Some(b"hello".to_vec())).await.expect("down-convert writes");
    assert!(writer.fencing_token() > before);
    let reader = session.lock("default", "v", Mode::Pr, valblk).await.expect("granted");
    assert_eq!(&reader.lvb().expect("lvb")[..5], b"hello");
    assert_eq!(reader.lvb().expect("lvb").len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_locks_are_taken() {
    let agent = Agent::start("metrics", "");
    let granted = |text: &str| -> f64 {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == "dlm_lock_requests_total" && s.labels.get("outcome") == Some("granted"))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let before = granted(&agent.metrics());
    let client = agent.client().await;
    let session = client.session().await.expect("session");
    let guard = session.lock("default", "m", Mode::Ex, LockOptions::default()).await.expect("granted");
    let text = agent.metrics();
    assert_eq!(granted(&text), before + 1.0);
    assert!(text.contains("dlm_lock_granted{lockspace=\"default\"} 1"), "{text}");
    assert!(text.contains("dlm_session_active 1"), "{text}");
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    guard.unlock().await.expect("unlock");
    let text = agent.metrics();
    assert!(text.contains("dlm_lock_hold_seconds_count{lockspace=\"default\",mode=\"EX\"} 1"), "{text}");
    assert!(text.contains("dlm_lock_grant_wait_seconds_count{lockspace=\"default\",mode=\"EX\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_the_agent_keeps_serving() {
    let agent = Agent::start("bad", "[limits]\nlocks_per_session_max = 3\n");
    let client = agent.client().await;
    let session = client.session().await.expect("session");
    let refused = |result: Result<dlm_agent::client::LockGuard, LockError>| match result {
        Err(LockError::Rejected { code, .. }) => code,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a grant"),
    };
    let plain = LockOptions::default;
    assert_eq!(refused(session.lock("nope", "a", Mode::Ex, plain()).await), "unknown_lockspace");
    assert_eq!(refused(session.lock("default", vec![b'x'; 65], Mode::Ex, plain()).await), "invalid_resource_name");
    assert_eq!(refused(session.lock("default", "", Mode::Ex, plain()).await), "invalid_resource_name");
    let bad_flags = LockOptions { flags: LockFlags::QUECVT, ..plain() };
    assert_eq!(refused(session.lock("default", "a", Mode::Ex, bad_flags).await), "invalid_flags");
    let mut guard = session.lock("default", "a", Mode::Ex, plain()).await.expect("granted");
    let long_lvb =
        guard.convert(Mode::Nl, LockOptions { flags: LockFlags::VALBLK, ..plain() }, Some(vec![0; 33])).await;
    assert!(matches!(long_lvb, Err(LockError::Rejected { ref code, .. }) if code == "lvb_too_long"), "{long_lvb:?}");
    let _b = session.lock("default", "b", Mode::Ex, plain()).await.expect("granted");
    let _c = session.lock("default", "c", Mode::Ex, plain()).await.expect("granted");
    assert_eq!(refused(session.lock("default", "d", Mode::Ex, plain()).await), "limit_exceeded");

    // Raw messages the client library would never send.
    let mut raw = RawSession::open(&agent).await;
    let invalid_mode = proto::client_message::Body::Lock(proto::Lock {
        handle: 1,
        lockspace: "default".into(),
        name: b"r".to_vec(),
        mode: 9,
        ..Default::default()
    });
    assert_eq!(raw.rejected(invalid_mode).await, "invalid_mode");
    let unlock_unknown = proto::client_message::Body::Unlock(proto::Unlock { handle: 42, flags: 0, lvb: None });
    assert_eq!(raw.rejected(unlock_unknown).await, "unknown_handle");
    assert_eq!(raw.rejected_empty().await, "empty_message");

    // Garbage and truncated frames on the socket: that connection is dropped.
    for garbage in
        [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xff; 64][..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\x04"]
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::UnixStream::connect(&agent.socket).await.expect("connect");
        let _ = stream.write_all(garbage).await;
        // End our side mid-frame: the agent must drop the connection.
        let _ = stream.shutdown().await;
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "the agent kept a garbage connection open: {garbage:?}");
    }
    // Everyone else is still served.
    let status = agent.client().await.status().await.expect("status");
    assert_eq!(status.sessions, 2);
    guard.unlock().await.expect("still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_loses_its_session_and_others_are_served() {
    let agent = Agent::start("slow", "session_queue_max = 16\n");
    let raw = RawSession::open(&agent).await;
    // Lock and unlock the same handle many times without reading a reply:
    // the replies pile up until the agent gives up on this client.
    for round in 0..20_000u64 {
        let handle = round % 2;
        let body = if round % 4 < 2 {
            proto::client_message::Body::Lock(proto::Lock {
                handle,
                lockspace: "default".into(),
                name: vec![b'a' + handle as u8],
                mode: 5,
                ..Default::default()
            })
        } else {
            proto::client_message::Body::Unlock(proto::Unlock { handle, flags: 0, lvb: None })
        };
        if raw.requests.send(proto::ClientMessage { body: Some(body) }).await.is_err() {
            break;
        }
        if round % 512 == 0 && agent.metrics().contains("dlm_session_ended_total{reason=\"slow_reader\"} 1") {
            break;
        }
    }
    eventually("the slow session is ended", async || {
        agent.metrics().contains("dlm_session_ended_total{reason=\"slow_reader\"} 1")
    })
    .await;
    let session = agent.client().await.session().await.expect("session");
    let guard = session.lock("default", "a", Mode::Ex, LockOptions::default()).await.expect("its locks were released");
    guard.unlock().await.expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_pending_requests_and_exits_cleanly() {
    let mut agent = Agent::start("term", "");
    let client = agent.client().await;
    let holder = client.session().await.expect("session");
    let mut events = holder.events();
    let guard = holder.lock("default", "t", Mode::Ex, LockOptions::default()).await.expect("granted");
    let waiter = client.session().await.expect("session");
    let pending =
        tokio::spawn(async move { waiter.lock("default", "t", Mode::Ex, LockOptions::default()).await.err() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = agent.terminate();
        (status, agent)
    });
    let outcome = tokio::time::timeout(Duration::from_secs(10), pending).await.expect("answered").expect("task");
    assert!(matches!(outcome, Some(LockError::NotGranted(proto::Status::Cancelled))), "{outcome:?}");
    let revoked = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("told").expect("event") {
            SessionEvent::Revoked { handle, reason } => break (handle, reason),
            SessionEvent::Blocking { .. } => {}
        }
    };
    assert_eq!(revoked.0, guard.handle());
    let (status, agent) = status.await.expect("task");
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert!(!agent.socket.exists(), "the socket file is removed");
}

/// A session driven with raw protocol messages.
struct RawSession {
    requests: tokio::sync::mpsc::Sender<proto::ClientMessage>,
    replies: tonic::Streaming<proto::ServerMessage>,
}

impl RawSession {
    async fn open(agent: &Agent) -> RawSession {
        let path = agent.socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }))
            .await
            .expect("connect");
        let (requests, outbound) = tokio::sync::mpsc::channel(64);
        let mut client = proto::dlm_client::DlmClient::new(channel);
        let mut replies =
            client.session(tokio_stream::wrappers::ReceiverStream::new(outbound)).await.expect("session").into_inner();
        let welcome = replies.message().await.expect("welcome").expect("welcome");
        assert!(matches!(welcome.body, Some(proto::server_message::Body::Welcome(_))));
        RawSession { requests, replies }
    }

    async fn rejected(&mut self, body: proto::client_message::Body) -> String {
        self.requests.send(proto::ClientMessage { body: Some(body) }).await.expect("send");
        self.next_rejection().await
    }

    async fn rejected_empty(&mut self) -> String {
        self.requests.send(proto::ClientMessage { body: None }).await.expect("send");
        self.next_rejection().await
    }

    async fn next_rejection(&mut self) -> String {
        match self.replies.message().await.expect("reply").expect("reply").body {
            Some(proto::server_message::Body::Rejected(rejected)) => rejected.code,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_that_goes_silent_loses_its_session_after_the_keepalive() {
    let address = format!("127.0.0.1:{}", support::free_port());
    // 1 s, not less: the test's own connections must keep answering pings
    // while other tests load the machine.
    let pki = support::TestPki::new("keepalive");
    let config = format!("tcp = \"{address}\"\nkeepalive = \"1s\"\n{}", pki.tls_section("agent.test"));
    let agent = Agent::start("keepalive", &config);
    // A CLI client over TCP (TLS) takes the lock, then stops answering
    // (SIGSTOP): its connection stays open but its HTTP/2 pings go unanswered.
    let mut holder = Command::new(support::bin())
        .args(["lock", "--connect", &address, "--tls-ca", support::path_str(&pki.ca()), "--tls-name", "agent.test"])
        .args(["silent", "--", "sleep", "30"])
        .spawn()
        .expect("spawn");
    wait_for_holder(&agent, "silent");
    let pid = holder.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let stopped_at = Instant::now();
    let session = agent.client().await.session().await.expect("session");
    let options = LockOptions { timeout: Some(Duration::from_secs(10)), ..LockOptions::default() };
    let granted = session.lock("default", "silent", Mode::Ex, options).await;
    let waited = stopped_at.elapsed();
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    holder.kill().expect("kill");
    let _ = holder.wait();
    assert!(granted.is_ok(), "the silent holder's lock was not released: {:?}", granted.err());
    assert!(waited < Duration::from_secs(8), "took {waited:?} for a 1 s keepalive");
    eprintln!("silent TCP holder dropped after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_clients_all_complete_and_never_overlap() {
    // More sessions than the engine handles in one batch, hammering a few
    // resources: every request must complete, and the holders of one resource
    // must never overlap (checked by fencing-token order and a shared flag).
    let agent = Agent::start("hammer", "");
    let client = agent.client().await;
    let busy: Arc<[std::sync::atomic::AtomicBool; 4]> = Arc::new(Default::default());
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..96u64 {
        let session = client.session().await.expect("session");
        let busy = busy.clone();
        tasks.spawn(async move {
            let mut last_token = [0u64; 4];
            for round in 0..40u64 {
                let resource = ((worker + round) % 4) as usize;
                let guard = session
                    .lock("default", format!("h{resource}"), Mode::Ex, LockOptions::default())
                    .await
                    .expect("granted");
                assert!(!busy[resource].swap(true, std::sync::atomic::Ordering::SeqCst), "two EX holders at once");
                assert!(guard.fencing_token() > last_token[resource]);
                last_token[resource] = guard.fencing_token();
                tokio::task::yield_now().await;
                busy[resource].store(false, std::sync::atomic::Ordering::SeqCst);
                guard.unlock().await.expect("unlock");
            }
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("worker");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all).await.expect("every request completed");
    let status = client.status().await.expect("status");
    assert_eq!((status.locks, status.waiting), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_pending_lock_future_cancels_the_request() {
    let agent = Agent::start("cancel", "");
    let client = agent.client().await;
    let holder = client.session().await.expect("session");
    let held = holder.lock("default", "c", Mode::Ex, LockOptions::default()).await.expect("granted");
    let waiter = client.session().await.expect("session");
    // The client gives up on its own (the future is dropped), not by a server timeout.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(200), waiter.lock("default", "c", Mode::Ex, LockOptions::default()))
            .await;
    assert!(gave_up.is_err(), "the lock cannot be granted while held");
    let queued = async || {
        let request = proto::DumpRequest {
            lockspace: "default".into(),
            name: Some(b"c".to_vec()),
            max_resources: 1,
            ..proto::DumpRequest::default()
        };
        client.dump(request).await.expect("dump").resources.first().map_or(0, |r| r.waiting.len())
    };
    support::eventually("the dropped request is cancelled", async || queued().await == 0).await;
    held.unlock().await.expect("unlock");
    // Nothing was granted to the waiter behind its back: the resource is free.
    let status = client.status().await.expect("status");
    assert_eq!((status.locks, status.waiting), (0, 0));
}

/// Releasing a lockspace drops every metric series it had: 10,000 cycles
/// of create and release (each its own name) leave `/metrics` as it was and
/// the agent's memory flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_lockspaces_created_and_released_leave_metrics_and_memory_flat() {
    let agent = Agent::start("lockspace-cycles", "");
    let client = agent.client().await;
    let resident = |text: &str| support::metric_value(text, "process_resident_memory_bytes");
    let cycle = async |i: u32| {
        let name = format!("cycle-{i}");
        client.create_lockspace(&name, 32).await.expect("created");
        client.release_lockspace(&name, false).await.expect("released");
    };
    // A warm-up first: the allocator's pools and the registry's tables reach their size.
    for i in 0..1_000 {
        cycle(i).await;
    }
    let before = agent.metrics();
    let started = Instant::now();
    for i in 1_000..11_000 {
        cycle(i).await;
    }
    let after = agent.metrics();
    eprintln!(
        "10,000 cycles in {:?}; /metrics {} -> {} bytes; resident {:.1} -> {:.1} MiB",
        started.elapsed(),
        before.len(),
        after.len(),
        resident(&before) / 1048576.0,
        resident(&after) / 1048576.0
    );
    assert!(!after.contains("cycle-"), "series of released lockspaces remain");
    assert_eq!(after.lines().count(), before.lines().count(), "the exposition grew");
    assert!(resident(&after) - resident(&before) < 16.0 * 1048576.0, "resident memory grew");
}

/// A new lock may not name handle 0: a `Rejected` with handle 0 means that
/// the session itself was refused, so the answer would be ambiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lock_with_handle_0_is_refused() {
    let agent = Agent::start("handle-zero", "");
    let mut raw = RawSession::open(&agent).await;
    let lock = proto::client_message::Body::Lock(proto::Lock {
        handle: 0,
        lockspace: "default".into(),
        name: b"r".to_vec(),
        mode: proto::Mode::Ex as i32,
        ..Default::default()
    });
    assert_eq!(raw.rejected(lock).await, "invalid_handle");
}

/// A gRPC session message that does not decode ends the session, and its
/// stream says so with a status (INVALID_ARGUMENT), not OK. Sent over raw
/// HTTP/2: no gRPC library sends such a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_that_does_not_decode_ends_the_stream_with_an_error_status() {
    let agent = Agent::start("malformed-grpc", "");
    let stream = tokio::net::UnixStream::connect(&agent.socket).await.expect("connect");
    let (client, connection) = h2::client::handshake(stream).await.expect("an HTTP/2 connection");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/dlm.v1.Dlm/Session")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("sent");
    // One gRPC message: not compressed, 4 bytes long, and not a protobuf
    // (field 31, wire type 7, does not exist).
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]), false).expect("data");
    let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("in time").expect("response");
    let mut body = response.into_body();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        body.trailers().await
    })
    .await
    .expect("the stream ends");
    let trailers = drained.expect("trailers").expect("some trailers");
    let status = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("none");
    assert_eq!(status, "3", "grpc-status (3 is INVALID_ARGUMENT): {trailers:?}");
    // Everyone else is still served.
    agent.client().await.status().await.expect("status");
}

/// A socket where nothing answers (a listener that never accepts, as an
/// agent out of file descriptors or stopped looks): the client library and
/// the CLI give up after `ANSWER_TIMEOUT` as unreachable instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_socket_that_never_answers_give_up_in_bounded_time() {
    use dlm_agent::client::{ANSWER_TIMEOUT, Client, ClientError, Target};
    let dir = support::Scratch::new("mute");
    let path = dir.join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let started = Instant::now();
    let cli = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(support::bin()).args(["status", "--socket"]).arg(&path).output().expect("run")
        })
    };
    let library = async {
        match Client::connect(&Target::Unix(path.clone())).await {
            Err(error) => vec![error],
            Ok(client) => {
                let (session, status) = tokio::join!(client.session(), client.status());
                vec![session.err().expect("no session"), status.expect_err("no status")]
            }
        }
    };
    let errors = library.await;
    assert!(errors.iter().all(|e| matches!(e, ClientError::Unreachable { .. })), "{errors:?}");
    let output = cli.await.expect("cli");
    assert_eq!(output.status.code(), Some(EXIT_UNREACHABLE), "{}", String::from_utf8_lossy(&output.stderr));
    let elapsed = started.elapsed();
    assert!(elapsed < ANSWER_TIMEOUT * 2, "gave up after {elapsed:?}");
}
