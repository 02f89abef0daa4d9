//! The consumer loop: fetch, hand each message to its lane, store offsets as work finishes, pause
//! fetching while too much is in flight (`WORKER_MAX_IN_FLIGHT` messages or
//! `WORKER_MAX_IN_FLIGHT_BYTES` bytes), and drain + commit at shutdown.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use common::config::Config;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::{ClientContext, Message, Offset};
use tokio::sync::{mpsc, watch};

use crate::lanes::{Done, Job, LaneContext, run_lane};
use crate::metrics::WorkerMetrics;
use crate::offsets::OffsetTracker;

/// Partition assignment changes, reported by librdkafka on its polling thread.
#[derive(Debug)]
pub enum RebalanceEvent {
    /// These partitions are now ours.
    Assigned(Vec<i32>),
    /// These partitions are no longer ours.
    Revoked(Vec<i32>),
}

/// Forwards rebalances to the consumer loop and flags readiness.
pub struct WorkerContext {
    rebalances: mpsc::UnboundedSender<RebalanceEvent>,
    assigned: watch::Sender<bool>,
}

impl WorkerContext {
    /// A context and the receiving end of its rebalance events.
    pub fn new(assigned: watch::Sender<bool>) -> (Self, mpsc::UnboundedReceiver<RebalanceEvent>) {
        let (rebalances, receiver) = mpsc::unbounded_channel();
        (Self { rebalances, assigned }, receiver)
    }
}

impl ClientContext for WorkerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        common::kafka::log_client_line(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        common::kafka::log_client_error(&error, reason);
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            tracing::info!(partitions = ?partition_ids(partitions), "partitions revoked");
            let _ = self.rebalances.send(RebalanceEvent::Revoked(partition_ids(partitions)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            tracing::info!(partitions = ?partition_ids(partitions), "partitions assigned");
            let _ = self.rebalances.send(RebalanceEvent::Assigned(partition_ids(partitions)));
        }
        let _ = self.assigned.send(consumer.assignment().is_ok_and(|assignment| assignment.count() > 0));
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(err) = result {
            tracing::warn!(error = %err, "offset commit failed");
        }
    }
}

fn partition_ids(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|element| element.partition()).collect()
}

/// The consumer loop's parts.
pub struct Pipeline {
    /// Subscribed consumer (shared with the lag sampler).
    pub consumer: Arc<StreamConsumer<WorkerContext>>,
    /// Rebalance notifications from the consumer's context.
    pub rebalances: mpsc::UnboundedReceiver<RebalanceEvent>,
    /// Lane inputs.
    pub lanes: LaneContext,
    /// Configuration.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<WorkerMetrics>,
}

impl Pipeline {
    /// Consumes until `stop` turns true, then drains in-flight work (bounded by `SHUTDOWN_TIMEOUT`),
    /// commits synchronously and leaves the group.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let topic = self.config.kafka.topic.clone();
        let lane_count = self.config.worker.concurrency.get() as usize;
        let limit = Load {
            messages: self.config.worker.max_in_flight.get() as usize,
            bytes: self.config.worker.max_in_flight_bytes.get(),
        };
        let (done_sender, mut done) = mpsc::unbounded_channel::<Done>();
        let mut lanes = Vec::with_capacity(lane_count);
        let mut lane_tasks = Vec::with_capacity(lane_count);
        for _ in 0..lane_count {
            let (sender, receiver) = mpsc::unbounded_channel();
            lanes.push(sender);
            lane_tasks.push(tokio::spawn(run_lane(self.lanes.clone(), receiver, done_sender.clone())));
        }
        drop(done_sender);

