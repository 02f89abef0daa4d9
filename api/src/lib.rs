//! The `api` binary's library: everything but argument handling, so tests drive the real app.
//!
//! - [`App`]: builds state from [`Config`], binds the listener, serves until told to stop.
//! - [`server`]: accept loop and graceful drain; [`service`]: one request end to end;
//!   [`routes`]: the route table.
//! - [`metrics`]: Prometheus metrics; [`users`]: the users resource; [`events`]: events and per-user stats; [`health`]: probes.
//! - [`outbox`]: the transactional outbox and the relay that publishes it to Kafka.
//! - [`idempotency`]: `Idempotency-Key` on writes: answers stored with the write, replayed, expired.
//! - [`db`]: pool, migrations, database error mapping; [`cache`]: the Redis user cache;
//!   [`redis_client`]: the one Redis connection the cache and the rate limiter share;
//!   [`pages`]: what the list endpoints share (totals, cursors).
//! - [`http`]: body/query parsing, responses and the one error type.
//! - [`auth`]: bearer tokens, the issuer's keys, scopes; [`ratelimit`]: per-client limits.

pub mod auth;
pub mod cache;
pub mod db;
pub mod events;
pub mod health;
pub mod http;
pub mod idempotency;
pub mod metrics;
pub mod outbox;
pub mod pages;
pub mod ratelimit;
pub mod redis_client;
pub mod routes;
pub mod samples;
pub mod server;
pub mod service;
pub mod state;
pub mod users;

use std::net::SocketAddr;

use anyhow::Context;
use common::config::{AuthConfig, Config};
use tokio::net::TcpListener;

use common::kafka::KafkaProducer;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::cache::UserCache;
use crate::outbox::relay::Relay;
use crate::ratelimit::RateLimiter;
use crate::redis_client::RedisClient;
use crate::routes::Routes;
use crate::state::{AppState, Clients};

/// The OpenAPI 3.1 document of the whole API (`docs/openapi.json`), served at `GET /openapi.json`.
pub const OPENAPI_DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// A built, bound, not yet serving api.
pub struct App {
    listener: TcpListener,
    state: AppState,
    /// The outbox relay's producer (the background Kafka check uses it too).
    producer: KafkaProducer,
}

impl App {
    /// Applies migrations (unless `RUN_MIGRATIONS=false`), builds the pools, starts loading the
    /// issuer's keys and binds the listener.
    pub async fn build(config: Config, auth: &AuthConfig) -> anyhow::Result<Self> {
        if config.run_migrations {
            db::migrate(&config.database).await?;
        }
        let routes = Routes::new().context("invalid route table")?;
        let metrics = std::sync::Arc::new(metrics::ApiMetrics::new());
        let auth = Authenticator::start(auth, &metrics)?;
        let redis = RedisClient::new(&config.redis).context("invalid Redis configuration")?;
        let cache = UserCache::new(redis.clone(), &config.redis, metrics.cache.clone());
        let rate_limiter = RateLimiter::new(&config.rate_limit, redis, &config.redis.key_prefix, &metrics);
        let db = db::pool(&config.database).context("invalid PostgreSQL configuration")?;
        let events_db = db::events_pool(&config.database).context("invalid PostgreSQL configuration")?;
        let producer: KafkaProducer =
            common::kafka::producer(&config.kafka).context("invalid Kafka producer configuration")?;
        // Topics are created by whichever binary starts first; Kafka being down must not stop the api.
        let kafka = config.kafka.clone();
        tokio::spawn(async move {
            if let Err(err) = common::kafka::ensure_topics(&kafka).await {
                let error = format!("{err:#}");
                tracing::warn!(
                    dependency = "kafka",
                    error,
                    "could not ensure Kafka topics; the worker creates them too"
                );
            }
        });
        let listener = TcpListener::bind(config.server.addr)
            .await
            .with_context(|| format!("failed to listen on {}", config.server.addr))?;
        let state = AppState::new(db, events_db, cache, routes, config, metrics, Clients { auth, rate_limiter });
        Ok(Self { listener, state, producer })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener.local_addr().context("listener has no local address")
    }

    /// Serves until `shutdown` resolves, then drains (SPEC §6 "Graceful shutdown").
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(address = %self.local_addr()?, "api listening");
        let (stop_relay, relay_stopped) = watch::channel(false);
        let (current_producer, producer) = watch::channel(self.producer.clone());
        let samples = tokio::spawn(samples::run(self.state.clone(), producer, relay_stopped.clone()));
        let relay = Relay {
            producer: self.producer,
            current_producer,
            connector: outbox::relay::connector(&self.state.config.database)?,
            config: self.state.config.clone(),
            signal: self.state.outbox_signal.clone(),
            metrics: self.state.metrics.clone(),
        };
        let expiry = tokio::spawn(idempotency::expiry::run(
            self.state.db.clone(),
            self.state.config.idempotency_ttl,
            self.state.metrics.idempotency_keys_expired.clone(),
            relay_stopped.clone(),
        ));
        let relay = tokio::spawn(relay.run(relay_stopped));
        server::serve(self.listener, self.state, shutdown).await;
        // Requests are drained: whatever they wrote to the outbox gets one last chance to be published.
        let _ = stop_relay.send(true);
        relay.await.context("outbox relay panicked")?;
        samples.await.context("dependency sampler panicked")?;
        expiry.await.context("idempotency expiry job panicked")?;
        tracing::info!("api stopped");
        Ok(())
    }
}
