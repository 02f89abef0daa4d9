//! Publishes outbox rows to Kafka, in `id` order, and deletes them once Kafka acknowledged them.
//!
//! One api replica at a time publishes: the one holding a PostgreSQL advisory lock on its own
//! connection. That keeps one user's events in order on the topic even with many replicas, and a
//! replica that dies releases the lock with its session, so another takes over within
//! [`STANDBY_POLL`]. Writes on this replica wake the relay at once; rows written by other replicas
//! are found within `OUTBOX_POLL_INTERVAL_MS`. Up to [`MAX_BATCHES_IN_FLIGHT`] batches await their
//! acknowledgements at once, and rows committed meanwhile are sent while there is room, so Kafka's
//! acknowledgement latency is not paid once per batch. When Kafka is slow or down the rows simply
//! stay in the outbox and are retried with backoff; requests never wait for Kafka.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use common::backoff::Backoff;
use common::config::Config;
use common::db::models::OutboxRow;
use common::db::schema::outbox;
use common::kafka::headers;
use common::postgres::Connector;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::{JoinAll, join_all};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::{Notify, watch};

/// Advisory lock key of the publishing replica (distinct from the migration lock).
const LEADER_LOCK_KEY: i64 = 0x0068_6c6d_736f_7574;

/// How often a standby replica tries to become the publisher.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// Batches that may await their acknowledgements at once (beyond, new rows wait for the oldest).
/// Kafka acknowledges a batch in tens of milliseconds (acks=all); waiting for each before sending the
/// next put that much delay on every event (measured: p50 ≈ 85 ms from commit to processed at
/// 600 events/s with one batch in flight).
const MAX_BATCHES_IN_FLIGHT: usize = 4;

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
    /// Opens the leader's own session (its advisory lock lives as long as that session).
    pub connector: Connector,
    /// Configuration.
    pub config: Config,
    /// Woken by local commits.
    pub signal: OutboxSignal,
    /// Published/failed counters.
    pub metrics: Arc<crate::metrics::ApiMetrics>,
}

