//! The `worker` binary's library: consumes the events topic and applies each event's effects in
//! PostgreSQL exactly once in effect (SPEC §3).
//!
//! - [`Worker`]: builds clients from [`Config`], runs until told to stop.
//! - [`pipeline`]: the consumer loop (offsets, backpressure, rebalances, drain);
//!   [`offsets`]: which offset may be committed.
//! - [`lanes`]: the bounded pool applying one user's events in order; retries and dead letters.
//! - [`effects`]: the idempotent database effects; [`http`]: health and metrics endpoints;
//!   [`metrics`]: what `/metrics` exports.

pub mod effects;
pub mod http;
pub mod lanes;
pub mod metrics;
pub mod offsets;
pub mod pipeline;

use std::net::SocketAddr;

use anyhow::Context;
use common::config::{Config, DatabaseConfig};
use common::kafka::KafkaProducer;
use common::pool::DbPool;
use common::postgres::Connector;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::lanes::LaneContext;
use crate::pipeline::{Pipeline, WorkerContext};

/// Name of the worker's sessions in `pg_stat_activity`.
const APPLICATION_NAME: &str = "highload-worker";

/// Opens the worker's sessions. Every statement it runs finds its rows by id (a batch's ids, a user's
/// counters), so one cached plan fits them all ([`common::pool::generic_plan_connector`]).
pub fn connector(config: &DatabaseConfig) -> anyhow::Result<Connector> {
    common::pool::generic_plan_connector(config, APPLICATION_NAME)
}

/// The worker's pool: `DB_POOL_MAX_SIZE` of [`connector`]'s sessions.
pub fn pool(config: &DatabaseConfig) -> anyhow::Result<DbPool> {
    Ok(common::pool::build_with(connector(config)?, config, config.pool_max_size))
}

/// A built worker: consumer subscribed, health listener bound.
pub struct Worker {
    pipeline: Pipeline,
    listener: TcpListener,
    assigned: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
}

impl Worker {
    /// Checks that PostgreSQL accepts its settings, creates the topics if missing, subscribes, binds
    /// `WORKER_HTTP_PORT`. A refused certificate or password stops it here: its readiness says
    /// nothing of PostgreSQL, so retrying would hide the refusal behind a worker that looks healthy.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        connector(&config.database).context("invalid PostgreSQL configuration")?.check().await?;
        common::kafka::ensure_topics(&config.kafka).await.context("failed to ensure Kafka topics")?;
        let (assigned_sender, assigned) = watch::channel(false);
        let (context, rebalances) = WorkerContext::new(assigned_sender);
        let consumer: StreamConsumer<WorkerContext> = common::kafka::consumer_config(&config.kafka)
            .create_with_context(context)
            .context("invalid Kafka consumer configuration")?;
        consumer.subscribe(&[&config.kafka.topic]).context("failed to subscribe")?;
        let producer: KafkaProducer =
            common::kafka::producer(&config.kafka).context("invalid Kafka producer configuration")?;
        let pool = pool(&config.database).context("invalid PostgreSQL configuration")?;
        let (stop, stop_receiver) = watch::channel(false);
        let metrics = std::sync::Arc::new(metrics::WorkerMetrics::new());
        let lanes = LaneContext {
            metrics: metrics.clone(),
            effects: effects::Effects::start(pool.clone(), metrics.statement_batches.clone()),
            pool,
            producer,
            dlq_topic: config.kafka.dlq_topic(),
            max_retries: config.worker.max_retries,
            retry_backoff: config.worker.retry_backoff,
            stop: stop_receiver,
        };
        let address = SocketAddr::new(config.server.addr.ip(), config.worker.http_port);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("failed to listen on {address} (WORKER_HTTP_PORT)"))?;
        let consumer = std::sync::Arc::new(consumer);
        Ok(Self { pipeline: Pipeline { consumer, rebalances, lanes, config, metrics }, listener, assigned, stop })
    }

    /// The health server's address.
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener.local_addr().context("listener has no local address")
    }

    /// Consumes until `shutdown` resolves, then drains, commits and leaves the group.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(address = %self.http_addr()?, topic = %self.pipeline.config.kafka.topic, "worker started");
        let stop_receiver = self.stop.subscribe();
        let health = http::Health {
            assigned: self.assigned,
            stopping: stop_receiver.clone(),
            metrics: self.pipeline.metrics.clone(),
        };
        let http = tokio::spawn(http::serve(self.listener, health, stop_receiver.clone()));
        let pipeline = tokio::spawn(self.pipeline.run(stop_receiver));
        shutdown.await;
        let _ = self.stop.send(true);
        pipeline.await.context("consumer loop panicked")?;
        http.abort();
        tracing::info!("worker stopped");
        Ok(())
    }
}
