//! Logs to stderr and, when the standard OpenTelemetry variables ask for it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//! one span per lock request exported over OTLP/gRPC. Off otherwise: no span
//! is even created then.

use std::future::Future;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The `tracing` target of lock spans and their events: exported, never logged.
pub const LOCK_TARGET: &str = "dlm_agent::lock";

/// The installed telemetry; [`Telemetry::shutdown`] flushes spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether the environment asks for OTLP export.
#[must_use]
pub fn otlp_requested() -> bool {
    let set = |name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber: logs filtered by `log`, and lock spans
/// over OTLP when [`otlp_requested`]. Must be called inside the runtime.
///
/// # Errors
/// An invalid log filter, or an OTLP exporter that cannot be built.
pub fn init(log: &str) -> Result<Telemetry, String> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_new(log)
        .map_err(|e| format!("invalid log filter {log:?}: {e}"))?
        .add_directive(format!("{LOCK_TARGET}=off").parse().map_err(|e| format!("{e}"))?);
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let registry = Registry::default().with(logs);
    if !otlp_requested() {
        registry.init();
        return Ok(Telemetry { provider: None });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    let exporter = OnRuntime { inner: exporter, runtime: tokio::runtime::Handle::current() };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("dlm-agent").build())
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("dlm-agent"))
        .with_filter(filter_fn(|metadata| metadata.target() == LOCK_TARGET));
    registry.with(spans).init();
    Ok(Telemetry { provider: Some(provider) })
}

impl Telemetry {
    /// Whether lock spans are exported.
    #[must_use]
    pub fn spans_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The SDK waits on its own export thread, which needs this
            // runtime for the gRPC call: wait from a blocking thread.
            let done =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5))).await;
            if let Ok(Err(error)) = done {
                tracing::warn!(%error, "flushing spans failed");
            }
        }
    }
}

/// Runs an exporter's futures on the agent's runtime. The SDK's batch
/// processor exports from a thread of its own, where the tonic client would
/// find no runtime; `Handle::block_on` lends it the agent's.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.runtime.block_on(self.inner.export(batch)))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OpenTelemetry context of a W3C `traceparent`, if it parses.
#[must_use]
pub fn parent_context(traceparent: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    let carrier = std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}