        let mut tracker = OffsetTracker::default();
        // Bytes of the jobs the lanes hold. Unlike the tracker's count it is not reset when partitions
        // are revoked: the lanes still hold (and finish) a revoked partition's messages, so it falls
        // only when one is done.
        let mut held_bytes = 0_usize;
        let mut paused = false;
        let mut lag_interval = tokio::time::interval(LAG_SAMPLE_PERIOD);
        loop {
            self.metrics.in_flight.set(tracker.in_flight() as i64);
            self.metrics.in_flight_bytes.set(i64::try_from(held_bytes).unwrap_or(i64::MAX));
            let load = |tracker: &OffsetTracker, bytes| Load { messages: tracker.in_flight(), bytes };
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = lag_interval.tick() => self.sample_lag(),
                Some(event) = self.rebalances.recv() => {
                    let (RebalanceEvent::Assigned(partitions) | RebalanceEvent::Revoked(partitions)) = event;
                    for partition in partitions {
                        tracker.reset(partition);
                    }
                    // librdkafka keeps a partition's pause flag through revocation and reassignment, and
                    // does not pause newly assigned ones: restate it for the whole assignment, or a
                    // partition paused before it moved away and back is never fetched again.
                    self.apply_backpressure(&mut paused, load(&tracker, held_bytes), limit, true);
                }
                Some(finished) = done.recv() => {
                    held_bytes = held_bytes.saturating_sub(finished.bytes);
                    self.finish(&mut tracker, &topic, finished);
                    self.apply_backpressure(&mut paused, load(&tracker, held_bytes), limit, false);
                }
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        self.metrics.consumed.inc();
                        let message = message.detach();
                        let partition = message.partition();
                        tracker.started(partition, message.offset());
                        let generation = tracker.generation(partition);
                        let lane = lane_of(message.key(), partition, lane_count);
                        let job = Job { message, generation, received: chrono::Utc::now() };
                        held_bytes += job.bytes();
                        // The lane channel is unbounded, but fetching pauses below at the limits.
                        let _ = lanes[lane].send(job);
                        self.apply_backpressure(&mut paused, load(&tracker, held_bytes), limit, false);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "Kafka consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }

        tracing::info!(in_flight = tracker.in_flight(), "worker stopping: draining in-flight events");
        drop(lanes);
        let deadline = tokio::time::Instant::now() + self.config.server.shutdown_timeout;
        while tracker.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, done.recv()).await {
                Ok(Some(finished)) => self.finish(&mut tracker, &topic, finished),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        in_flight = tracker.in_flight(),
                        "shutdown deadline passed; unfinished events will be redelivered"
                    );
                    break;
                }
            }
        }
        for task in lane_tasks {
            task.abort();
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("offsets committed"),
            // Nothing stored since the last commit is reported as an error by librdkafka.
            Err(err) => tracing::info!(error = %err, "final offset commit"),
        }
        self.consumer.unsubscribe();
        tracing::info!("worker left the consumer group");
    }

    /// Updates `kafka_consumer_lag` off the runtime (librdkafka's offset queries block).
    fn sample_lag(&self) {
        let consumer = Arc::clone(&self.consumer);
        let metrics = Arc::clone(&self.metrics);
        let topic = self.config.kafka.topic.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(assignment) = consumer.assignment() else { return };
            let Ok(committed) = consumer.committed_offsets(assignment, LAG_QUERY_TIMEOUT) else { return };
            metrics.lag.reset();
            for element in committed.elements_for_topic(&topic) {
                let Ok((_, high)) = consumer.fetch_watermarks(&topic, element.partition(), LAG_QUERY_TIMEOUT) else {
                    continue;
                };
                // No commit yet: everything up to the end offset is lag.
                let committed = element.offset().to_raw().filter(|offset| *offset >= 0).unwrap_or(0);
                metrics.lag.with_label_values(&[&element.partition().to_string()]).set((high - committed).max(0));
            }
        });
    }

    fn finish(&self, tracker: &mut OffsetTracker, topic: &str, finished: Done) {
        if let Some(next) = tracker.finished(finished.partition, finished.generation, finished.offset) {
            let mut offsets = TopicPartitionList::new();
            if offsets.add_partition_offset(topic, finished.partition, Offset::Offset(next)).is_ok()
                && let Err(err) = self.consumer.store_offsets(&offsets)
            {
                // The partition was revoked meanwhile; its new owner redelivers (effects are idempotent).
                tracing::debug!(error = %err, partition = finished.partition, "could not store offset");
            }
        }
    }

    /// Pauses fetching once `load` reaches either limit and resumes it when both are back at half
    /// (so it does not flap at the boundary); with `restate`, tells librdkafka the state even if it
    /// is unchanged.
    fn apply_backpressure(&self, paused: &mut bool, load: Load, limit: Load, restate: bool) {
        let pause = load.keeps_paused(*paused, limit);
        if (restate || pause != *paused) && self.set_paused(pause, load) {
            *paused = pause;
        }
    }

    /// Pauses or resumes fetching on every assigned partition; returns whether it took effect.
    fn set_paused(&self, pause: bool, load: Load) -> bool {
        let Ok(assignment) = self.consumer.assignment() else { return false };
        let result = if pause { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        match result {
            Ok(()) => {
                tracing::debug!(pause, in_flight = load.messages, in_flight_bytes = load.bytes, "backpressure");
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, pause, "could not change fetching");
                false
            }
        }
    }
}

/// What the lanes hold, or may hold before fetching pauses.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Messages in flight (`WORKER_MAX_IN_FLIGHT`).
    messages: usize,
    /// Their bytes ([`Job::bytes`], `WORKER_MAX_IN_FLIGHT_BYTES`).
    bytes: usize,
}

impl Load {
    /// Whether fetching should be paused at this load: from the moment either limit is reached
    /// until both are back at half of it.
    fn keeps_paused(self, paused: bool, limit: Self) -> bool {
        if paused {
            self.messages > limit.messages / 2 || self.bytes > limit.bytes / 2
        } else {
            self.messages >= limit.messages || self.bytes >= limit.bytes
        }
    }
}

/// How often consumer lag is sampled.
const LAG_SAMPLE_PERIOD: Duration = Duration::from_secs(10);
/// Deadline of each offset query behind the lag metric.
const LAG_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The lane of a message: by key (the user id), so one user's events stay in order.
fn lane_of(key: Option<&[u8]>, partition: i32, lanes: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    match key {
        Some(key) => key.hash(&mut hasher),
        None => partition.hash(&mut hasher),
    }
    (hasher.finish() % lanes as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetching_pauses_at_either_limit_and_resumes_when_both_are_at_half() {
        let limit = Load { messages: 100, bytes: 1000 };
        let at = |messages, bytes| Load { messages, bytes };
        assert!(!at(99, 999).keeps_paused(false, limit));
        assert!(at(100, 0).keeps_paused(false, limit), "the message limit alone");
        assert!(at(1, 1000).keeps_paused(false, limit), "the byte limit alone");
        assert!(at(50, 501).keeps_paused(true, limit), "bytes still above half");
        assert!(at(51, 500).keeps_paused(true, limit), "messages still above half");
        assert!(!at(50, 500).keeps_paused(true, limit));
    }

    #[test]
    fn a_key_always_maps_to_the_same_lane() {
        let lane = lane_of(Some(b"user-1"), 0, 16);
        for partition in 0..5 {
            assert_eq!(lane_of(Some(b"user-1"), partition, 16), lane);
        }
        assert!((0..100).map(|n| lane_of(Some(format!("u{n}").as_bytes()), 0, 16)).any(|l| l != lane));
    }
}
