//! The bounded worker pool: `WORKER_CONCURRENCY` lanes, each applying its queued messages in order,
//! as one batch when it can. A message goes to the lane of its key (the user id), so one user's
//! events are applied in order while different users proceed in parallel.

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::backoff::Backoff;
use common::kafka::KafkaProducer;
use common::kafka::{EventMessage, headers};
use common::pool::DbPool;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::effects::{self, Applied, EffectError, Effects};

/// One message for a lane, tagged with where its completion must be reported.
pub struct Job {
    /// The message as consumed.
    pub message: OwnedMessage,
    /// Its partition's assignment generation (see [`crate::offsets::OffsetTracker`]).
    pub generation: u64,
    /// When the consumer handed it over (wall clock: compared with the event's own timestamp).
    pub received: DateTime<Utc>,
}

impl Job {
    /// The memory this job holds, counted against `WORKER_MAX_IN_FLIGHT_BYTES`: the message's payload,
    /// key, headers and topic name (its copies out of librdkafka's buffers) and the job itself.
    pub fn bytes(&self) -> usize {
        let message = &self.message;
        let headers = message.headers().map_or(0, |headers| {
            headers.iter().map(|header| header.key.len() + header.value.map_or(0, <[u8]>::len)).sum()
        });
        size_of::<Self>()
            + message.payload().map_or(0, <[u8]>::len)
            + message.key().map_or(0, <[u8]>::len)
            + headers
            + message.topic().len()
    }
}

/// A finished message: its effects are durable (or it was dead-lettered), so its offset may be stored.
pub struct Done {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Generation it was started in.
    pub generation: u64,
    /// What it held ([`Job::bytes`]); the lane lets go of it now.
    pub bytes: usize,
}

/// What every lane needs.
#[derive(Clone)]
pub struct LaneContext {
    /// PostgreSQL.
    pub pool: DbPool,
    /// Applies batches, several lanes' in one statement.
    pub effects: Effects,
    /// For dead letters.
    pub producer: KafkaProducer,
    /// `<topic>.dlq`.
    pub dlq_topic: String,
    /// Attempts before dead-lettering.
    pub max_retries: u32,
    /// First retry delay.
    pub retry_backoff: Duration,
    /// Turns true at shutdown: lanes abandon retries (the message is redelivered later).
    pub stop: watch::Receiver<bool>,
    /// Counters and the processing histogram.
    pub metrics: std::sync::Arc<crate::metrics::WorkerMetrics>,
}

/// Longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Most messages a lane applies in one statement. Batches form only from what is already queued, so
/// a lone event is never held back waiting for company.
const MAX_BATCH: usize = 128;

/// Runs one lane until its channel closes.
pub async fn run_lane(context: LaneContext, mut jobs: mpsc::UnboundedReceiver<Job>, done: mpsc::UnboundedSender<Done>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let finished = handle_batch(&context, &batch).await;
        for job in &batch[..finished] {
            let (partition, offset) = (job.message.partition(), job.message.offset());
            let _ = done.send(Done { partition, offset, generation: job.generation, bytes: job.bytes() });
        }
        batch.clear();
    }
}

/// Applies a lane's queued messages, in order; returns how many of them (a prefix) finished before
/// shutdown interrupted (the rest will be redelivered).
///
/// The whole batch goes in one statement when every message decodes. If that fails for a reason
/// other than PostgreSQL being unavailable, one of its events is bad: the batch is applied message by
/// message instead, so only that one is retried and dead-lettered.
async fn handle_batch(context: &LaneContext, batch: &[Job]) -> usize {
    // One span per message, whichever way it is applied (its log lines, and its span in a trace).
    let spans: Vec<tracing::Span> = batch.iter().map(|job| event_span(&job.message)).collect();
    if batch.len() > 1 {
        let decoded: Option<Vec<EventMessage>> = batch.iter().map(|job| decode(&job.message).ok()).collect();
        if let Some(events) = decoded {
            match apply_batch(context, batch, &events, &spans).await {
                BatchOutcome::Applied => return batch.len(),
                BatchOutcome::Stopped => return 0,
                BatchOutcome::Split => {}
            }
        }
    }
    for (finished, (job, span)) in batch.iter().zip(&spans).enumerate() {
        if process(context, job, span).instrument(span.clone()).await.is_none() {
            return finished;
        }
    }
    batch.len()
}

