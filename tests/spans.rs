//! Lock spans reach a real OTLP receiver: a small gRPC trace collector
//! started by the test, fed by the agent's OTLP exporter.

use std::time::Duration;

use dlm_agent::client::{LockOptions, SessionEvent};
use dlm_core::Mode;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::Agent;
use tokio::sync::mpsc;

struct Collector {
    spans: mpsc::UnboundedSender<Span>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.spans.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    })
}

/// The span's events, without the kernel attribution (the eBPF test checks
/// those).
fn events(span: &Span) -> Vec<String> {
    span.events.iter().map(|e| e.name.clone()).filter(|name| name != "kernel attribution").collect()
}

/// Starts a collector; returns the agent environment that exports to it and
/// the spans it receives.
async fn collector() -> ([(&'static str, String); 2], mpsc::UnboundedReceiver<Span>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (spans, received) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector { spans }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let env =
        [("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{address}")), ("OTEL_BSP_SCHEDULE_DELAY", "50".to_string())];
    (env, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_spans_reach_an_otlp_collector_and_join_the_callers_trace() {
    let (env, mut received) = collector().await;
    let agent = Agent::start_with_env("spans", "", &env);
    let client = agent.client().await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let holder = client.session().await.expect("session");
    let mut holder_events = holder.events();
    let options = LockOptions { traceparent: Some(traceparent), ..LockOptions::default() };
    let held = holder.lock("default", "traced", Mode::Ex, options).await.expect("granted");
    let waiter = client.session().await.expect("session");
    let waiting = tokio::spawn(async move { waiter.lock("default", "traced", Mode::Ex, LockOptions::default()).await });
    let callback =
        tokio::time::timeout(Duration::from_secs(5), holder_events.recv()).await.expect("callback").expect("event");
    assert!(matches!(callback, SessionEvent::Blocking { .. }));
    held.unlock().await.expect("unlock");
    let second = waiting.await.expect("task").expect("granted");
    second.unlock().await.expect("unlock");

    let mut lock_spans = Vec::new();
    while lock_spans.len() < 2 {
        let span = tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .unwrap_or_else(|_| panic!("spans did not arrive; agent log:\n{}", agent.log()))
            .expect("collector open");
        if span.name == "dlm lock" {
            lock_spans.push(span);
        }
    }
    let first = lock_spans.iter().find(|s| attribute(s, "dlm.session") == Some("1".into())).expect("the holder's span");
    let second =
        lock_spans.iter().find(|s| attribute(s, "dlm.session") == Some("2".into())).expect("the waiter's span");

    assert_eq!(hex(&first.trace_id), trace_id, "the lock span joins the caller's trace");
    assert_eq!(hex(&first.parent_span_id), "00f067aa0ba902b7");
    assert_ne!(hex(&second.trace_id), trace_id, "a request without traceparent starts its own trace");
    for span in [first, second] {
        assert_eq!(attribute(span, "dlm.lockspace").as_deref(), Some("default"));
        assert_eq!(attribute(span, "dlm.resource").as_deref(), Some("traced"));
        assert_eq!(attribute(span, "dlm.mode").as_deref(), Some("EX"));
        assert_eq!(attribute(span, "dlm.outcome").as_deref(), Some("granted"));
        assert!(attribute(span, "dlm.fencing_token").is_some());
    }
    assert_eq!(events(first), ["granted", "blocking callback sent", "released"]);
    assert_eq!(events(second), ["queued", "granted", "released"]);
    assert!(second.end_time_unix_nano - second.start_time_unix_nano > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_holders_kernel_attribution_is_on_its_span() {
    if !support::ebpf_available("attribution on spans") {
        return;
    }
    let (env, mut received) = collector().await;
    let mut env = env.to_vec();
    env.push(("DLM_NO_EBPF", "false".into()));
    let agent = Agent::start_with_env("spans-ebpf", "", &env);
    let client = agent.client().await;
    let session = client.session().await.expect("session");
    // This test process is the client: it holds the lock while it sleeps.
    let held = session.lock("default", "sleepy", Mode::Ex, LockOptions::default()).await.expect("granted");
    std::thread::sleep(Duration::from_millis(300));
    held.unlock().await.expect("unlock");
    let span = loop {
        let span = tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .unwrap_or_else(|_| panic!("no span; agent log:\n{}", agent.log()))
            .expect("collector open");
        if span.name == "dlm lock" {
            break span;
        }
    };
    let blocked: u64 = attribute(&span, "dlm.kernel.hold.blocked_ns").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(blocked >= 250_000_000, "the holder slept 300 ms holding the lock: blocked {blocked} ns");
    assert!(attribute(&span, "dlm.kernel.hold.oncpu_ns").is_some());
    assert!(span.events.iter().any(|e| e.name == "kernel attribution"), "{:?}", events(&span));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
