//! Publishes outbox rows to Kafka, in `id` order, and deletes them once Kafka acknowledged them.
//!
//! One api replica at a time publishes: the one holding a PostgreSQL advisory lock on its own
//! connection. That keeps one user's events in order on the topic even with many replicas, and a
//! replica that dies releases the lock with its session, so another takes over within
//! [`STANDBY_POLL`]. Writes on this replica wake the relay at once; rows written by other replicas
//! are found within `OUTBOX_POLL_INTERVAL_MS`. When Kafka is slow or down the rows simply stay in the
//! outbox and are retried with backoff; requests never wait for Kafka.

use std::sync::Arc;
use std::time::Duration;

use common::config::Config;
use common::db::models::OutboxRow;
use common::db::schema::outbox;
use common::kafka::headers;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{Notify, watch};

/// Advisory lock key of the publishing replica (distinct from the migration lock).
const LEADER_LOCK_KEY: i64 = 0x0068_6c6d_736f_7574;

/// How often a standby replica tries to become the publisher.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// Longest pause between retries while Kafka or PostgreSQL fail.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Wakes the relay after a commit that wrote outbox rows. Cheap to clone.
#[derive(Clone, Default)]
pub struct OutboxSignal(Arc<Notify>);

impl OutboxSignal {
    /// New rows are committed.
    pub fn rows_committed(&self) {
        self.0.notify_one();
    }
}

/// The relay task's inputs.
pub struct Relay {
    /// Kafka producer; replaced after a failed batch (see [`Relay::run`]).
    pub producer: FutureProducer,
    /// Configuration.
    pub config: Config,
    /// Woken by local commits.
    pub signal: OutboxSignal,
    /// Published/failed counters.
    pub metrics: Arc<crate::metrics::ApiMetrics>,
}

