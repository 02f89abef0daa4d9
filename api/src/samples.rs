//! Dependency checks run in the background, once a second, so that `/health/ready`, `/health` and
//! `/metrics` read the last result (with its age) instead of doing I/O on every call: every kubelet
//! probe used to cost a query, every scrape a `count(*)` over the outbox, and every `/health` a Kafka
//! metadata round trip through a producer that existed only for it.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use common::db::prepared::Prepared;
use common::kafka::KafkaProducer;
use diesel_async::RunQueryDsl;
use rdkafka::producer::Producer;
use tokio::sync::watch;

use crate::state::AppState;

/// How often every dependency is checked.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A check never takes longer than this, so a hung dependency cannot delay the others' samples.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Past this age a sample says nothing any more (the sampler itself is stuck): readiness fails.
pub const STALE_AFTER: Duration = Duration::from_secs(3);

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `Err` holds what went wrong, for the report.
    pub result: Result<(), String>,
    /// When the check finished.
    pub taken: Instant,
    /// How long it took.
    pub latency: Duration,
}

impl Sample {
    /// How old it is.
    pub fn age(&self) -> Duration {
        self.taken.elapsed()
    }
}

/// The latest sample of each dependency; `None` until its first check finished.
#[derive(Default)]
pub struct Samples {
    postgres: RwLock<Option<Sample>>,
    redis: RwLock<Option<Sample>>,
    kafka: RwLock<Option<Sample>>,
}

impl Samples {
    /// PostgreSQL: the outbox's size and oldest row's age came back (the backlog gauges).
    pub fn postgres(&self) -> Option<Sample> {
        read(&self.postgres)
    }

    /// Redis: the cache's (or the rate limiter's) connection answered `PING`.
    pub fn redis(&self) -> Option<Sample> {
        read(&self.redis)
    }

    /// Kafka: the outbox relay's producer got the events topic's metadata from a broker.
    pub fn kafka(&self) -> Option<Sample> {
        read(&self.kafka)
    }
}

fn read(slot: &RwLock<Option<Sample>>) -> Option<Sample> {
    slot.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

fn write(slot: &RwLock<Option<Sample>>, sample: Sample) {
    *slot.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sample);
}

/// Checks every dependency each [`INTERVAL`] until `stop` turns true. `producer` is the relay's
/// current producer (it replaces it after failures), so Kafka is checked through the very client
/// that publishes.
pub async fn run(state: AppState, producer: watch::Receiver<KafkaProducer>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let current_producer = producer.borrow().clone();
        let (postgres, redis, kafka) =
            tokio::join!(timed(postgres(&state)), timed(redis(&state)), timed(kafka(&state, current_producer)));
        let samples = &state.samples;
        write(&samples.postgres, postgres);
        write(&samples.redis, redis);
        write(&samples.kafka, kafka);
    }
}

async fn timed(check: impl Future<Output = Result<(), String>>) -> Sample {
    let started = Instant::now();
    let result = tokio::time::timeout(CHECK_TIMEOUT, check).await.unwrap_or_else(|_| Err("timed out".into()));
    Sample { result, taken: Instant::now(), latency: started.elapsed() }
}

#[derive(diesel::QueryableByName)]
struct Backlog {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rows: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    oldest_age_seconds: f64,
}

/// The outbox's size and its oldest row's age, by the database's clock (the rows' `created_at` is
/// the database's too).
const BACKLOG: &str = "SELECT count(*) AS rows, \
     coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest_age_seconds \
     FROM outbox";

async fn postgres(state: &AppState) -> Result<(), String> {
    let backlog = state
        .db
        .run(|conn| {
            Box::pin(
                async move { Ok::<_, anyhow::Error>(diesel::sql_query(BACKLOG).get_result::<Backlog>(conn).await?) },
            )
        })
        .await
        .map_err(|err| format!("{err:#}"))?;
    state.metrics.outbox_backlog.set(backlog.rows);
    // Whole seconds: an alert threshold is minutes.
    state.metrics.outbox_oldest_age.set(backlog.oldest_age_seconds.max(0.0) as i64);
    // The event writer's own sessions too: after an outage they reconnect on their own, and ready
    // must mean that a POSTed event can be written (not only that the pool answers).
    state
        .event_writer
        .pool()
        .run(|conn| {
            Box::pin(async move { Ok::<_, anyhow::Error>(Prepared::new("SELECT 1", vec![]).execute(conn).await?) })
        })
        .await
        .map_err(|err| format!("event writer: {err:#}"))?;
    Ok(())
}

async fn redis(state: &AppState) -> Result<(), String> {
    match state.clients.rate_limiter.as_ref() {
        Some(limiter) if !state.cache.is_enabled() => limiter.ping().await,
        _ => state.cache.ping().await,
    }
}

/// librdkafka's metadata call blocks, so it runs off the runtime.
async fn kafka(state: &AppState, producer: KafkaProducer) -> Result<(), String> {
    let topic = state.config.kafka.topic.clone();
    tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), CHECK_TIMEOUT.mul_f32(0.9))
            .map(drop)
            .map_err(|err| err.to_string())
    })
    .await
    .map_err(|err| err.to_string())?
}
