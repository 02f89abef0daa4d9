//! Traces (SPEC §11): W3C Trace Context in, OTLP out.
//!
//! Spans are `tracing` spans. When an endpoint is configured, [`exporter`] bridges this service's
//! spans to OpenTelemetry; without one there is no bridge at all, and every function here returns
//! after one relaxed atomic load, so the request path pays nothing measurable (see BENCHMARKS.md).
//!
//! A trace runs: the api's request span (continuing the client's `traceparent`, a new trace when it
//! is absent or malformed) → its PostgreSQL, Redis and outbox spans; the request span's context is
//! stored with the outbox row, sent as Kafka headers by the relay, and the worker's span per event
//! continues it.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing::level_filters::LevelFilter;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, Targets, dynamic_filter_fn};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{OtlpProtocol, TraceExport, TraceSampler};

/// Whether spans are exported (set once, by [`exporter`]).
static ON: AtomicBool = AtomicBool::new(false);

/// The target of the spans that exist only for traces (PostgreSQL, Redis, outbox work). Log lines
/// never see them: a log line's span is the request's or the event's, which carries its ids.
pub const CHILD_TARGET: &str = "otel";

/// A span's W3C trace context, as stored with an outbox row and sent as Kafka headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`.
    pub traceparent: String,
    /// `tracestate`, when the trace carries one.
    pub tracestate: Option<String>,
}

/// Header names of the trace context (HTTP and Kafka).
pub mod headers {
    /// W3C `traceparent`.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C `tracestate`.
    pub const TRACESTATE: &str = "tracestate";
}

/// Whether spans are exported.
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The exporter behind the bridge: [`Exporter::shutdown`] sends what is still queued.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports the spans still queued and stops (blocks: call it off the async workers).
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(dependency = "otlp", error = %err, "traces not all exported at shutdown");
        }
    }
}

/// The layer that turns this service's spans into OpenTelemetry spans exported by OTLP, and the
/// exporter behind it. `service` names the binary when `OTEL_SERVICE_NAME` does not.
pub fn exporter<S>(config: &TraceExport, service: &'static str) -> anyhow::Result<(impl Layer<S> + use<S>, Exporter)>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let span_exporter = match config.protocol {
        OtlpProtocol::HttpProtobuf => {
            builder.with_http().with_protocol(Protocol::HttpBinary).with_endpoint(&config.endpoint).build()
        }
        // tonic's channel is bound to the Tokio runtime this runs in (both binaries start in one).
        OtlpProtocol::Grpc => builder.with_tonic().with_endpoint(&config.endpoint).build(),
    }
    .with_context(|| format!("cannot export traces to {}", config.endpoint))?;
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone().unwrap_or_else(|| service.to_owned()))
        .build();
    // The batch processor exports from its own thread (OTEL_BSP_* tune it): requests only queue.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(span_exporter)
        .with_sampler(sampler(config.sampler))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("highload-microservice");
    // This service's spans only (the exporter's own HTTP client must not trace itself), no log
    // lines as span events; a child-only span with no span around it (a background sample, say)
    // would be a trace of its own, and is left out.
    let ours = Targets::new()
        .with_target("api", LevelFilter::INFO)
        .with_target("api::probe", LevelFilter::OFF)
        .with_target("worker", LevelFilter::INFO)
        .with_target("common", LevelFilter::INFO)
        .with_target(CHILD_TARGET, LevelFilter::INFO);
    let spans = dynamic_filter_fn(|metadata, context| {
        metadata.is_span() && (metadata.target() != CHILD_TARGET || context.lookup_current().is_some())
    })
    .with_max_level_hint(LevelFilter::INFO);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(ours.and(spans));
    ON.store(true, Ordering::Relaxed);
    Ok((layer, Exporter { provider }))
}

fn sampler(config: TraceSampler) -> Sampler {
    let root = match config.ratio {
        ratio if ratio >= 1.0 => Sampler::AlwaysOn,
        ratio if ratio <= 0.0 => Sampler::AlwaysOff,
        ratio => Sampler::TraceIdRatioBased(ratio),
    };
    if config.parent_based { Sampler::ParentBased(Box::new(root)) } else { root }
}

/// Makes the W3C context that `header` finds (`traceparent`, `tracestate`) the parent of `span`,
/// which must not have been entered yet; a new trace when it is absent or malformed. Then writes the
/// span's ids into its `trace_id` and `span_id` fields, for the log lines inside it.
pub fn continue_trace<'a>(span: &Span, header: impl Fn(&str) -> Option<&'a str>) {
    if !is_on() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Carrier(header, PhantomData));
    // Only a span that is not exported refuses a parent: then it has no ids to write either.
    if span.set_parent(parent).is_ok() {
        let context = span.context();
        let ids = context.span().span_context().clone();
        if ids.is_valid() {
            span.record("trace_id", tracing::field::display(ids.trace_id()));
            span.record("span_id", tracing::field::display(ids.span_id()));
        }
    }
}

/// The current span's W3C context, to hand on with the work it causes; `None` with traces off.
pub fn current() -> Option<TraceContext> {
    if !is_on() {
        return None;
    }
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    Some(TraceContext {
        traceparent: carrier.remove(headers::TRACEPARENT)?,
        // What a caller sends is stored with every message its request causes: beyond W3C's 512
        // characters (which a platform may drop), it is not passed on.
        tracestate: carrier.remove(headers::TRACESTATE).filter(|state| !state.is_empty() && state.len() <= 512),
    })
}

/// Marks a span as failed (its `otel.status_code` field), for spans that declare the field.
pub fn record_error(span: &Span) {
    if is_on() {
        span.record("otel.status_code", "error");
    }
}

/// The span of work on PostgreSQL (checking out a connection included).
pub fn postgres() -> Span {
    tracing::info_span!(
        target: CHILD_TARGET,
        "postgres",
        otel.kind = "client",
        db.system.name = "postgresql",
        otel.status_code = tracing::field::Empty,
    )
}

/// The span of one Redis call.
pub fn redis(operation: &'static str) -> Span {
    tracing::info_span!(
        target: CHILD_TARGET,
        "redis",
        otel.kind = "client",
        db.system.name = "redis",
        db.operation.name = operation,
        otel.status_code = tracing::field::Empty,
    )
}

/// The span of writing a message to the outbox.
pub fn outbox_insert() -> Span {
    tracing::info_span!(target: CHILD_TARGET, "outbox insert", otel.kind = "internal")
}

/// The span of one statement inserting `events` events with their outbox rows, under each request's
/// own `postgres` span (the statement is shared: see the api's event writer). OpenTelemetry's
/// `db.operation.batch.size` is only set for a batch (two or more).
pub fn outbox_insert_batch(events: usize) -> Span {
    let span = tracing::info_span!(
        target: CHILD_TARGET,
        "outbox insert",
        otel.kind = "internal",
        db.operation.batch.size = tracing::field::Empty
    );
    if events > 1 {
        span.record("db.operation.batch.size", events);
    }
    span
}

/// A header lookup as an OpenTelemetry extractor.
struct Carrier<'a, F>(F, PhantomData<&'a ()>);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Carrier<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        // The W3C propagator asks only for the headers it knows by name.
        Vec::new()
    }
}