impl Relay {
    /// Runs until `stop` turns true; finishes the batch in flight (bounded by `SHUTDOWN_TIMEOUT`),
    /// then flushes the producer.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut leader: Option<AsyncPgConnection> = None;
        let mut backoff = Duration::from_millis(100);
        while !stopped(&stop) {
            let Some(conn) = leader.as_mut() else {
                leader = self.try_become_leader().await;
                if leader.is_none() {
                    wait(&mut stop, STANDBY_POLL, None).await;
                }
                continue;
            };
            match self.publish_batch(conn, &stop).await {
                Ok(0) => {
                    backoff = Duration::from_millis(100);
                    wait(&mut stop, self.config.outbox.poll_interval, Some(&self.signal)).await;
                }
                Ok(_) => backoff = Duration::from_millis(100),
                Err(BatchError::Database(err)) => {
                    tracing::warn!(error = %err, "outbox relay lost its database connection; re-electing");
                    leader = None;
                    wait(&mut stop, backoff, None).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(BatchError::Kafka(failed)) => {
                    tracing::warn!(
                        messages.failed = failed,
                        "Kafka did not acknowledge every outbox message; will retry"
                    );
                    // A producer that gave messages up (KAFKA_MESSAGE_TIMEOUT_MS) or hit a fatal error
                    // may stay unusable; a fresh one is always accepted, and rows it resends are
                    // deduplicated by the worker's idempotency.
                    match common::kafka::producer_config(&self.config.kafka).create() {
                        Ok(producer) => self.producer = producer,
                        Err(err) => tracing::error!(error = %err, "could not recreate the Kafka producer"),
                    }
                    wait(&mut stop, backoff, None).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Err(err) = self.producer.flush(self.config.server.shutdown_timeout) {
            tracing::warn!(error = %err, "Kafka producer flush at shutdown incomplete; rows stay in the outbox");
        }
        tracing::info!("outbox relay stopped");
    }

    async fn try_become_leader(&self) -> Option<AsyncPgConnection> {
        let conninfo = self.config.database.connection_string("highload-api-outbox");
        let mut conn = match AsyncPgConnection::establish(&conninfo).await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "outbox relay cannot connect to PostgreSQL");
                return None;
            }
        };
        let acquired = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(&format!(
            "pg_try_advisory_lock({LEADER_LOCK_KEY})"
        )))
        .get_result::<bool>(&mut conn)
        .await;
        match acquired {
            Ok(true) => {
                tracing::info!("this replica now publishes the outbox");
                Some(conn)
            }
            Ok(false) => None,
            Err(err) => {
                tracing::warn!(error = %err, "outbox relay could not take the publisher lock");
                None
            }
        }
    }

    /// Publishes the oldest rows; returns how many were delivered and deleted.
    async fn publish_batch(
        &self,
        conn: &mut AsyncPgConnection,
        stop: &watch::Receiver<bool>,
    ) -> Result<usize, BatchError> {
        let rows: Vec<OutboxRow> = outbox::table
            .select(OutboxRow::as_select())
            .order(outbox::id)
            .limit(i64::from(self.config.outbox.batch_size.get()))
            .load(conn)
            .await
            .map_err(BatchError::Database)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let topic = &self.config.kafka.topic;
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let key = row.user_id.to_string();
            let mut message_headers = OwnedHeaders::new()
                .insert(Header { key: headers::CONTENT_TYPE, value: Some("application/json") })
                .insert(Header { key: headers::EVENT_TYPE, value: Some(row.event_type.as_str()) });
            if let Some(request_id) = &row.request_id {
                message_headers =
                    message_headers.insert(Header { key: headers::REQUEST_ID, value: Some(request_id.as_str()) });
            }
            let record = FutureRecord::to(topic).key(&key).payload(&row.payload).headers(message_headers);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push((row.id, delivery)),
                // Local queue full: publish what is queued, the rest goes in the next batch.
                Err((err, _)) => {
                    tracing::debug!(error = %err, "producer queue full");
                    break;
                }
            }
        }
        let queued = pending.len();
        let ids: Vec<i64> = pending.iter().map(|(id, _)| *id).collect();
        let mut deliveries = std::pin::pin!(join_all(pending.into_iter().map(|(_, delivery)| delivery)));
        // Once shutdown begins, acknowledgements get at most SHUTDOWN_TIMEOUT; the rest stay in the outbox.
        let mut stop = stop.clone();
        let results = tokio::select! {
            results = &mut deliveries => results,
            () = async { let _ = stop.wait_for(|stopped| *stopped).await; } => {
                match tokio::time::timeout(self.config.server.shutdown_timeout, &mut deliveries).await {
                    Ok(results) => results,
                    Err(_) => return Err(BatchError::Kafka(queued)),
                }
            }
        };
        let delivered: Vec<i64> =
            ids.iter().zip(&results).filter(|(_, result)| matches!(result, Ok(Ok(_)))).map(|(id, _)| *id).collect();
        if !delivered.is_empty() {
            diesel::delete(outbox::table.filter(outbox::id.eq_any(&delivered)))
                .execute(conn)
                .await
                .map_err(BatchError::Database)?;
        }
        if let Some(Ok(Err((err, _)))) = results.iter().find(|result| matches!(result, Ok(Err(_)))) {
            tracing::warn!(error = %err, fatal = ?self.producer.client().fatal_error(), "first delivery failure");
        }
        self.metrics.outbox_published.inc_by(delivered.len() as u64);
        self.metrics.outbox_failed.inc_by((queued - delivered.len()) as u64);
        tracing::debug!(messages.delivered = delivered.len(), "outbox batch published");
        match queued - delivered.len() {
            0 => Ok(delivered.len()),
            failed => Err(BatchError::Kafka(failed)),
        }
    }
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

enum BatchError {
    Database(diesel::result::Error),
    Kafka(usize),
}

/// Sleeps `period`, or less if stopped or (when given) signalled.
async fn wait(stop: &mut watch::Receiver<bool>, period: Duration, signal: Option<&OutboxSignal>) {
    let signalled = async {
        match signal {
            Some(signal) => signal.0.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tokio::time::sleep(period) => {}
        _ = stop.changed() => {}
        () = signalled => {}
    }
}
