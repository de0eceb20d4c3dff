//! The Prometheus metrics that matter, one registry per running server (so tests running many
//! servers in one process each see their own), rendered in the Prometheus text format.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// At most this many tenants get their own label value; the rest share `other`.
const MAX_TENANT_LABELS: usize = 100;

/// Latency buckets from 50 µs to about 0.4 s: a rate-limit store is asked on every request.
fn fast_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.00005, 2.0, 14).unwrap_or_default()
}

/// Latency buckets from 0.5 ms to about 33 s.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 17).unwrap_or_default()
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounter,
    pub argon2_verifications: IntCounter,
    pub provider_duration: HistogramVec,
    pub provider_errors: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost_usd: CounterVec,
    pub store_duration: HistogramVec,
    pub overhead: Histogram,
    /// Records sync moved: local mode `pushed` / `pulled`; cloud mode `received` / `sent`.
    pub sync_records: IntCounterVec,
    /// Local mode: sync rounds that failed, by cause.
    pub sync_failures: IntCounterVec,
    /// Local mode: records written here and not yet in the cloud.
    pub sync_pending: IntGauge,
    /// Local mode: seconds since the last round that completed (0 when synced just now).
    pub sync_lag: Gauge,
    pub ratelimit_backend_duration: Histogram,
    pub ratelimit_decisions: IntCounterVec,
    pub ratelimit_fallbacks: IntCounterVec,
    pub ratelimit_degraded: IntGauge,
    tenants: Mutex<HashSet<String>>,
}

