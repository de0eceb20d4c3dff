//! Logs and traces. Logs are tracing events, JSON lines or human-readable; their fields carry
//! ids, routes and durations, never message text or key material. Traces go to an
//! OpenTelemetry collector over OTLP (http/protobuf) when the standard `OTEL_*` variables say
//! so, and continue a caller's W3C `traceparent`.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// The server: warnings and errors on stderr, the rest on stdout, so the guide's
    /// `maestra_backend.log` holds the log and `maestra_backend_error.log` the errors.
    Split,
    /// Every other command, and always `maestra mcp`: stdout is reserved for their output.
    Stderr,
}

/// Flushes pending spans when dropped, at the end of `main`.
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("maestra: could not flush traces: {e}");
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
pub fn init(settings: &LogSettings, output: LogOutput) -> anyhow::Result<TelemetryGuard> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            EnvFilter::try_new(&directives).map_err(|e| anyhow::anyhow!("RUST_LOG: {e}"))?
        }
        _ => EnvFilter::try_new(&settings.level)
            .map_err(|e| anyhow::anyhow!("MAESTRA_LOG_LEVEL: {e}"))?,
    };
    let writer =
        std::io::stderr
            .with_max_level(Level::WARN)
            .or_else(move || -> Box<dyn std::io::Write> {
                match output {
                    LogOutput::Split => Box::new(std::io::stdout()),
                    LogOutput::Stderr => Box::new(std::io::stderr()),
                }
            });
    let (json, pretty) = match settings.format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            ),
            None,
        ),
        LogFormat::Pretty => (
            None,
            Some(tracing_subscriber::fmt::layer().with_writer(writer)),
        ),
    };
    let tracer_provider = otlp_tracer_provider()?;
    let otel = tracer_provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("maestra")));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(pretty)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(TelemetryGuard { tracer_provider })
}

/// An OTLP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only variable) is set;
/// the exporter reads the other standard `OTEL_EXPORTER_OTLP_*` variables itself.
fn otlp_tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("maestra");
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(WarnOnce::new(exporter))
            .with_resource(resource.build())
            .build(),
    ))
}

/// The OTLP exporter, saying so when the collector cannot be reached: one warning when
/// exporting starts to fail (not one per batch), one note when it works again. Without it a
/// wrong or unreachable collector went unmentioned: the SDK's own logs are not compiled in.
#[derive(Debug)]
struct WarnOnce<E> {
    inner: E,
    failing: AtomicBool,
}

impl<E> WarnOnce<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            failing: AtomicBool::new(false),
        }
    }
}

impl<E: SpanExporter> SpanExporter for WarnOnce<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                error = %e,
                spans,
                "cannot send traces to the OpenTelemetry collector (OTEL_EXPORTER_OTLP_ENDPOINT); spans are dropped until it answers"
            ),
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!("traces reach the OpenTelemetry collector again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Panics become one log line (no backtrace on the terminal); the server turns a panicking
/// request into a 500.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "internal error");
    }));
}
