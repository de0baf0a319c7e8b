//! Framed sessions (`dlm_agent::framing`) against the real agent: they share
//! the Unix socket with gRPC, keep their sessions alive with pings, and
//! bad input, on the socket or through a ring, closes only the connection
//! that sent it.

use std::time::{Duration, Instant};

use dlm_agent::client::{ClientError, LockOptions, SessionEvent};
use dlm_agent::framing::{self, Frame, FrameKind};
use dlm_agent::proto;
use dlm_core::Mode;
use support::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A framed connection driven byte by byte.
async fn raw_framed(agent: &Agent) -> (UnixStream, u64) {
    let mut stream = UnixStream::connect(&agent.socket).await.expect("connect");
    stream.write_all(&framing::PREFACE).await.expect("preface");
    match read_message(&mut stream).await.body {
        Some(proto::server_message::Body::Welcome(welcome)) => (stream, welcome.session),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

async fn read_frame(stream: &mut UnixStream) -> Frame<proto::ServerMessage> {
    let mut body = Vec::new();
    let read = framing::read_frame(stream, &mut body);
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("a frame in time").expect("a frame")
}

async fn read_message(stream: &mut UnixStream) -> proto::ServerMessage {
    match read_frame(stream).await {
        Frame::Message(message) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn send(stream: &mut UnixStream, body: proto::client_message::Body) {
    let mut out = Vec::new();
    framing::encode_message(&proto::ClientMessage { body: Some(body) }, &mut out);
    stream.write_all(&out).await.expect("send");
}

fn lock(handle: u64, name: &str) -> proto::client_message::Body {
    proto::client_message::Body::Lock(proto::Lock {
        handle,
        lockspace: "default".into(),
        name: name.as_bytes().to_vec(),
        mode: 5,
        ..Default::default()
    })
}

/// Waits until the agent closes `stream` (without this side closing first).
async fn closed_by_agent(stream: &mut UnixStream, within: Duration) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut sink)).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_and_grpc_sessions_share_the_socket_and_its_locks() {
    let agent = Agent::start("framed-mixed", "");
    let framed = agent.client().await.session().await.expect("framed session");
    let grpc = agent.client().await.with_grpc_sessions().session().await.expect("grpc session");
    let mut blocking = framed.events();
    let held = framed.lock("default", "shared", Mode::Ex, LockOptions::default()).await.expect("granted");
    let waiter = tokio::spawn(async move {
        let guard = grpc.lock("default", "shared", Mode::Pr, LockOptions::default()).await.expect("granted");
        (guard.fencing_token(), guard)
    });
    // The gRPC waiter's request reaches the framed holder as a blocking callback.
    let event = tokio::time::timeout(Duration::from_secs(5), blocking.recv()).await.expect("in time").expect("event");
    assert_eq!(event, SessionEvent::Blocking { handle: held.handle(), mode: Mode::Pr });
    let token = held.fencing_token();
    held.unlock().await.expect("unlock");
    let (next, guard) = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("in time").expect("task");
    assert!(next > token, "fencing tokens grow across the two protocols");
    guard.unlock().await.expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_framed_input_closes_only_that_connection() {
    let agent = Agent::start("framed-bad", "");
    let session = agent.client().await.session().await.expect("session");
    let held = session.lock("default", "kept", Mode::Ex, LockOptions::default()).await.expect("granted");

    // A preface of another version: closed before any session exists.
    let mut stream = UnixStream::connect(&agent.socket).await.expect("connect");
    stream.write_all(b"DLMS\x02\x00\x00\x00").await.expect("write");
    assert!(closed_by_agent(&mut stream, Duration::from_secs(10)).await, "a wrong version was kept open");

    let too_long = u32::try_from(framing::FRAME_BODY_LEN_MAX + 1).expect("fits").to_le_bytes();
    let bad_frames: [&[u8]; 4] = [
        &[too_long[0], too_long[1], too_long[2], too_long[3], 0],
        &[0, 0, 0, 0, 7],
        &[1, 0, 0, 0, FrameKind::Ping as u8, 0],
        &[2, 0, 0, 0, 0, 0xff, 0xff],
    ];
    for bad in bad_frames {
        let (mut stream, _) = raw_framed(&agent).await;
        // A lock taken first must be released with the connection.
        send(&mut stream, lock(1, "dropped")).await;
        assert!(matches!(read_message(&mut stream).await.body, Some(proto::server_message::Body::Completion(_))));
        stream.write_all(bad).await.expect("write");
        assert!(closed_by_agent(&mut stream, Duration::from_secs(10)).await, "kept open after {bad:?}");
    }
    // A session that is opened and dropped mid-frame ends too.
    let (mut stream, _) = raw_framed(&agent).await;
    stream.write_all(&[40, 0, 0, 0, 0, 1, 2]).await.expect("write");
    drop(stream);

    // Everyone else is served, and the dropped connections' locks are gone.
    let other = agent.client().await.session().await.expect("session");
    let options = LockOptions { timeout: Some(Duration::from_secs(5)), ..LockOptions::default() };
    let guard = other.lock("default", "dropped", Mode::Ex, options).await.expect("released with its connection");
    guard.unlock().await.expect("unlock");
    held.unlock().await.expect("the first session is still served");
    support::eventually("only the first two sessions remain", async || {
        agent.client().await.status().await.expect("status").sessions == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_through_a_ring_closes_only_that_session() {
    let agent = Agent::start("framed-ring-bad", "");
    let too_long = u32::try_from(framing::FRAME_BODY_LEN_MAX + 1).expect("fits").to_le_bytes();
    let bad_frames: [&[u8]; 2] =
        [&[too_long[0], too_long[1], too_long[2], too_long[3], 0], &[2, 0, 0, 0, 0, 0xff, 0xff]];
    for bad in bad_frames {
        let mut stream = UnixStream::connect(&agent.socket).await.expect("connect");
        stream.write_all(&framing::RING_PREFACE).await.expect("preface");
        let (read, write) = framing::split_accepting_ring(stream).await.expect("rings");
        assert!(read.through_ring(), "the agent had rings to spare");
        let mut reader = tokio::io::BufReader::new(read);
        let mut body = Vec::new();
        let mut next = async || {
            let frame = framing::read_frame::<proto::ServerMessage>(&mut reader, &mut body);
            tokio::time::timeout(Duration::from_secs(10), frame).await.expect("in time")
        };
        assert!(matches!(
            next().await,
            Ok(Frame::Message(proto::ServerMessage { body: Some(proto::server_message::Body::Welcome(_)) }))
        ));
        let mut out = Vec::new();
        framing::encode_message(&proto::ClientMessage { body: Some(lock(1, "ring-dropped")) }, &mut out);
        assert_eq!(write.try_write(&out).expect("room"), out.len());
        assert!(matches!(
            next().await,
            Ok(Frame::Message(proto::ServerMessage { body: Some(proto::server_message::Body::Completion(_)) }))
        ));
        assert_eq!(write.try_write(bad).expect("room"), bad.len());
        assert!(next().await.is_err(), "the session went on after {bad:?}");
        // Its lock went with it; the agent serves everyone else.
        let other = agent.client().await.session().await.expect("session");
        let options = LockOptions { timeout: Some(Duration::from_secs(5)), ..LockOptions::default() };
        let guard = other.lock("default", "ring-dropped", Mode::Ex, options).await.expect("released with its session");
        guard.unlock().await.expect("unlock");
    }
}

/// Eight ring sessions of one client take turns on one lock and on one of
/// their own each, back to back, against an agent spinning with `workers`
/// runtime threads; returns `dlm_agent_spin_ring_catches_total`.
async fn ring_sessions_against_a_spinning_agent(workers: u32) -> f64 {
    const SESSIONS: usize = 8;
    const ROUNDS: usize = 400;
    let env = [("DLM_SPIN_US", "200".to_string()), ("DLM_WORKER_THREADS", workers.to_string())];
    let agent = Agent::start_with_env(&format!("framed-ring-spin-{workers}"), "", &env);
    let client = agent.client().await;
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        sessions.push(client.session().await.expect("session"));
    }
    // Counted before any starts: a session that is done ends, and leaves
    // the gauge.
    let rings = support::metric_value(&agent.metrics(), "dlm_session_rings");
    assert!(rings >= SESSIONS as f64, "only {rings} of {SESSIONS} sessions on rings");
    let mut tasks = tokio::task::JoinSet::new();
    for (own, session) in sessions.into_iter().enumerate() {
        tasks.spawn(async move {
            let options = LockOptions { timeout: Some(Duration::from_secs(10)), ..LockOptions::default() };
            for round in 0..ROUNDS {
                let name = if round % 2 == 0 { "spin-shared".to_string() } else { format!("spin-own-{own}") };
                let locking = session.lock("default", name.as_str(), Mode::Ex, options.clone());
                let guard = tokio::time::timeout(Duration::from_secs(20), locking)
                    .await
                    .unwrap_or_else(|_| panic!("{workers} workers, session {own}, round {round}: no answer to a lock"))
                    .expect("granted");
                tokio::time::timeout(Duration::from_secs(20), guard.unlock())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("{workers} workers, session {own}, round {round}: no answer to an unlock")
                    })
                    .expect("unlocked");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a session's task");
    }
    support::metric_value(&agent.metrics(), "dlm_agent_spin_ring_catches_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_sessions_are_all_answered_while_the_spinning_agent_looks_in_their_place() {
    // A spinning agent with one worker looks at its ring sessions' rings
    // itself, their clients told not to ring: a request that comes as it
    // stops looking must still be taken (a lost wake-up leaves a waiter,
    // or the holder it waits for, hanging). With two workers it must not
    // look (a reader it woke could wait for the next event), and everyone
    // is answered through the bells.
    let one_worker = ring_sessions_against_a_spinning_agent(1).await;
    let two_workers = ring_sessions_against_a_spinning_agent(2).await;
    assert_eq!(two_workers, 0.0, "a multi-thread agent looked in its clients' place");
    if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        assert!(one_worker > 0.0, "the agent never took a ring session's request while spinning");
    } else {
        // One CPU: the agent does not spin (see `dlm_agent::spin`).
        assert!(!support::under_ci(), "CI=true: one CPU, the spinning agent was not tried");
        eprintln!("skipped the spinning half: this machine has one CPU");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_rings_limit_are_served_on_their_socket_and_counted() {
    // 1,024 descriptors, 256 kept, 766 connections: two left, one ring session.
    let agent = Agent::start_wrapped(
        "framed-rings-max",
        "[limits]\nconnections_max = 766\n",
        &[],
        &["prlimit", "--nofile=1024:1024", "--"],
    );
    let rings = |metrics: &str| support::metric_value(metrics, "dlm_session_rings");
    let declined = |metrics: &str| {
        support::metric_value(metrics, "dlm_session_rings_declined_total{reason=\"ring_sessions_max\"}")
    };
    let metrics = agent.metrics();
    assert_eq!((rings(&metrics), declined(&metrics)), (0.0, 0.0), "{metrics}");

    let client = agent.client().await;
    let options = || LockOptions { timeout: Some(Duration::from_secs(5)), ..LockOptions::default() };
    let first = client.session().await.expect("the first session");
    let second = client.session().await.expect("the second session, on its socket");
    let metrics = agent.metrics();
    assert_eq!((rings(&metrics), declined(&metrics)), (1.0, 1.0), "{metrics}");
    // Both are served, whichever way their frames go.
    for session in [&first, &second] {
        let guard = session.lock("default", "either-way", Mode::Ex, options()).await.expect("granted");
        guard.unlock().await.expect("unlock");
    }
    // The ring session's end gives its rings back to the next session.
    drop(first);
    support::eventually("the first session's rings are given back", async || rings(&agent.metrics()) == 0.0).await;
    let third = client.session().await.expect("the third session");
    let metrics = agent.metrics();
    assert_eq!((rings(&metrics), declined(&metrics)), (1.0, 1.0), "{metrics}");
    third.lock("default", "either-way", Mode::Ex, options()).await.expect("granted").unlock().await.expect("unlock");
    drop(second);
}

/// A requester reads its session's frames while it waits; one that gives
/// up while reading (its future dropped) hands reading back to the session,
/// which then still hears callbacks and pings while nothing is asked of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_that_gives_up_while_reading_leaves_its_session_heard() {
    let agent = Agent::start("framed-reading", "keepalive = \"300ms\"\n");
    let client = agent.client().await;
    let holder = client.session().await.expect("holder");
    let waiter = client.session().await.expect("waiter");
    let held = holder.lock("default", "role", Mode::Ex, LockOptions::default()).await.expect("granted");
    // Queued behind the holder, the waiter's request reads its session until
    // it is dropped.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        waiter.lock("default", "role", Mode::Ex, LockOptions::default()),
    )
    .await;
    assert!(gave_up.is_err(), "granted past an EX holder");
    // Idle past several keepalives: the session answers the pings itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    held.unlock().await.expect("unlock");
    let mine = waiter.lock("default", "mine", Mode::Ex, LockOptions::default()).await.expect("the session lives");
    // A callback for a lock it holds reaches it while it asks nothing.
    let mut events = waiter.events();
    let blocked = tokio::spawn(async move {
        let options = LockOptions { timeout: Some(Duration::from_secs(5)), ..LockOptions::default() };
        holder.lock("default", "mine", Mode::Pr, options).await.map(|guard| guard.fencing_token())
    });
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("in time").expect("event");
    assert_eq!(event, SessionEvent::Blocking { handle: mine.handle(), mode: Mode::Pr });
    mine.unlock().await.expect("unlock");
    tokio::time::timeout(Duration::from_secs(5), blocked).await.expect("in time").expect("task").expect("granted");
}

/// Requests of one session from several tasks at once take turns reading
/// its frames (one reads, the others are handed their answers), some given
/// up while they read: every one is answered, none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_one_session_from_many_tasks_take_turns_reading() {
    let agent = Agent::start("framed-turns", "");
    let client = agent.client().await;
    let session = client.session().await.expect("session");
    let blocker = client.session().await.expect("blocker");
    let _held = blocker.lock("default", "held", Mode::Ex, LockOptions::default()).await.expect("granted");
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..4 {
        let session = session.clone();
        tasks.spawn(async move {
            for round in 0..1_000 {
                let name = format!("turns/{task}");
                let guard = session.lock("default", name, Mode::Ex, LockOptions::default()).await.expect("granted");
                guard.unlock().await.expect("unlock");
                if round % 100 == 0 {
                    // Queued behind the blocker, given up while it may read.
                    let wait = session.lock("default", "held", Mode::Ex, LockOptions::default());
                    assert!(tokio::time::timeout(Duration::from_millis(5), wait).await.is_err());
                }
            }
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all).await.expect("a request was left waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_framed_client_is_pinged_then_dropped_and_a_live_one_is_kept() {
    let agent = Agent::start("framed-keepalive", "keepalive = \"300ms\"\n");
    // The library answers pings: its session outlives many keepalives.
    let live = agent.client().await.session().await.expect("session");
    let kept = live.lock("default", "kept", Mode::Ex, LockOptions::default()).await.expect("granted");

    let (mut silent, _) = raw_framed(&agent).await;
    send(&mut silent, lock(1, "silent")).await;
    assert!(matches!(read_message(&mut silent).await.body, Some(proto::server_message::Body::Completion(_))));
    let since = Instant::now();
    assert_eq!(read_frame(&mut silent).await, Frame::Ping, "a quiet client is pinged");
    // Not answering: the agent drops it after another keepalive.
    assert!(closed_by_agent(&mut silent, Duration::from_secs(10)).await, "the silent client was kept");
    let dropped_after = since.elapsed();
    assert!(dropped_after < Duration::from_secs(5), "took {dropped_after:?} for a 300 ms keepalive");

    let options = LockOptions { timeout: Some(Duration::from_secs(5)), ..LockOptions::default() };
    let other = agent.client().await.session().await.expect("session");
    let guard = other.lock("default", "silent", Mode::Ex, options).await.expect("the silent client's lock is released");
    guard.unlock().await.expect("unlock");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kept.unlock().await.expect("the live session survived five keepalives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framed_session_over_the_limit_is_refused_with_a_reason() {
    let agent = Agent::start("framed-limit", "[limits]\nsessions_max = 1\n");
    let client = agent.client().await;
    let _first = client.session().await.expect("the first session");
    match client.session().await {
        Err(ClientError::Call(status)) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a second session opened past sessions_max = 1"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framed_client_that_never_reads_loses_its_session() {
    let agent = Agent::start("framed-slow", "session_queue_max = 16\n");
    let (mut stream, _) = raw_framed(&agent).await;
    // Lock and unlock without reading a reply: the socket's buffer fills,
    // then the frames the agent holds for it, until it gives up.
    let mut ended = false;
    for round in 0..200_000u64 {
        let handle = round % 2;
        let body = if round % 4 < 2 {
            lock(handle, if handle == 0 { "a" } else { "b" })
        } else {
            proto::client_message::Body::Unlock(proto::Unlock { handle, flags: 0, lvb: None })
        };
        let mut out = Vec::new();
        framing::encode_message(&proto::ClientMessage { body: Some(body) }, &mut out);
        let write = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&out)).await;
        if !matches!(write, Ok(Ok(()))) {
            break;
        }
        if round % 1024 == 0 && agent.metrics().contains("dlm_session_ended_total{reason=\"slow_reader\"} 1") {
            ended = true;
            break;
        }
    }
    if !ended {
        support::eventually("the slow session is ended", async || {
            agent.metrics().contains("dlm_session_ended_total{reason=\"slow_reader\"} 1")
        })
        .await;
    }
    let session = agent.client().await.session().await.expect("session");
    let options = LockOptions { timeout: Some(Duration::from_secs(5)), ..LockOptions::default() };
    let guard = session.lock("default", "a", Mode::Ex, options).await.expect("its locks were released");
    guard.unlock().await.expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pings_without_reading_loses_its_session() {
    let agent = Agent::start("framed-pings", "session_queue_max = 16\n");
    let (mut stream, _) = raw_framed(&agent).await;
    let mut pings = Vec::new();
    for _ in 0..1024 {
        framing::encode_control(FrameKind::Ping, &mut pings);
    }
    // Pongs pile up unread until the agent gives up on the connection.
    let flood = async {
        for _ in 0..1024 {
            if stream.write_all(&pings).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
    assert!(closed_by_agent(&mut stream, Duration::from_secs(10)).await, "a ping flood was served for ever");
    support::eventually("the flooding session is gone", async || {
        agent.client().await.status().await.expect("status").sessions == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_rather_than_hang_once_the_agent_is_gone() {
    let mut agent = Agent::start("framed-gone", "");
    let session = agent.client().await.session().await.expect("session");
    let waiting = {
        let session = session.clone();
        let holder = session.lock("default", "w", Mode::Ex, LockOptions::default()).await.expect("granted");
        tokio::spawn(async move {
            let result = session.lock("default", "w", Mode::Ex, LockOptions::default()).await.map(|_| ());
            drop(holder);
            result
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut child = agent.child.take().expect("running");
    child.kill().expect("kill");
    let _ = child.wait();
    // The pending request, and every later one, ends.
    let pending = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("in time").expect("task");
    assert!(pending.is_err(), "granted by a dead agent");
    let later =
        tokio::time::timeout(Duration::from_secs(5), session.lock("default", "x", Mode::Ex, LockOptions::default()))
            .await
            .expect("a request after the agent died must not hang");
    assert!(later.is_err());
}
