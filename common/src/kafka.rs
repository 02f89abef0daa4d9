//! Kafka: the message on the events topic (SPEC §4), client settings shared by the api's producer and
//! the worker's consumer, and creation of missing topics.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;

use chrono::{DateTime, Utc};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::config::KafkaConfig;
use crate::wire::rfc3339_micros;

/// Message headers.
pub mod headers {
    /// Always `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The event's type.
    pub const EVENT_TYPE: &str = "event-type";
    /// The HTTP request that caused the event.
    pub const REQUEST_ID: &str = "request-id";
    /// On dead-lettered messages: why.
    pub const ERROR: &str = "error";
    /// The W3C trace context of the request that caused the event (SPEC §11), when traced.
    pub use crate::traces::headers::{TRACEPARENT, TRACESTATE};
}

/// Types of the events the api emits itself for user changes. Clients cannot use them.
pub mod lifecycle {
    /// A user was created.
    pub const USER_CREATED: &str = "user_created";
    /// A user was updated.
    pub const USER_UPDATED: &str = "user_updated";
    /// A user was deleted.
    pub const USER_DELETED: &str = "user_deleted";
    /// All of them.
    pub const ALL: [&str; 3] = [USER_CREATED, USER_UPDATED, USER_DELETED];
}

/// The value of every message on the events topic; same field names as the seed's messages.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventMessage {
    /// Event id: the idempotency key of its effects.
    pub id: Uuid,
    /// The user; also the message key.
    pub user_id: Uuid,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event's data, as sent by the client (or the user's fields for lifecycle events).
    pub data: Box<RawValue>,
    /// The event's `created_at`.
    #[serde(with = "rfc3339_micros")]
    pub timestamp: DateTime<Utc>,
}

impl EventMessage {
    /// Whether this is a `user_*` lifecycle event rather than a client event.
    pub fn is_lifecycle(&self) -> bool {
        lifecycle::ALL.contains(&self.event_type.as_str())
    }
}

/// Settings every client shares.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "highload-microservice")
        // Small requests answered one at a time: with Nagle on, each can wait out a delayed ACK.
        .set("socket.nagle.disable", "true")
        // With SSL, librdkafka verifies the broker's certificate and its host name (its defaults,
        // stated so that a change of default cannot turn them off).
        .set("security.protocol", config.security.protocol());
    if config.security.tls {
        client.set("enable.ssl.certificate.verification", "true").set("ssl.endpoint.identification.algorithm", "https");
    }
    match &config.security.ssl_ca_location {
        Some(ca) => {
            client.set("ssl.ca.location", ca.display().to_string());
        }
        // OpenSSL's compiled-in default is /usr/lib/ssl, which the distroless runtime image lacks; the
        // probe finds the bundle it has (/etc/ssl/certs/ca-certificates.crt).
        None if config.security.tls => {
            client.set("ssl.ca.location", "probe");
        }
        None => {}
    }
    if let Some(sasl) = &config.security.sasl {
        client
            .set("sasl.mechanism", sasl.mechanism)
            .set("sasl.username", &sasl.username)
            .set("sasl.password", sasl.password.expose());
    }
    client
}

/// A producer whose librdkafka log lines name the dependency (see [`ReportingContext`]).
pub type KafkaProducer = FutureProducer<ReportingContext>;

/// The producer of [`producer_config`] (nothing is dialled yet).
pub fn producer(config: &KafkaConfig) -> KafkaResult<KafkaProducer> {
    producer_config(config).create_with_context(ReportingContext::default())
}

/// The producer's settings: idempotent, `acks=all`, compressed, batched (SPEC §4).
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", config.linger.as_millis().to_string())
        .set("message.timeout.ms", config.message_timeout.as_millis().to_string());
    client
}

