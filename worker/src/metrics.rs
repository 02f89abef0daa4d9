//! The worker's Prometheus metrics (SPEC §6).

use common::metrics::{LATENCY_BUCKETS, Registrar};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

/// Every metric the worker exports.
pub struct WorkerMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Messages received from Kafka.
    pub consumed: IntCounter,
    /// Messages finished, by outcome: `processed`, `duplicate` (already applied), `lifecycle`,
    /// `dead_lettered`.
    pub finished: IntCounterVec,
    /// Attempts that failed and were retried, by reason (`unavailable`, `failed`).
    pub retried: IntCounterVec,
    /// Time from receiving a message to its effects being committed.
    pub processing: Histogram,
    /// An applied event's age (since its timestamp) when the relay `published` it, when the worker
    /// `received` it and when its effects were `processed`: the end-to-end delay and where it accrues.
    pub age: HistogramVec,
    /// Messages received and not yet finished.
    pub in_flight: IntGauge,
    /// Bytes the lanes hold of those messages (see [`crate::lanes::Job::bytes`]).
    pub in_flight_bytes: IntGauge,
    /// Per partition: the broker's end offset minus the group's committed offset.
    pub lag: IntGaugeVec,
    /// Lanes' batches applied per statement (see [`crate::effects::Effects`]).
    pub statement_batches: Histogram,
}

impl WorkerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = common::metrics::registry();
        let r = Registrar(&registry);
        Self {
            consumed: r.counter("worker_events_consumed_total", "Messages received from Kafka"),
            finished: r.counter_vec("worker_events_finished_total", "Messages finished, by outcome", &["outcome"]),
            retried: r.counter_vec("worker_events_retried_total", "Failed attempts retried", &["reason"]),
            processing: r.histogram("worker_event_processing_seconds", "Receipt to committed effects", LATENCY_BUCKETS),
            age: r.histogram_vec(
                "worker_event_age_seconds",
                "Age of an applied event at each stage",
                &["stage"],
                AGE_BUCKETS,
            ),
            in_flight: r.gauge("worker_events_in_flight", "Messages received and not yet finished"),
            in_flight_bytes: r.gauge("worker_events_in_flight_bytes", "Bytes of the messages in flight"),
            lag: r.gauge_vec("kafka_consumer_lag", "End offset minus committed offset, per partition", &["partition"]),
            statement_batches: r.histogram(
                "worker_effects_statement_batches",
                "Lanes' batches applied per statement (concurrent lanes share one)",
                &[1.0, 2.0, 3.0, 4.0],
            ),
            registry,
        }
    }
}

/// Finer than the request-latency buckets where the delay target lies (tenths of a second), and long
/// enough for a backlog's age.
const AGE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
