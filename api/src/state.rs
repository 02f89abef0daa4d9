//! The state every handler gets: pools, cache, routes and configuration, behind one `Arc`.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Semaphore;

use common::config::Config;

use crate::auth::Authenticator;
use crate::cache::UserCache;
use crate::db::DbPool;
use crate::events::writer::EventWriter;
use crate::metrics::ApiMetrics;
use crate::outbox::relay::OutboxSignal;
use crate::ratelimit::RateLimiter;
use crate::routes::Routes;

/// What the api knows of its callers.
pub struct Clients {
    /// Token checks (or none, with `AUTH_MODE=none`).
    pub auth: Authenticator,
    /// The per-client limit; `None` when `RATE_LIMIT_RPS=0`.
    pub rate_limiter: Option<RateLimiter>,
}

/// Cheap to clone; passed explicitly to every handler.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What [`AppState`] holds.
pub struct Inner {
    /// PostgreSQL pool.
    pub db: DbPool,
    /// Writes POSTed events, concurrent ones in one statement.
    pub event_writer: EventWriter,
    /// Redis user cache.
    pub cache: UserCache,
    /// Compiled route table.
    pub routes: Routes,
    /// Configuration read at start.
    pub config: Config,
    /// The dependencies as last checked in the background.
    pub samples: crate::samples::Samples,
    /// Wakes the outbox relay after a commit.
    pub outbox_signal: OutboxSignal,
    /// Prometheus metrics.
    pub metrics: Arc<ApiMetrics>,
    /// Who may call which route, and how often.
    pub clients: Clients,
    /// One permit per request that may be in flight (`MAX_INFLIGHT_REQUESTS`).
    pub in_flight: Semaphore,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Bundles the parts and starts the event writer's task on `events_db` (see [`crate::db::events_pool`]);
    /// call inside the runtime.
    pub fn new(
        db: DbPool,
        events_db: DbPool,
        cache: UserCache,
        routes: Routes,
        config: Config,
        metrics: Arc<ApiMetrics>,
        clients: Clients,
    ) -> Self {
        let in_flight = Semaphore::new(config.server.max_inflight_requests);
        let event_writer = EventWriter::start(events_db, metrics.event_batch_size.clone());
        Self(Arc::new(Inner {
            event_writer,
            metrics,
            clients,
            in_flight,
            db,
            cache,
            routes,
            config,
            samples: crate::samples::Samples::default(),
            outbox_signal: OutboxSignal::default(),
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// From now on readiness reports 503.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has started.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