/// The worker's consumer: offsets stored by the application only after an event's effects committed,
/// committed in the background and once more at shutdown.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Eager assignors can wedge a group when a member leaves mid-rebalance; cooperative-sticky
        // also moves fewer partitions on real Kafka.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
        .set("heartbeat.interval.ms", config.heartbeat_interval.as_millis().to_string())
        // Kafka answers a waiting fetch as soon as data arrives; on tansu the wait shows in the
        // pick-up delay (bench/run, 300 events/s: p99 96-143 ms at 100 ms, 43-86 ms at 20 ms).
        // On Kafka a lower value only means more idle fetch requests.
        .set("fetch.wait.max.ms", config.fetch_wait_max.as_millis().to_string())
        // Bound what librdkafka holds of fetched messages (see CONSUMER_PREFETCH_MAX_BYTES).
        .set("queued.max.messages.kbytes", (CONSUMER_QUEUE_BYTES / 1024).to_string())
        .set("fetch.max.bytes", CONSUMER_FETCH_MAX_BYTES.to_string())
        .set("max.partition.fetch.bytes", CONSUMER_PARTITION_FETCH_MAX_BYTES.to_string());
    client
}

/// The consumer's prefetch queue (`queued.max.messages.kbytes`, in bytes here). librdkafka stops
/// fetching a partition while its one consumer queue holds this much (it applies to the whole
/// queue, not per partition, with the high-level consumer).
pub const CONSUMER_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// The consumer's `fetch.max.bytes`: what the broker may return for one fetch request. librdkafka
/// would otherwise take the smaller of 50 MB and the queue size (16 MiB).
pub const CONSUMER_FETCH_MAX_BYTES: usize = 8 * 1024 * 1024;

/// The consumer's `max.partition.fetch.bytes` (librdkafka's default, stated): what one partition
/// may contribute to a fetch response. Events are at most `EVENT_MAX_DATA_BYTES` (64 KiB) plus
/// their envelope, so a partition's response holds at least 15 of them.
pub const CONSUMER_PARTITION_FETCH_MAX_BYTES: usize = 1024 * 1024;

/// Most fetched messages librdkafka holds in the worker: a queue under [`CONSUMER_QUEUE_BYTES`] may
/// still have a fetch request out, whose response (at most [`CONSUMER_FETCH_MAX_BYTES`]) lands on
/// top of it. One fetch is out per broker at a time: k8s/kafka.yaml runs one broker; add one
/// [`CONSUMER_FETCH_MAX_BYTES`] per further broker. Pausing for backpressure discards what is
/// queued (librdkafka bumps the partition's version, and on resume fetches again from the
/// application's position), so while the worker is paused this drains to nothing. The worker's own
/// bound, `WORKER_MAX_IN_FLIGHT_BYTES`, comes on top (see `DEFAULT_WORKER_MAX_IN_FLIGHT_BYTES`).
pub const CONSUMER_PREFETCH_MAX_BYTES: usize = CONSUMER_QUEUE_BYTES + CONSUMER_FETCH_MAX_BYTES;

/// Creates the events topic and its dead-letter topic if they do not exist. Gives up after
/// [`ENSURE_TOPICS_TIMEOUT`], with the reason librdkafka last gave (a refused certificate or
/// failed authentication is only reported that way).
pub async fn ensure_topics(config: &KafkaConfig) -> anyhow::Result<()> {
    let probe = config.clone();
    tokio::task::spawn_blocking(move || reachable(&probe)).await??;
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let partitions = i32::try_from(config.topic_partitions.get()).unwrap_or(i32::MAX);
    let replication = i32::try_from(config.replication_factor.get()).unwrap_or(i32::MAX);
    let dlq = config.dlq_topic();
    let topics = [
        NewTopic::new(&config.topic, partitions, TopicReplication::Fixed(replication)),
        NewTopic::new(&dlq, partitions, TopicReplication::Fixed(replication)),
    ];
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(ENSURE_TOPICS_TIMEOUT));
    let results = admin.create_topics(&topics, &options).await?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(topic, error = %code, "failed to create topic");
                return Err(KafkaError::AdminOp(code)).with_context(|| format!("failed to create topic {topic}"));
            }
        }
    }
    Ok(())
}

