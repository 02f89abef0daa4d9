//! Group commit for `POST /api/v1/events`: concurrent requests share one insert statement and one
//! commit.
//!
//! Why: most of what PostgreSQL does for an event is per statement, not per row: the round trip,
//! executor start-up, the totals trigger (statement-level), the commit and its WAL flush. Measured
//! with pgbench (BENCHMARKS.md, "Where PostgreSQL's work per event goes"), an event and its outbox
//! row cost 166–183 µs of PostgreSQL CPU alone in their statement, and 30–56 µs each eight to a
//! statement.
//!
//! How: a request queues its event and waits. At most [`STATEMENTS_IN_FLIGHT`] insert statements run
//! at once; each takes every event queued when it starts (up to [`MAX_BATCH`]). So a lone request
//! never waits for company (a free slot sends its event at once), and batches form only while every
//! slot is busy, that is while PostgreSQL is what the requests wait for. A request is answered only
//! once the statement holding its event has committed (SPEC §3): the guarantees are those of one
//! statement per event.
//!
//! Failures: an event whose user does not exist is left out of its statement and answered 404, the
//! others are written. Any other error PostgreSQL reports about a statement's data (a user deleted
//! between the check and the insert fails the foreign key) sends each of its events again alone, so
//! that only the request at fault fails. A database that cannot serve the statement at all (pool
//! exhausted, connection lost) fails the whole batch: 503 for each request, as each would have got.

use std::collections::HashSet;
use std::sync::Arc;

use common::pool::{DbPool, Unavailable};
use common::traces;
use diesel::result::Error as DieselError;
use prometheus::Histogram;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Span;
use uuid::Uuid;

use super::repo::{self, NewEvent};
use crate::http::error::ApiError;

/// Insert statements running at once (per api process). Few, so that batches form under load:
/// measured side by side (POSTs from 32 connections, BENCHMARKS.md), 1, 2, 4 and 8 statements gave
/// 7.9k, 7.8–8.9k, 6.8k and 5.6k events/s at 96, 78–110, 146–158 and 207–210 µs of PostgreSQL CPU
/// per event. Two rather than one, so that one slow statement (waiting on a lock) does not stall
/// every event of the replica.
pub const STATEMENTS_IN_FLIGHT: usize = 2;

/// Most events in one statement (about 10 ms of PostgreSQL's time at the measured cost per event).
pub const MAX_BATCH: usize = 128;

/// Requests whose events wait for a statement; more wait for room (and their request deadline).
const QUEUE: usize = 1024;

/// Hands events to the batching task; cheap to share.
pub struct EventWriter {
    queue: mpsc::Sender<Pending>,
}

/// One request's event, waiting for its statement.
struct Pending {
    event: NewEvent,
    /// The request's `postgres` span: the statement's span is created as its child.
    span: Span,
    reply: oneshot::Sender<Result<(), ApiError>>,
}

impl EventWriter {
    /// Starts the task forming batches on `pool`; `batch_sizes` observes each statement's size.
    pub fn start(pool: DbPool, batch_sizes: Histogram) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        tokio::spawn(form_batches(pool, waiting, batch_sizes));
        Self { queue }
    }

    /// Writes `event` with its outbox message, returning once committed; 404 `user` when the user
    /// does not exist. If the caller stops waiting (its deadline), the event is still written or not
    /// as a whole with its batch.
    pub async fn write(&self, event: NewEvent) -> Result<(), ApiError> {
        let span = traces::postgres();
        let (reply, answer) = oneshot::channel();
        self.queue.send(Pending { event, span: span.clone(), reply }).await.map_err(|_| stopped())?;
        let result = answer.await.unwrap_or_else(|_| Err(stopped()));
        if result.is_err() {
            traces::record_error(&span);
        }
        result
    }
}

fn stopped() -> ApiError {
    ApiError::Unavailable(anyhow::anyhow!("the event writer has stopped (the api is shutting down)"))
}

/// Takes what is queued whenever a statement slot is free, until every [`EventWriter`] is dropped.
async fn form_batches(pool: DbPool, mut waiting: mpsc::Receiver<Pending>, batch_sizes: Histogram) {
    let slots = Arc::new(Semaphore::new(STATEMENTS_IN_FLIGHT));
    loop {
        let slot = Arc::clone(&slots).acquire_owned().await.expect("the semaphore is never closed");
        let mut batch = Vec::new();
        if waiting.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        batch_sizes.observe(batch.len() as f64);
        let pool = pool.clone();
        tokio::spawn(async move {
            write_batch(&pool, batch).await;
            drop(slot);
        });
    }
}

/// Why a statement failed.
enum Failure {
    Unavailable(Unavailable),
    Database(DieselError),
}

impl From<Unavailable> for Failure {
    fn from(err: Unavailable) -> Self {
        Self::Unavailable(err)
    }
}

impl Failure {
    /// The answer for each request of the batch (the error itself goes to one: errors are not `Clone`).
    fn to_api_error(&self) -> ApiError {
        match self {
            Self::Unavailable(err) => ApiError::Unavailable(anyhow::anyhow!("{err}")),
            Self::Database(err) if common::pool::is_transient(err) => {
                ApiError::Unavailable(anyhow::anyhow!("PostgreSQL could not serve the query: {err}"))
            }
            Self::Database(err) => ApiError::Internal(anyhow::anyhow!("database query failed: {err}")),
        }
    }
}

async fn write_batch(pool: &DbPool, batch: Vec<Pending>) {
    let (events, waiters): (Vec<NewEvent>, Vec<(Span, oneshot::Sender<_>)>) =
        batch.into_iter().map(|pending| (pending.event, (pending.span, pending.reply))).unzip();
    let events: Arc<[NewEvent]> = events.into();
    let statement_spans: Vec<Span> =
        waiters.iter().map(|(span, _)| span.in_scope(|| traces::outbox_insert_batch(events.len()))).collect();
    let results = match insert(pool, &events).await {
        Ok(written) => answers(&events, &written),
        Err(Failure::Database(err)) if events.len() > 1 && !common::pool::is_transient(&err) => {
            tracing::warn!(error = %err, events = events.len(), "an event batch failed; writing its events one by one");
            let mut results = Vec::with_capacity(events.len());
            for event in events.iter() {
                let one: Arc<[NewEvent]> = Arc::new([event.clone()]);
                results.push(match insert(pool, &one).await {
                    Ok(written) => answers(&one, &written).remove(0),
                    Err(failure) => Err(failure.to_api_error()),
                });
            }
            results
        }
        Err(failure) => events.iter().map(|_| Err(failure.to_api_error())).collect(),
    };
    drop(statement_spans);
    for ((_, reply), result) in waiters.into_iter().zip(results) {
        // A request that stopped waiting (its deadline) has dropped its receiver.
        let _ = reply.send(result);
    }
}

async fn insert(pool: &DbPool, events: &Arc<[NewEvent]>) -> Result<Vec<Uuid>, Failure> {
    let events = Arc::clone(events);
    pool.run(|conn| Box::pin(async move { repo::insert_with_messages(conn, &events).await.map_err(Failure::Database) }))
        .await
}

/// Each event's answer: written, or 404 for a user that does not exist.
fn answers(events: &[NewEvent], written: &[Uuid]) -> Vec<Result<(), ApiError>> {
    let written: HashSet<&Uuid> = written.iter().collect();
    events
        .iter()
        .map(|event| if written.contains(&event.row.id) { Ok(()) } else { Err(ApiError::NotFound("user")) })
        .collect()
}
