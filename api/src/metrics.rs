//! The api's Prometheus metrics (SPEC §6), labelled by route *template* and status class only, so
//! label cardinality stays fixed whatever paths clients send.

use std::time::Duration;

use common::metrics::{LATENCY_BUCKETS, Registrar};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::db::DbPool;
use crate::routes::{Endpoint, Routes};

/// Batch sizes from one event to [`crate::events::writer::MAX_BATCH`].
const EVENT_BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Every metric the api exports.
pub struct ApiMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Requests by route template, method and status class.
    pub http_requests: IntCounterVec,
    /// Request latency by route template and method.
    pub http_duration: HistogramVec,
    /// Requests holding a `MAX_INFLIGHT_REQUESTS` permit (sampled at scrape time).
    pub http_in_flight: IntGauge,
    /// Requests refused with 503 because `MAX_INFLIGHT_REQUESTS` were in flight.
    pub http_rejected: IntCounter,
    /// Cache lookups and writes by operation and result.
    pub cache: IntCounterVec,
    /// Outbox rows waiting to be published (counted by the background check, `samples`).
    pub outbox_backlog: IntGauge,
    /// Seconds the oldest unpublished outbox row has waited (0 when none; same check).
    pub outbox_oldest_age: IntGauge,
    /// Messages Kafka acknowledged.
    pub outbox_published: IntCounter,
    /// Messages Kafka did not acknowledge (retried).
    pub outbox_failed: IntCounter,
    /// 1 while this replica holds the outbox publisher's lease.
    pub outbox_publishing: IntGauge,
    /// Requests refused by authentication, by reason (`auth_rejections_total`).
    pub auth_rejections: IntCounterVec,
    /// JWKS loads by trigger (`schedule`, `unknown_kid`) and result (`ok`, `error`).
    pub jwks_refreshes: IntCounterVec,
    /// Usable keys in the loaded JWKS.
    pub jwks_keys: IntGauge,
    /// Rate-limit decisions by decision (`allowed`, `limited`) and source (`shared`, `local`).
    pub rate_limit_decisions: IntCounterVec,
    /// Writes sent with an `Idempotency-Key`, by outcome (see [`crate::idempotency::Outcome`]).
    pub idempotent_requests: IntCounterVec,
    /// Stored answers deleted by the expiry job.
    pub idempotency_keys_expired: IntCounter,
    /// Events per insert statement (see [`crate::events::writer`]).
    pub event_batch_size: Histogram,
    db_connections: IntGaugeVec,
    db_max_connections: IntGauge,
    db_waits: IntCounter,
    db_timeouts: IntCounter,
    db_wait_seconds: prometheus::Counter,
    /// Label children resolved once per endpoint (route template and method), indexed by
    /// [`Endpoint`]: the per-request path then avoids the label hashing and lock of `with_label_values`.
    endpoints: Vec<Option<RouteMetrics>>,
}

struct RouteMetrics {
    /// By status class 1xx..5xx.
    requests: [IntCounter; 5],
    duration: Histogram,
}

