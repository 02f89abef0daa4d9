//! The bounded worker pool: `WORKER_CONCURRENCY` lanes, each applying its messages one at a time.
//! A message goes to the lane of its key (the user id), so one user's events are applied in order
//! while different users proceed in parallel.

use std::time::Duration;

use common::kafka::{EventMessage, headers};
use common::pool::DbPool;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::effects::{self, Applied, EffectError};

/// One message for a lane, tagged with where its completion must be reported.
pub struct Job {
    /// The message as consumed.
    pub message: OwnedMessage,
    /// Its partition's assignment generation (see [`crate::offsets::OffsetTracker`]).
    pub generation: u64,
}

/// A finished message: its effects are durable (or it was dead-lettered), so its offset may be stored.
pub struct Done {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Generation it was started in.
    pub generation: u64,
}

/// What every lane needs.
#[derive(Clone)]
pub struct LaneContext {
    /// PostgreSQL.
    pub pool: DbPool,
    /// For dead letters.
    pub producer: FutureProducer,
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

/// Runs one lane until its channel closes.
pub async fn run_lane(context: LaneContext, mut jobs: mpsc::UnboundedReceiver<Job>, done: mpsc::UnboundedSender<Done>) {
    while let Some(job) = jobs.recv().await {
        let partition = job.message.partition();
        let offset = job.message.offset();
        if handle(&context, &job.message).await.is_some() {
            let _ = done.send(Done { partition, offset, generation: job.generation });
        }
    }
}

/// Applies a message; `None` when shutdown interrupted it (not finished: it will be redelivered).
async fn handle(context: &LaneContext, message: &OwnedMessage) -> Option<()> {
    let request_id = header(message, headers::REQUEST_ID).unwrap_or_default();
    let span = tracing::info_span!(
        "event",
        kafka.partition = message.partition(),
        kafka.offset = message.offset(),
        request_id = %request_id,
        event.id = tracing::field::Empty,
        event.type = tracing::field::Empty,
    );
    process(context, message, &span).instrument(span.clone()).await
}

async fn process(context: &LaneContext, message: &OwnedMessage, span: &tracing::Span) -> Option<()> {
    let decoded = message
        .payload()
        .ok_or_else(|| "message has no payload".to_owned())
        .and_then(|payload| serde_json::from_slice::<EventMessage>(payload).map_err(|err| err.to_string()));
    let event = match decoded {
        Ok(event) => event,
        Err(error) => {
            tracing::warn!(error, "undecodable message; dead-lettering");
            return dead_letter(context, message, &format!("undecodable: {error}"), None).await;
        }
    };
    span.record("event.id", tracing::field::display(event.id));
    span.record("event.type", event.event_type.as_str());

    let started = std::time::Instant::now();
    let mut attempt = 0;
    let mut backoff = context.retry_backoff;
    loop {
        match effects::apply(&context.pool, &event).await {
            Ok(applied) => {
                let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                let outcome = match applied {
                    Applied::Processed => "processed",
                    Applied::AlreadyDone => "duplicate",
                    Applied::Lifecycle => "lifecycle",
                };
                context.metrics.finished.with_label_values(&[outcome]).inc();
                context.metrics.processing.observe(started.elapsed().as_secs_f64());
                tracing::info!(duration_ms, outcome, "event finished");
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
                    return dead_letter(context, message, &error, Some(event.id)).await;
                }
                context.metrics.retried.with_label_values(&["failed"]).inc();
                tracing::warn!(error, attempt, "event failed; retrying");
            }
        }
        sleep_unless_stopped(context, backoff).await?;
        backoff = (backoff * 2).min(MAX_BACKOFF);
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
    let mut backoff = context.retry_backoff;
    loop {
        match step().await {
            Ok(()) => return Some(()),
            Err(error) => tracing::warn!(error, "{what} failed; retrying"),
        }
        sleep_unless_stopped(context, backoff).await?;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn sleep_unless_stopped(context: &LaneContext, period: Duration) -> Option<()> {
    let mut stop = context.stop.clone();
    tokio::select! {
        () = tokio::time::sleep(period) => Some(()),
        _ = stop.wait_for(|stopped| *stopped) => None,
    }
}

/// A message header as text (lossy for non-UTF-8 values).
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| header.value)
        .map(|value| String::from_utf8_lossy(value).into_owned())
}
