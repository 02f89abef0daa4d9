//! Prometheus plumbing shared by both binaries: a registry with the process collector (CPU, memory,
//! file descriptors), the text encoding served at `/metrics`, and bucket layouts.

use prometheus::core::Collector;
use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds: fine below 10 ms (cache hits, PK lookups) so p50/p95/p99 of a fast
/// service are readable, coarse up to the request timeout.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A registry that already carries `process_*` metrics.
pub fn registry() -> Registry {
    let registry = Registry::new();
    // Only fails on duplicate registration, which cannot happen on a fresh registry.
    let _ = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
    registry
}

/// The registry in Prometheus text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metrics.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buffer);
    String::from_utf8(buffer).unwrap_or_default()
}

/// Makes metrics and registers them on one registry. Every method panics only on a programming error
/// (a duplicate or malformed definition), which shows at start and in every test.
pub struct Registrar<'a>(pub &'a Registry);

impl Registrar<'_> {
    /// An integer counter.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help))
    }

    /// An integer counter per label values.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels))
    }

    /// A counter of fractional amounts (seconds).
    pub fn float_counter(&self, name: &str, help: &str) -> Counter {
        self.register(Counter::new(name, help))
    }

    /// An integer gauge.
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help))
    }

    /// An integer gauge per label values.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    /// A histogram with these bucket bounds.
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.register(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())))
    }

    /// A histogram per label values.
    pub fn histogram_vec(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        self.register(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels))
    }

    fn register<M: Collector + Clone + 'static>(&self, metric: prometheus::Result<M>) -> M {
        let metric = metric.expect("metric definitions are valid");
        self.0.register(Box::new(metric.clone())).expect("metric names are unique");
        metric
    }
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
