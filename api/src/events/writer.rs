//! Group commit for `POST /api/v1/events` ([`common::group_commit`]): concurrent requests share one
//! insert statement and one commit. A request is answered only once the statement holding its event
//! has committed (SPEC §3): the guarantees are those of one statement per event. Measured with
//! pgbench (BENCHMARKS.md), an event and its outbox row cost 166–183 µs of PostgreSQL CPU alone in
//! their statement, and 30–56 µs each eight to a statement.
//!
//! Failures: an event whose user does not exist is left out of its statement and answered 404, the
//! others are written. Any other error PostgreSQL reports about a statement (a user deleted between
//! the check and the insert fails the foreign key: 404; one event's lock wait outlasting the statement
//! timeout) sends each of its events again alone, so that only the request at fault fails. A database
//! that cannot serve the statement at all (pool exhausted, connection lost) fails the whole batch: 503
//! for each request, as each would have got.

use std::collections::HashSet;
use std::sync::Arc;

use common::group_commit::GroupCommit;
use common::pool::{DbPool, Unavailable};
use common::traces;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use prometheus::Histogram;
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

/// An event with the request's `postgres` span (the statement's span is created as its child).
type Pending = (NewEvent, Span);

/// Writes POSTed events; cheap to share.
pub struct EventWriter {
    commits: GroupCommit<Pending, Result<(), ApiError>>,
    /// Its own sessions ([`crate::db::events_pool`]), kept here for the pool metrics.
    pool: DbPool,
}

impl EventWriter {
    /// Starts the task forming batches on `pool`; `batch_sizes` observes each statement's size.
    pub fn start(pool: DbPool, batch_sizes: Histogram) -> Self {
        let sessions = pool.clone();
        let commits = GroupCommit::start(STATEMENTS_IN_FLIGHT, MAX_BATCH, batch_sizes, move |batch: Vec<Pending>| {
            write_batch(sessions.clone(), batch)
        });
        Self { commits, pool }
    }

    /// The sessions it writes with.
    pub fn pool(&self) -> &DbPool {
        &self.pool
    }

    /// Writes `event` with its outbox message, returning once committed; 404 `user` when the user
    /// does not exist. If the caller stops waiting (its deadline), the event is still written or not
    /// as a whole with its batch.
    pub async fn write(&self, event: NewEvent) -> Result<(), ApiError> {
        let span = traces::postgres();
        let result = self.commits.submit((event, span.clone())).await.unwrap_or_else(|| {
            Err(ApiError::Internal(anyhow::anyhow!("the event writer gave no answer (stopped, or its write failed)")))
        });
        if result.is_err() {
            traces::record_error(&span);
        }
        result
    }
}

/// Why a statement failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Unavailable(Arc<Unavailable>),
    #[error("{0}")]
    Database(Arc<DieselError>),
}

impl From<Unavailable> for Failure {
    fn from(err: Unavailable) -> Self {
        Self::Unavailable(Arc::new(err))
    }
}

impl Failure {
    /// Whether PostgreSQL answered about the statement itself (an error with a SQLSTATE), as opposed
    /// to not serving it at all: then each event alone may fare differently.
    fn is_about_the_statement(&self) -> bool {
        match self {
            Self::Unavailable(_) => false,
            Self::Database(err) => !matches!(
                **err,
                DieselError::DatabaseError(
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                    _
                )
            ),
        }
    }

    /// The answer for each request of the batch (each its own: `ApiError` is not `Clone`).
    fn to_api_error(&self) -> ApiError {
        match self {
            Self::Unavailable(err) => Arc::clone(err).into(),
            Self::Database(err) => insert_failed(Arc::clone(err)),
        }
    }
}

async fn write_batch(pool: DbPool, batch: Vec<Pending>) -> Vec<Result<(), ApiError>> {
    let (events, spans): (Vec<NewEvent>, Vec<Span>) = batch.into_iter().unzip();
    let events: Arc<[NewEvent]> = events.into();
    let statement_spans: Vec<Span> =
        spans.iter().map(|span| span.in_scope(|| traces::outbox_insert_batch(events.len()))).collect();
    let results = match insert(&pool, &events).await {
        Ok(written) => answers(&events, &written),
        Err(failure) if events.len() > 1 && failure.is_about_the_statement() => {
            tracing::warn!(error = %failure, events = events.len(), "an event batch failed; writing its events one by one");
            let mut results = Vec::with_capacity(events.len());
            let mut unavailable = None;
            for event in events.iter() {
                // Once the database stops serving, the rest would only wait for it one by one.
                if let Some(failure) = &unavailable {
                    results.push(Err(Failure::to_api_error(failure)));
                    continue;
                }
                let one: Arc<[NewEvent]> = Arc::new([event.clone()]);
                results.push(match insert(&pool, &one).await {
                    Ok(written) => answers(&one, &written).remove(0),
                    Err(failure) => {
                        let result = Err(failure.to_api_error());
                        if !failure.is_about_the_statement() {
                            unavailable = Some(failure);
                        }
                        result
                    }
                });
            }
            results
        }
        Err(failure) => events.iter().map(|_| Err(failure.to_api_error())).collect(),
    };
    drop(statement_spans);
    results
}

async fn insert(pool: &DbPool, events: &Arc<[NewEvent]>) -> Result<Vec<Uuid>, Failure> {
    let events = Arc::clone(events);
    pool.run(|conn| {
        Box::pin(async move {
            repo::insert_with_messages(conn, &events).await.map_err(|err| Failure::Database(Arc::new(err)))
        })
    })
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

/// The answer for a failed insert of events: 404 when the user does not exist (deleted between the
/// statement's check and its insert: the foreign key), otherwise as for any failed query.
pub fn insert_failed(err: impl Into<Arc<DieselError>>) -> ApiError {
    let err = err.into();
    if matches!(*err, DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)) {
        ApiError::NotFound("user")
    } else {
        err.into()
    }
}