/// Fails unless the brokers answer a metadata request within [`ENSURE_TOPICS_TIMEOUT`], with the
/// reason librdkafka logged (a refused certificate or failed authentication is only told that way).
fn reachable(config: &KafkaConfig) -> anyhow::Result<()> {
    // Errors always reach the context, whatever the `log` crate's level (unset in tests).
    let producer: BaseProducer<ReportingContext> =
        client_config(config).set_log_level(RDKafkaLogLevel::Error).create_with_context(ReportingContext::default())?;
    if let Err(err) = producer.client().fetch_metadata(None, ENSURE_TOPICS_TIMEOUT) {
        // Log events wait on the client's queue until polled.
        producer.poll(Duration::from_millis(100));
        let reason = producer.context().last_error().unwrap_or_else(|| "none given".into());
        anyhow::bail!("Kafka at {} did not answer: {err}; last error: {reason}", config.brokers);
    }
    Ok(())
}

/// Longest [`ensure_topics`] waits for the brokers.
pub const ENSURE_TOPICS_TIMEOUT: Duration = Duration::from_secs(15);

/// A client context that logs librdkafka's errors naming the dependency, and remembers the last one.
#[derive(Default)]
pub struct ReportingContext {
    last_error: Mutex<Option<String>>,
}

impl ReportingContext {
    /// The last error librdkafka reported, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }
}

impl ReportingContext {
    fn remember(&self, reason: &str) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(reason.to_owned());
        }
    }
}

impl ProducerContext for ReportingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

impl ClientContext for ReportingContext {
    // A refused certificate or failed SASL handshake reaches the log callback (called from
    // librdkafka's threads), not always the error callback (which needs a poll).
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_client_line(level, facility, message);
        if (level as u8) <= 3 {
            self.remember(message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
        self.remember(reason);
    }
}

/// Logs a librdkafka log line as the service's own, naming the dependency (every client context's
/// `log`, so that operators can filter Kafka's lines as they do PostgreSQL's and Redis's).
pub fn log_client_line(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level as u8 {
        0..=3 => tracing::error!(dependency = "kafka", facility, "{message}"),
        4 => tracing::warn!(dependency = "kafka", facility, "{message}"),
        5 | 6 => tracing::info!(dependency = "kafka", facility, "{message}"),
        _ => tracing::debug!(dependency = "kafka", facility, "{message}"),
    }
}

/// Logs a client error librdkafka reports (every client context's `error`).
pub fn log_client_error(error: &KafkaError, reason: &str) {
    tracing::error!(dependency = "kafka", error = %error, reason, "Kafka client error");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings(vars: &[(&str, &str)]) -> ClientConfig {
        let config = Config::from_lookup(|name| vars.iter().find(|(var, _)| *var == name).map(|(_, v)| v.to_string()));
        client_config(&config.unwrap().kafka)
    }

    #[test]
    fn the_consumer_prefetches_at_most_24_mib() {
        let consumer = consumer_config(&Config::from_lookup(|_| None).unwrap().kafka);
        let values = ["queued.max.messages.kbytes", "fetch.max.bytes", "max.partition.fetch.bytes"]
            .map(|key| consumer.get(key).unwrap_or_default().to_owned());
        assert_eq!(values, ["16384", "8388608", "1048576"]);
        assert_eq!(CONSUMER_PREFETCH_MAX_BYTES, 24 * 1024 * 1024);
    }

    #[test]
    fn tls_always_verifies_and_finds_the_systems_roots_without_a_ca() {
        let plain = settings(&[]);
        assert_eq!((plain.get("security.protocol"), plain.get("ssl.ca.location")), (Some("plaintext"), None));
        let ssl = settings(&[("KAFKA_SECURITY_PROTOCOL", "SSL")]);
        assert_eq!(ssl.get("ssl.ca.location"), Some("probe"));
        assert_eq!(ssl.get("ssl.endpoint.identification.algorithm"), Some("https"));
        assert_eq!(ssl.get("enable.ssl.certificate.verification"), Some("true"));
        let sasl = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "svc"),
            ("KAFKA_SASL_PASSWORD", "pw"),
            ("KAFKA_SSL_CA_LOCATION", "/ca.pem"),
        ]);
        let values = ["security.protocol", "sasl.mechanism", "sasl.username", "sasl.password", "ssl.ca.location"]
            .map(|key| sasl.get(key).unwrap_or_default().to_owned());
        assert_eq!(values, ["sasl_ssl", "SCRAM-SHA-512", "svc", "pw", "/ca.pem"]);
    }
}