enum BatchOutcome {
    Applied,
    Stopped,
    Split,
}

/// `spans` are the messages' own: each covers the batch's work; the batch's database span sits
/// under the first.
async fn apply_batch(
    context: &LaneContext,
    batch: &[Job],
    events: &[EventMessage],
    spans: &[tracing::Span],
) -> BatchOutcome {
    let started = std::time::Instant::now();
    let refs: Vec<&EventMessage> = events.iter().collect();
    for (span, event) in spans.iter().zip(events) {
        record_event(span, event);
    }
    let mut backoff = Backoff::new(context.retry_backoff, MAX_BACKOFF);
    loop {
        let first = spans.first().cloned().unwrap_or_else(tracing::Span::none);
        match context.effects.apply(&refs).instrument(first).await {
            Ok(applied) => {
                for (((job, event), applied), span) in batch.iter().zip(events).zip(applied).zip(spans) {
                    span.in_scope(|| finished(context, applied, started));
                    record_age(context, job, event, applied);
                }
                return BatchOutcome::Applied;
            }
            Err(EffectError::Unavailable(error)) => {
                context.metrics.retried.with_label_values(&["unavailable"]).inc();
                tracing::warn!(error, events = batch.len(), "database unavailable; retrying (offsets not committed)");
            }
            Err(EffectError::Failed(error)) => {
                tracing::warn!(error, events = batch.len(), "batch failed; applying its events one by one");
                return BatchOutcome::Split;
            }
        }
        if sleep_unless_stopped(context, backoff.next_delay()).await.is_none() {
            return BatchOutcome::Stopped;
        }
    }
}

