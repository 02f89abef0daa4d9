//! Publishes outbox rows to Kafka, in `id` order, and deletes them once Kafka acknowledged them.
//!
//! One api replica at a time publishes: the one holding the publisher [`Lease`]. That keeps one
//! user's events in order on the topic even with many replicas. A publisher that stops making
//! progress for any reason loses the lease and another replica publishes within
//! `OUTBOX_TAKEOVER_TIMEOUT`: killed, frozen or cut off, it stops renewing; stalled on Kafka (its
//! oldest batch unacknowledged for a quarter of that time), it stops renewing on purpose, so that a
//! replica that still reaches Kafka takes over. A graceful shutdown hands the lease over at once.
//! Writes on this replica wake the relay at once; rows written by other replicas are found within
//! `OUTBOX_POLL_INTERVAL_MS`. Up to [`MAX_BATCHES_IN_FLIGHT`] batches await their acknowledgements at
//! once, and rows committed meanwhile are sent while there is room, so Kafka's acknowledgement
//! latency is not paid once per batch. When Kafka is slow or down the rows simply stay in the outbox
//! and are retried with backoff; requests never wait for Kafka.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::backoff::Backoff;
use common::config::{Config, DatabaseConfig};
use common::db::models::OutboxRow;
use common::db::schema::{outbox, outbox_publisher};
use common::kafka::KafkaProducer;
use common::kafka::headers;
use common::postgres::Connector;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::{JoinAll, join_all};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer, PurgeConfig};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::lease::{Lease, Timings};

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
    /// Kafka producer; replaced after a failed batch and when this replica stops publishing.
    pub producer: KafkaProducer,
    /// Where the current producer is published (the background Kafka check uses it).
    pub current_producer: watch::Sender<KafkaProducer>,
    /// Opens the relay's own session (so that a saturated pool never delays a renewal).
    pub connector: Connector,
    /// Configuration.
    pub config: Config,
    /// Woken by local commits.
    pub signal: OutboxSignal,
    /// Published/failed counters.
    pub metrics: Arc<crate::metrics::ApiMetrics>,
}

/// Why a replica stopped publishing.
enum Ended {
    /// Shutdown: the lease was handed over.
    Stopped,
    /// Another replica took the lease (this one was frozen, cut off or slow).
    Lost,
    /// Kafka acknowledged nothing for too long; the lease was left to run out.
    Stalled,
}

/// The relay's session plans each statement for the outbox as it is now. The outbox swings from
/// empty to a backlog of millions and back; a generic plan, cached once a prepared statement has run
/// five times, fits the size the table had then: planned on a near-empty outbox it scans the whole
/// heap (dead rows included) for every batch of a later backlog, until something replans it (a
/// VACUUM or ANALYZE of the outbox, a new session). Measured in `bench/run`'s end-to-end phase: the
/// select and the delete read about 1,600 pages a call instead of walking the primary key
/// (BENCHMARKS.md, "The relay's plans").
const SESSION_SETTINGS: &[(&str, &str)] = &[("plan_cache_mode", "force_custom_plan")];

/// Opens the relay's own sessions (its lease and its statements), with [`SESSION_SETTINGS`].
pub fn connector(config: &DatabaseConfig) -> anyhow::Result<Connector> {
    Connector::with_settings(config, "highload-api-outbox", SESSION_SETTINGS)
}

