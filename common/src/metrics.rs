//! Prometheus plumbing shared by both binaries: a registry with the process collector (CPU, memory,
//! file descriptors), the text encoding served at `/metrics`, and bucket layouts.

use prometheus::{Encoder, Registry, TextEncoder};

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

/// Registers a metric, panicking on a programming error (a duplicate or malformed metric) at start.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry.register(Box::new(metric.clone())).expect("metric definitions are valid and unique");
    metric
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