impl Relay {
    /// Runs until `stop` turns true; finishes the batches in flight (bounded by `SHUTDOWN_TIMEOUT`),
    /// then flushes the producer.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut leader: Option<AsyncPgConnection> = None;
        let mut in_flight: VecDeque<Batch> = VecDeque::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        while !stopped(&stop) {
            let Some(conn) = leader.as_mut() else {
                leader = self.try_become_leader().await;
                if leader.is_none() {
                    wait(&mut stop, STANDBY_POLL, None).await;
                }
                continue;
            };
            if let Err(err) = self.send_more(conn, &mut in_flight).await {
                tracing::warn!(error = %err, "outbox relay lost its database connection; re-electing");
                (leader, in_flight) = (None, VecDeque::new());
                wait(&mut stop, backoff.next_delay(), None).await;
                continue;
            }
            let room = in_flight.len() < MAX_BATCHES_IN_FLIGHT;
            let Some(oldest) = in_flight.front_mut() else {
                backoff.reset();
                wait(&mut stop, self.config.outbox.poll_interval, Some(&self.signal)).await;
                continue;
            };
            // Rows committed while batches await their acknowledgements go out at once (while there
            // is room for another batch) instead of queueing behind the oldest one's acknowledgement.
            let results = tokio::select! {
                results = &mut oldest.deliveries => results,
                () = self.signal.0.notified(), if room => continue,
                _ = stop.changed() => continue,
            };
            let batch = in_flight.pop_front().expect("the oldest batch is in flight");
            match self.record(conn, &batch.ids, &results).await {
                Ok(()) => backoff.reset(),
                Err(BatchError::Database(err)) => {
                    tracing::warn!(error = %err, "outbox relay lost its database connection; re-electing");
                    (leader, in_flight) = (None, VecDeque::new());
                    wait(&mut stop, backoff.next_delay(), None).await;
                }
                Err(BatchError::Kafka(failed)) => {
                    tracing::warn!(
                        messages.failed = failed,
                        "Kafka did not acknowledge every outbox message; will retry"
                    );
                    // Everything still in flight is sent again from the outbox (the worker
                    // deduplicates). A producer that gave messages up (KAFKA_MESSAGE_TIMEOUT_MS) or hit
                    // a fatal error may stay unusable; a fresh one is always accepted.
                    in_flight.clear();
                    match common::kafka::producer_config(&self.config.kafka).create() {
                        Ok(producer) => self.producer = producer,
                        Err(err) => tracing::error!(error = %err, "could not recreate the Kafka producer"),
                    }
                    wait(&mut stop, backoff.next_delay(), None).await;
                }
            }
        }
        // Acknowledged rows are deleted; the others stay in the outbox for whoever publishes next.
        if let Some(conn) = leader.as_mut() {
            while let Some(batch) = in_flight.pop_front() {
                if self.finish(conn, batch, &stop).await.is_err() {
                    break;
                }
            }
        }
        if let Err(err) = self.producer.flush(self.config.server.shutdown_timeout) {
            tracing::warn!(error = %err, "Kafka producer flush at shutdown incomplete; rows stay in the outbox");
        }
        tracing::info!("outbox relay stopped");
    }

    async fn try_become_leader(&self) -> Option<AsyncPgConnection> {
        // The connector logs a failure itself.
        let mut conn = self.connector.connect().await.ok()?;
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

    /// Sends the oldest rows not already in flight, a batch at a time, until
    /// [`MAX_BATCHES_IN_FLIGHT`] batches await their acknowledgements or nothing is left.
    async fn send_more(&self, conn: &mut AsyncPgConnection, in_flight: &mut VecDeque<Batch>) -> QueryResult<()> {
        while in_flight.len() < MAX_BATCHES_IN_FLIGHT {
            let sent: Vec<i64> = in_flight.iter().flat_map(|batch| batch.ids.iter().copied()).collect();
            // Not "id > the last sent": a transaction that took a lower id may commit later.
            let rows: Vec<OutboxRow> = outbox::table
                .select(OutboxRow::as_select())
                .filter(outbox::id.ne_all(&sent))
                .order(outbox::id)
                .limit(i64::from(self.config.outbox.batch_size.get()))
                .load(conn)
                .await?;
            if rows.is_empty() {
                break;
            }
            let batch = self.send(&rows);
            let full = batch.ids.len() == rows.len();
            in_flight.push_back(batch);
            if !full {
                break; // the producer's queue is full: wait for acknowledgements first
            }
        }
        Ok(())
    }

    /// Hands rows to the producer; stops early if its local queue is full.
    fn send(&self, rows: &[OutboxRow]) -> Batch {
        let topic = &self.config.kafka.topic;
        let mut ids = Vec::with_capacity(rows.len());
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
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
                Ok(delivery) => {
                    ids.push(row.id);
                    deliveries.push(delivery);
                }
                Err((err, _)) => {
                    tracing::debug!(error = %err, "producer queue full");
                    break;
                }
            }
        }
        Batch { ids, deliveries: join_all(deliveries) }
    }

    /// Waits for a batch's acknowledgements (once shutdown begins, for at most `SHUTDOWN_TIMEOUT`)
    /// and deletes the rows Kafka acknowledged.
    async fn finish(
        &self,
        conn: &mut AsyncPgConnection,
        batch: Batch,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), BatchError> {
        let Batch { ids, deliveries } = batch;
        let mut deliveries = std::pin::pin!(deliveries);
        let mut stop = stop.clone();
        let results = tokio::select! {
            results = &mut deliveries => results,
            () = async { let _ = stop.wait_for(|stopped| *stopped).await; } => {
                match tokio::time::timeout(self.config.server.shutdown_timeout, &mut deliveries).await {
                    Ok(results) => results,
                    Err(_) => return Err(BatchError::Kafka(ids.len())),
                }
            }
        };
        self.record(conn, &ids, &results).await
    }

    /// Deletes the rows of a batch that Kafka acknowledged and counts the outcome.
    async fn record(
        &self,
        conn: &mut AsyncPgConnection,
        ids: &[i64],
        results: &[<DeliveryFuture as Future>::Output],
    ) -> Result<(), BatchError> {
        let queued = ids.len();
        let delivered: Vec<i64> =
            ids.iter().zip(results).filter(|(_, result)| matches!(result, Ok(Ok(_)))).map(|(id, _)| *id).collect();
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
            0 => Ok(()),
            failed => Err(BatchError::Kafka(failed)),
        }
    }
}

/// Rows handed to the producer, and their acknowledgements.
struct Batch {
    ids: Vec<i64>,
    deliveries: JoinAll<DeliveryFuture>,
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