/// The span of one message (its log lines, and with traces on its span in the trace of the request
/// that caused it): where it came from and that request.
fn event_span(message: &OwnedMessage) -> tracing::Span {
    let request_id = header(message, headers::REQUEST_ID).unwrap_or_default();
    let span = tracing::info_span!(
        "event",
        kafka.partition = message.partition(),
        kafka.offset = message.offset(),
        request_id = %request_id,
        event.id = tracing::field::Empty,
        event.type = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if common::traces::is_on() {
        span.record("otel.name", format!("process {}", message.topic()));
        span.record("otel.kind", "consumer");
        common::traces::continue_trace(&span, |name| header(message, name));
    }
    span
}

fn record_event(span: &tracing::Span, event: &EventMessage) {
    span.record("event.id", tracing::field::display(event.id));
    span.record("event.type", event.event_type.as_str());
}

fn decode(message: &OwnedMessage) -> Result<EventMessage, String> {
    let payload = message.payload().ok_or_else(|| "message has no payload".to_owned())?;
    serde_json::from_slice::<EventMessage>(payload).map_err(|err| err.to_string())
}

/// Counts and logs an event whose effects are durable.
fn finished(context: &LaneContext, applied: Applied, started: std::time::Instant) {
    let outcome = match applied {
        Applied::Processed => "processed",
        Applied::AlreadyDone => "duplicate",
        Applied::Lifecycle => "lifecycle",
    };
    context.metrics.finished.with_label_values(&[outcome]).inc();
    context.metrics.processing.observe(started.elapsed().as_secs_f64());
    tracing::info!(duration_ms = started.elapsed().as_secs_f64() * 1000.0, outcome, "event finished");
}

/// Records how old an applied event was when the relay published it, when the worker received it and
/// now that its effects are committed: where an event's delay accrues. A redelivery of an event
/// already applied is left out (its age measures the redelivery, not the pipeline).
fn record_age(context: &LaneContext, job: &Job, event: &EventMessage, applied: Applied) {
    if applied == Applied::AlreadyDone {
        return;
    }
    // Clocks of different hosts may disagree a little: never a negative age.
    let age = |at: DateTime<Utc>| ((at - event.timestamp).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0);
    let ages = &context.metrics.age;
    if let Some(published) = job.message.timestamp().to_millis().and_then(DateTime::from_timestamp_millis) {
        ages.with_label_values(&["published"]).observe(age(published));
    }
    ages.with_label_values(&["received"]).observe(age(job.received));
    ages.with_label_values(&["processed"]).observe(age(Utc::now()));
}

/// Applies a message in its `span`; `None` when shutdown interrupted it (not finished: it will be
/// redelivered).
async fn process(context: &LaneContext, job: &Job, span: &tracing::Span) -> Option<()> {
    let message = &job.message;
    let event = match decode(message) {
        Ok(event) => event,
        Err(error) => {
            tracing::warn!(error, "undecodable message; dead-lettering");
            common::traces::record_error(span);
            return dead_letter(context, message, &format!("undecodable: {error}"), None).await;
        }
    };
    record_event(span, &event);

    let started = std::time::Instant::now();
    let mut attempt = 0;
    let mut backoff = Backoff::new(context.retry_backoff, MAX_BACKOFF);
    loop {
        match context.effects.apply(&[&event]).await {
            Ok(applied) => {
                finished(context, applied[0], started);
                record_age(context, job, &event, applied[0]);
                return Some(());
            }
            Err(EffectError::Unavailable(error)) => {
                context.metrics.retried.with_label_values(&["unavailable"]).inc();
                tracing::warn!(error, "database unavailable; retrying (offset not committed)");
            }
            Err(EffectError::Failed(error)) => {
                attempt += 1;
                if attempt >= context.max_retries.max(1) {
                    tracing::error!(error, attempts = attempt, "event failed; dead-lettering");
                    common::traces::record_error(span);
                    return dead_letter(context, message, &error, Some(event.id)).await;
                }
                context.metrics.retried.with_label_values(&["failed"]).inc();
                tracing::warn!(error, attempt, "event failed; retrying");
            }
        }
        sleep_unless_stopped(context, backoff.next_delay()).await?;
    }
}

/// Publishes the message to the dead-letter topic with the error in a header, then marks the event
/// `failed`. Each step is retried until it succeeds (or shutdown): a poison message is never dropped.
async fn dead_letter(
    context: &LaneContext,
    message: &OwnedMessage,
    error: &str,
    event_id: Option<uuid::Uuid>,
) -> Option<()> {
    retry(context, "publishing to the dead-letter topic", || async {
        let mut dlq_headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                dlq_headers = dlq_headers.insert(Header { key: header.key, value: header.value });
            }
        }
        dlq_headers = dlq_headers.insert(Header { key: headers::ERROR, value: Some(error) });
        let mut record = FutureRecord::<[u8], [u8]>::to(&context.dlq_topic).headers(dlq_headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        context.producer.send(record, Duration::from_secs(5)).await.map(drop).map_err(|(err, _)| err.to_string())
    })
    .await?;
    context.metrics.finished.with_label_values(&["dead_lettered"]).inc();
    if let Some(id) = event_id {
        retry(context, "marking the event failed", || async {
            effects::mark_failed(&context.pool, id).await.map_err(|err| err.to_string())
        })
        .await?;
    }
    Some(())
}

/// Repeats `step` with backoff until it succeeds; `None` if shutdown came first.
async fn retry<F, Fut>(context: &LaneContext, what: &str, mut step: F) -> Option<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut backoff = Backoff::new(context.retry_backoff, MAX_BACKOFF);
    loop {
        match step().await {
            Ok(()) => return Some(()),
            Err(error) => tracing::warn!(error, "{what} failed; retrying"),
        }
        sleep_unless_stopped(context, backoff.next_delay()).await?;
    }
}

async fn sleep_unless_stopped(context: &LaneContext, period: Duration) -> Option<()> {
    let mut stop = context.stop.clone();
    tokio::select! {
        () = tokio::time::sleep(period) => Some(()),
        _ = stop.wait_for(|stopped| *stopped) => None,
    }
}

/// A message header that is text.
pub fn header<'m>(message: &'m OwnedMessage, name: &str) -> Option<&'m str> {
    let value = message.headers()?.iter().find(|header| header.key == name)?.value?;
    std::str::from_utf8(value).ok()
}