impl ApiMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = common::metrics::registry();
        let r = Registrar(&registry);
        let mut metrics = Self {
            endpoints: Vec::new(),
            http_requests: r.counter_vec(
                "http_requests_total",
                "HTTP requests by route template, method and status class",
                &["route", "method", "status"],
            ),
            http_duration: r.histogram_vec(
                "http_request_duration_seconds",
                "HTTP request latency",
                &["route", "method"],
                LATENCY_BUCKETS,
            ),
            http_in_flight: r.gauge(
                "http_requests_in_flight",
                "Requests holding a MAX_INFLIGHT_REQUESTS permit (probes and scrapes are not counted)",
            ),
            http_rejected: r.counter(
                "http_requests_rejected_total",
                "Requests refused because MAX_INFLIGHT_REQUESTS were in flight",
            ),
            cache: r.counter_vec(
                "cache_operations_total",
                "User cache operations by operation and result",
                &["operation", "result"],
            ),
            outbox_backlog: r.gauge("outbox_backlog", "Outbox rows not yet published (counted once a second)"),
            outbox_oldest_age: r.gauge(
                "outbox_oldest_age_seconds",
                "Whole seconds the oldest unpublished outbox row has waited (0 when none; sampled once a second)",
            ),
            outbox_published: r.counter("outbox_published_total", "Outbox messages acknowledged by Kafka"),
            outbox_failed: r
                .counter("outbox_publish_failures_total", "Outbox messages Kafka did not acknowledge (retried)"),
            outbox_publishing: r.gauge("outbox_publishing", "1 while this replica holds the outbox publisher's lease"),
            auth_rejections: r.counter_vec(
                "auth_rejections_total",
                "Requests refused by authentication, by reason",
                &["reason"],
            ),
            jwks_refreshes: r.counter_vec(
                "auth_jwks_refreshes_total",
                "Loads of the issuer's JWK Set by trigger and result",
                &["trigger", "result"],
            ),
            jwks_keys: r.gauge("auth_jwks_keys", "Usable signing keys in the loaded JWK Set"),
            rate_limit_decisions: r.counter_vec(
                "rate_limit_decisions_total",
                "Rate-limited requests by decision and by source (shared in Redis, or local while Redis is away)",
                &["decision", "source"],
            ),
            idempotent_requests: r.counter_vec(
                "idempotent_requests_total",
                "Writes sent with an Idempotency-Key, by outcome (stored, replayed, mismatch, in_use, failed)",
                &["outcome"],
            ),
            idempotency_keys_expired: r
                .counter("idempotency_keys_expired_total", "Stored idempotent answers deleted after IDEMPOTENCY_TTL"),
            event_batch_size: r.histogram(
                "event_insert_batch_size",
                "POSTed events written per insert statement (concurrent requests share one)",
                EVENT_BATCH_BUCKETS,
            ),
            db_connections: r.gauge_vec("db_pool_connections", "PostgreSQL pool connections by state", &["state"]),
            db_max_connections: r
                .gauge("db_pool_max_connections", "PostgreSQL pool size limit (the pools of the process together)"),
            db_waits: r.counter("db_pool_waits_total", "Checkouts that had to wait for a connection"),
            db_timeouts: r.counter("db_pool_timeouts_total", "Checkouts that timed out (answered 503)"),
            db_wait_seconds: r.float_counter("db_pool_wait_seconds_total", "Time spent waiting for connections"),
            registry,
        };
        for (endpoint, template, method) in Routes::endpoints() {
            let requests = ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| metrics.http_requests.with_label_values(&[template, method, class]));
            let duration = metrics.http_duration.with_label_values(&[template, method]);
            let index = endpoint as usize;
            if metrics.endpoints.len() <= index {
                metrics.endpoints.resize_with(index + 1, || None);
            }
            metrics.endpoints[index] = Some(RouteMetrics { requests, duration });
        }
        metrics
    }

    /// Records one finished request: `endpoint` when the route matched, else by route template
    /// (`"unmatched"` for unknown paths) and method.
    pub fn observe_request(
        &self,
        endpoint: Option<Endpoint>,
        route: &str,
        method: &str,
        status: u16,
        duration: Duration,
    ) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        if let Some(resolved) = endpoint.and_then(|endpoint| self.endpoints.get(endpoint as usize)?.as_ref()) {
            resolved.requests[class].inc();
            resolved.duration.observe(duration.as_secs_f64());
            return;
        }
        // Unmatched paths and unknown methods: rare, resolved per request.
        let class = ["1xx", "2xx", "3xx", "4xx", "5xx"][class];
        let method = method_label(method);
        self.http_requests.with_label_values(&[route, method, class]).inc();
        self.http_duration.with_label_values(&[route, method]).observe(duration.as_secs_f64());
    }

    /// Copies the number of requests holding a permit into the gauge (called at scrape time; an
    /// increment and a decrement per request were two more contended atomics on every request).
    pub fn sample_in_flight(&self, max_inflight: usize, available: usize) {
        self.http_in_flight.set(i64::try_from(max_inflight.saturating_sub(available)).unwrap_or(i64::MAX));
    }

    /// Copies the pools' state and counters, summed, into the gauges (called at scrape time): the
    /// process's PostgreSQL sessions as one pool, so that a checkout timing out in either counts.
    pub fn sample_pools(&self, pools: &[&DbPool]) {
        let (mut connections, mut idle, mut max_size) = (0_i64, 0_i64, 0_i64);
        let (mut waited, mut timed_out, mut wait_seconds) = (0_u64, 0_u64, 0.0_f64);
        for pool in pools {
            let state = pool.state();
            connections += i64::from(state.connections);
            idle += i64::from(state.idle_connections);
            max_size += i64::from(pool.max_size().get());
            waited += state.statistics.get_waited;
            timed_out += state.statistics.get_timed_out;
            wait_seconds += state.statistics.get_wait_time.as_secs_f64();
        }
        self.db_connections.with_label_values(&["idle"]).set(idle);
        self.db_connections.with_label_values(&["active"]).set(connections - idle);
        self.db_max_connections.set(max_size);
        // bb8 keeps cumulative counts; the counters catch up to them.
        self.db_waits.inc_by(waited.saturating_sub(self.db_waits.get()));
        self.db_timeouts.inc_by(timed_out.saturating_sub(self.db_timeouts.get()));
        let waited_more = wait_seconds - self.db_wait_seconds.get();
        if waited_more > 0.0 {
            self.db_wait_seconds.inc_by(waited_more);
        }
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The method as a label value: the standard methods by name, anything else `other`. A client may send
/// any token as a method; each distinct one would otherwise be a new series (a counter per status class
/// and a 15-bucket histogram), growing this process's memory and Prometheus without bound.
fn method_label(method: &str) -> &str {
    const STANDARD: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
    STANDARD.into_iter().find(|standard| *standard == method).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_under_their_endpoints_labels_and_unmatched_ones_by_template() {
        let metrics = ApiMetrics::new();
        let second = Duration::from_secs(1);
        metrics.observe_request(Some(Endpoint::GetUser), "/api/v1/users/{id}", "GET", 404, second);
        metrics.observe_request(Some(Endpoint::CreateUser), "/api/v1/users", "POST", 201, second);
        metrics.observe_request(None, "unmatched", "GET", 404, second);
        let count = |labels: &[&str]| metrics.http_requests.with_label_values(labels).get();
        assert_eq!(count(&["/api/v1/users/{id}", "GET", "4xx"]), 1);
        assert_eq!(count(&["/api/v1/users/{id}", "GET", "2xx"]), 0);
        assert_eq!(count(&["/api/v1/users", "POST", "2xx"]), 1);
        assert_eq!(count(&["unmatched", "GET", "4xx"]), 1);
        assert_eq!(metrics.http_duration.with_label_values(&["/api/v1/users", "POST"]).get_sample_count(), 1);
    }

    #[test]
    fn in_flight_is_the_permits_taken() {
        let metrics = ApiMetrics::new();
        metrics.sample_in_flight(1000, 993);
        assert_eq!(metrics.http_in_flight.get(), 7);
    }
}