impl Relay {
    /// Runs until `stop` turns true (or its sender is gone); finishes the batches in flight (bounded
    /// by `SHUTDOWN_TIMEOUT`), hands the lease over, and drops what the producer still holds.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let timings = Timings::new(self.config.outbox.takeover_timeout);
        let mut session: Option<AsyncPgConnection> = None;
        // The epoch this replica held last: after a lost session it may take the lease back at once.
        let mut last_epoch: Option<i64> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        while !stopped(&stop) {
            let conn = match session.as_mut() {
                Some(conn) => conn,
                // The connector bounds the connect and logs a failure itself.
                None => match self.connector.connect().await {
                    Ok(conn) => session.insert(conn),
                    Err(_) => {
                        wait(&mut stop, backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            let outcome = match bounded(timings, Lease::acquire(conn, timings, last_epoch)).await {
                Ok(Some(lease)) => {
                    last_epoch = Some(lease.epoch());
                    tracing::info!(epoch = lease.epoch(), "this replica now publishes the outbox");
                    self.metrics.outbox_publishing.set(1);
                    let ended = self.publish(conn, lease, timings, &mut stop).await;
                    self.metrics.outbox_publishing.set(0);
                    ended.map(Some)
                }
                Ok(None) => Ok(None),
                Err(err) => Err(err),
            };
            match outcome {
                Ok(None) => wait(&mut stop, timings.renew_every).await,
                Ok(Some(Ended::Stopped)) => {}
                Ok(Some(ended @ (Ended::Lost | Ended::Stalled))) => {
                    // Whatever this replica still had queued was sent under a lease it no longer
                    // holds; the new publisher sends those rows again.
                    self.replace_producer();
                    last_epoch = None;
                    backoff.reset();
                    if matches!(ended, Ended::Stalled) {
                        tracing::warn!(
                            "Kafka acknowledged nothing for too long; leaving the outbox to another replica"
                        );
                        // Standbys try every `renew_every`: give them the first chance.
                        wait(&mut stop, timings.duration).await;
                    } else {
                        tracing::warn!("another replica took over publishing the outbox");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "outbox relay lost its database session; reconnecting");
                    // Its rows are read again by whoever publishes next, this replica included.
                    self.replace_producer();
                    session = None;
                    wait(&mut stop, backoff.next_delay()).await;
                }
            }
        }
        // Batches still unacknowledged after the drain stay in the outbox for whoever publishes next:
        // delivering them now, after the lease was handed over, would only duplicate that replica's.
        self.producer.purge(PurgeConfig::default().queue().inflight());
        tracing::info!("outbox relay stopped");
    }

    /// Publishes while this replica holds `lease`: sends batches, deletes what Kafka acknowledged,
    /// renews the lease while it makes progress. Returns when the lease is lost or given up; an error
    /// means the session is unusable (or a statement outlived its deadline).
    async fn publish(
        &mut self,
        conn: &mut AsyncPgConnection,
        mut lease: Lease,
        timings: Timings,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let mut in_flight: VecDeque<Batch> = VecDeque::new();
        let mut kafka_backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        let mut resume_sending = Instant::now();
        let mut drain_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let stopping = stopped(stop);
            if stopping {
                // Acknowledged rows are deleted; the others stay in the outbox for whoever publishes next.
                let until = *drain_until.get_or_insert(now + self.config.server.shutdown_timeout);
                if in_flight.is_empty() || now >= until {
                    bounded(timings, lease.release(conn)).await?;
                    return Ok(Ended::Stopped);
                }
            }
            let stalled = in_flight.front().is_some_and(|batch| now - batch.sent_at > timings.duration / 2);
            if stalled && now >= lease.valid_until() {
                return Ok(Ended::Stalled);
            }
            if !stalled && now >= lease.renewal_due() && !bounded(timings, lease.renew(conn)).await? {
                return Ok(Ended::Lost);
            }
            if !stopping
                && now >= resume_sending
                && !bounded(timings, self.send_more(conn, &lease, &mut in_flight)).await?
            {
                resume_sending = Instant::now() + kafka_backoff.next_delay();
            }

            let now = Instant::now();
            let mut wake = if stalled { lease.valid_until() } else { lease.renewal_due() };
            if in_flight.is_empty() {
                wake = wake.min(now + self.config.outbox.poll_interval);
            }
            if resume_sending > now {
                wake = wake.min(resume_sending);
            }
            if let Some(until) = drain_until {
                wake = wake.min(until);
            }
            // Rows committed while batches await their acknowledgements go out at once (while there
            // is room for another batch) instead of queueing behind the oldest one's acknowledgement.
            let can_send = !stopping && in_flight.len() < MAX_BATCHES_IN_FLIGHT && now >= resume_sending;
            let oldest_acknowledged = async {
                match in_flight.front_mut() {
                    Some(oldest) => (&mut oldest.deliveries).await,
                    None => std::future::pending().await,
                }
            };
            let results = tokio::select! {
                results = oldest_acknowledged => results,
                () = self.signal.0.notified(), if can_send => continue,
                _ = stop.changed(), if !stopping => continue,
                () = tokio::time::sleep_until(wake) => continue,
            };
            let batch = in_flight.pop_front().expect("the oldest batch is in flight");
            match bounded(timings, self.record(conn, &batch.ids, &results)).await? {
                Ok(()) => kafka_backoff.reset(),
                Err(failed) => {
                    tracing::warn!(
                        messages.failed = failed,
                        "Kafka did not acknowledge every outbox message; will retry"
                    );
                    // Everything still in flight is sent again from the outbox (the worker
                    // deduplicates).
                    in_flight.clear();
                    self.replace_producer();
                    resume_sending = Instant::now() + kafka_backoff.next_delay();
                }
            }
        }
    }

    /// A producer that gave messages up (KAFKA_MESSAGE_TIMEOUT_MS) or hit a fatal error may stay
    /// unusable, and one holding messages sent under a lost lease would still deliver them; a fresh
    /// one is always accepted.
    fn replace_producer(&mut self) {
        // Dropped messages fail their delivery futures, which nobody awaits any more.
        self.producer.purge(PurgeConfig::default().queue().inflight());
        match common::kafka::producer(&self.config.kafka) {
            Ok(producer) => {
                drop(self.current_producer.send_replace(producer.clone()));
                self.producer = producer;
            }
            Err(err) => tracing::error!(error = %err, "could not recreate the Kafka producer"),
        }
    }

    /// Sends the oldest rows not already in flight, a batch at a time, until
    /// [`MAX_BATCHES_IN_FLIGHT`] batches await their acknowledgements or nothing is left. Rows are read
    /// only while `lease`'s epoch is current, and handed to the producer only while it is valid here.
    /// `false` when the producer took none of the rows it was offered.
    async fn send_more(
        &self,
        conn: &mut AsyncPgConnection,
        lease: &Lease,
        in_flight: &mut VecDeque<Batch>,
    ) -> QueryResult<bool> {
        while in_flight.len() < MAX_BATCHES_IN_FLIGHT {
            let sent: Vec<i64> = in_flight.iter().flat_map(|batch| batch.ids.iter().copied()).collect();
            let still_ours = outbox_publisher::table.filter(outbox_publisher::epoch.eq(lease.epoch()));
            // Not "id > the last sent": a transaction that took a lower id may commit later.
            let rows: Vec<OutboxRow> = outbox::table
                .select(OutboxRow::as_select())
                .filter(outbox::id.ne_all(&sent))
                .filter(diesel::dsl::exists(still_ours))
                .order(outbox::id)
                .limit(i64::from(self.config.outbox.batch_size.get()))
                .load(conn)
                .await?;
            if rows.is_empty() || Instant::now() >= lease.valid_until() {
                break;
            }
            let batch = self.send(&rows);
            let full = batch.ids.len() == rows.len();
            if batch.ids.is_empty() {
                // Not one row fit (the producer's queue is full, or the producer is broken): with
                // nothing in flight to wait for, the caller pauses rather than spins.
                return Ok(false);
            }
            in_flight.push_back(batch);
            if !full {
                break; // the producer's queue is full: wait for acknowledgements first
            }
        }
        Ok(true)
    }

    /// Hands rows to the producer; stops early if its local queue is full.
    fn send(&self, rows: &[OutboxRow]) -> Batch {
        let topic = &self.config.kafka.topic;
        let mut ids = Vec::with_capacity(rows.len());
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let (id, message) = (row.id, &row.message);
            let key = message.user_id.to_string();
            let mut message_headers = OwnedHeaders::new()
                .insert(Header { key: headers::CONTENT_TYPE, value: Some("application/json") })
                .insert(Header { key: headers::EVENT_TYPE, value: Some(message.event_type.as_str()) });
            let optional = [
                (headers::REQUEST_ID, &message.request_id),
                (headers::TRACEPARENT, &message.traceparent),
                (headers::TRACESTATE, &message.tracestate),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    message_headers = message_headers.insert(Header { key: name, value: Some(value.as_str()) });
                }
            }
            let record = FutureRecord::to(topic).key(&key).payload(&message.payload).headers(message_headers);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    ids.push(id);
                    deliveries.push(delivery);
                }
                Err((err, _)) => {
                    tracing::debug!(error = %err, "producer queue full");
                    break;
                }
            }
        }
        Batch { ids, deliveries: join_all(deliveries), sent_at: Instant::now() }
    }

    /// Deletes the rows of a batch that Kafka acknowledged and counts the outcome: `Err(n)` when `n`
    /// messages were not acknowledged.
    async fn record(
        &self,
        conn: &mut AsyncPgConnection,
        ids: &[i64],
        results: &[<DeliveryFuture as Future>::Output],
    ) -> QueryResult<Result<(), usize>> {
        let queued = ids.len();
        let delivered: Vec<i64> =
            ids.iter().zip(results).filter(|(_, result)| matches!(result, Ok(Ok(_)))).map(|(id, _)| *id).collect();
        if !delivered.is_empty() {
            diesel::delete(outbox::table.filter(outbox::id.eq_any(&delivered))).execute(conn).await?;
        }
        if let Some(Ok(Err((err, _)))) = results.iter().find(|result| matches!(result, Ok(Err(_)))) {
            tracing::warn!(error = %err, fatal = ?self.producer.client().fatal_error(), "first delivery failure");
        }
        self.metrics.outbox_published.inc_by(delivered.len() as u64);
        self.metrics.outbox_failed.inc_by((queued - delivered.len()) as u64);
        tracing::debug!(messages.delivered = delivered.len(), "outbox batch published");
        Ok(match queued - delivered.len() {
            0 => Ok(()),
            failed => Err(failed),
        })
    }
}

/// Rows handed to the producer, and their acknowledgements.
struct Batch {
    ids: Vec<i64>,
    deliveries: JoinAll<DeliveryFuture>,
    sent_at: Instant,
}

/// Stop was asked for, or can no longer be (its sender is gone: the api is going away).
fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Every statement of the relay's session has a deadline of its own: a PostgreSQL that hangs or a
/// route that drops packets silently must not hold the publisher (or a standby) for as long as TCP
/// takes to give up. A lease outlives no statement that takes longer than the lease itself.
async fn bounded<T, E>(timings: Timings, statement: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(timings.duration, statement)
        .await
        .with_context(|| format!("no answer from PostgreSQL within {:?}", timings.duration))?
        .map_err(anyhow::Error::from)
}

/// Sleeps `period`, or less if stopped (at once if already stopped).
async fn wait(stop: &mut watch::Receiver<bool>, period: Duration) {
    tokio::select! {
        () = tokio::time::sleep(period) => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}