impl Metrics {
    pub fn new(mode: &str) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let metrics = Self {
            http_requests: IntCounterVec::new(
                Opts::new("maestra_http_requests_total", "HTTP requests answered"),
                &["route", "method", "status"],
            )?,
            http_duration: HistogramVec::new(
                HistogramOpts::new("maestra_http_request_duration_seconds", "HTTP request latency")
                    .buckets(latency_buckets()),
                &["route", "method", "status"],
            )?,
            http_in_flight: IntGauge::new(
                "maestra_http_requests_in_flight",
                "HTTP requests being handled now",
            )?,
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "maestra_rate_limited_total",
                    "Requests refused with 429, by cause (key quota, unverified attempts per address)",
                ),
                &["reason"],
            )?,
            auth_failures: IntCounter::new(
                "maestra_auth_failures_total",
                "Requests refused with 401",
            )?,
            argon2_verifications: IntCounter::new(
                "maestra_auth_argon2_verifications_total",
                "argon2 verifications run (verified keys are cached, so this stays near the number of keys in use)",
            )?,
            provider_duration: HistogramVec::new(
                HistogramOpts::new("maestra_provider_duration_seconds", "Model provider call latency")
                    .buckets(latency_buckets()),
                &["model"],
            )?,
            provider_errors: IntCounterVec::new(
                Opts::new("maestra_provider_errors_total", "Model provider failures, by kind"),
                &["kind"],
            )?,
            tokens: IntCounterVec::new(
                Opts::new("maestra_tokens_total", "Tokens used, by model, kind and tenant"),
                &["model", "kind", "tenant"],
            )?,
            cost_usd: CounterVec::new(
                Opts::new("maestra_cost_usd_total", "Model cost in US dollars, by model and tenant"),
                &["model", "tenant"],
            )?,
            store_duration: HistogramVec::new(
                HistogramOpts::new("maestra_store_operation_duration_seconds", "Storage operation latency")
                    .buckets(latency_buckets()),
                &["operation"],
            )?,
            overhead: Histogram::with_opts(
                HistogramOpts::new(
                    "maestra_overhead_seconds",
                    "Time a core request spends in the backend itself: request time minus provider time",
                )
                .buckets(latency_buckets()),
            )?,
            sync_records: IntCounterVec::new(
                Opts::new(
                    "maestra_sync_records_total",
                    "Records moved by sync: pushed and pulled (local), received and sent (cloud)",
                ),
                &["direction"],
            )?,
            sync_failures: IntCounterVec::new(
                Opts::new("maestra_sync_failures_total", "Sync rounds that failed, by cause"),
                &["reason"],
            )?,
            sync_pending: IntGauge::new(
                "maestra_sync_pending_records",
                "Records written here that the cloud does not have yet",
            )?,
            sync_lag: Gauge::new(
                "maestra_sync_lag_seconds",
                "Seconds since sync last completed a round with the cloud",
            )?,
            ratelimit_backend_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "maestra_ratelimit_backend_duration_seconds",
                    "Time to get a rate-limit decision from Redis, including failed calls",
                )
                .buckets(fast_buckets()),
            )?,
            ratelimit_decisions: IntCounterVec::new(
                Opts::new(
                    "maestra_ratelimit_decisions_total",
                    "Rate-limit decisions, by who decided (memory, redis, local_fallback) and outcome",
                ),
                &["backend", "outcome"],
            )?,
            ratelimit_fallbacks: IntCounterVec::new(
                Opts::new(
                    "maestra_ratelimit_fallbacks_total",
                    "Decisions taken locally because Redis did not decide, by reason",
                ),
                &["reason"],
            )?,
            ratelimit_degraded: IntGauge::new(
                "maestra_ratelimit_degraded",
                "1 while the Redis limiter's breaker is open and quotas are enforced per replica",
            )?,
            tenants: Mutex::new(HashSet::new()),
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "maestra_build_info",
                "Always 1; labels name the running build",
            ),
            &["version", "mode"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), mode])
            .set(1);
        let r = &metrics.registry;
        r.register(Box::new(build_info))?;
        r.register(Box::new(metrics.http_requests.clone()))?;
        r.register(Box::new(metrics.http_duration.clone()))?;
        r.register(Box::new(metrics.http_in_flight.clone()))?;
        r.register(Box::new(metrics.rate_limited.clone()))?;
        r.register(Box::new(metrics.auth_failures.clone()))?;
        r.register(Box::new(metrics.argon2_verifications.clone()))?;
        r.register(Box::new(metrics.provider_duration.clone()))?;
        r.register(Box::new(metrics.provider_errors.clone()))?;
        r.register(Box::new(metrics.tokens.clone()))?;
        r.register(Box::new(metrics.cost_usd.clone()))?;
        r.register(Box::new(metrics.store_duration.clone()))?;
        r.register(Box::new(metrics.overhead.clone()))?;
        r.register(Box::new(metrics.sync_records.clone()))?;
        r.register(Box::new(metrics.sync_failures.clone()))?;
        if mode == "local" {
            r.register(Box::new(metrics.sync_pending.clone()))?;
            r.register(Box::new(metrics.sync_lag.clone()))?;
        }
        r.register(Box::new(metrics.ratelimit_backend_duration.clone()))?;
        r.register(Box::new(metrics.ratelimit_decisions.clone()))?;
        r.register(Box::new(metrics.ratelimit_fallbacks.clone()))?;
        r.register(Box::new(metrics.ratelimit_degraded.clone()))?;
        Ok(metrics)
    }

    /// A tenant's label value, bounded so a busy multi-tenant server cannot blow up the series.
    pub fn tenant_label(&self, tenant: &str) -> String {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if tenants.contains(tenant) {
            return tenant.to_owned();
        }
        if tenants.len() < MAX_TENANT_LABELS {
            tenants.insert(tenant.to_owned());
            return tenant.to_owned();
        }
        "other".to_owned()
    }

    pub fn record_usage(
        &self,
        model: &str,
        tenant: &str,
        prompt: u64,
        completion: u64,
        cost_usd: f64,
    ) {
        let tenant = self.tenant_label(tenant);
        self.tokens
            .with_label_values(&[model, "prompt", &tenant])
            .inc_by(prompt);
        self.tokens
            .with_label_values(&[model, "completion", &tenant])
            .inc_by(completion);
        let cost: Counter = self.cost_usd.with_label_values(&[model, &tenant]);
        if cost_usd.is_finite() && cost_usd >= 0.0 {
            cost.inc_by(cost_usd);
        }
    }

    pub fn observe_store(&self, operation: &str, elapsed: Duration) {
        self.store_duration
            .with_label_values(&[operation])
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
