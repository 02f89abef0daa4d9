//! The `api` binary's library: everything but argument handling, so tests drive the real app.
//!
//! - [`App`]: builds state from [`Config`], binds the listener, serves until told to stop.
//! - [`server`]: accept loop and graceful drain; [`service`]: one request end to end;
//!   [`routes`]: the route table.
//! - [`users`]: the users resource; [`health`]: probes.
//! - [`db`]: pool, migrations, database error mapping; [`cache`]: the Redis user cache.
//! - [`http`]: body/query parsing, responses and the one error type.

pub mod cache;
pub mod db;
pub mod health;
pub mod http;
pub mod routes;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod users;

use std::net::SocketAddr;

use anyhow::Context;
use common::config::Config;
use tokio::net::TcpListener;

use crate::cache::UserCache;
use crate::routes::Routes;
use crate::state::AppState;

/// A built, bound, not yet serving api.
pub struct App {
    listener: TcpListener,
    state: AppState,
}

impl App {
    /// Applies migrations (unless `RUN_MIGRATIONS=false`), builds the pools and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        if config.run_migrations {
            db::migrate(&config.database).await?;
        }
        let routes = Routes::new().context("invalid route table")?;
        let cache = UserCache::new(&config.redis).context("invalid Redis configuration")?;
        let db = db::pool(&config.database);
        let listener = TcpListener::bind(config.server.addr)
            .await
            .with_context(|| format!("failed to listen on {}", config.server.addr))?;
        Ok(Self { listener, state: AppState::new(db, cache, routes, config) })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener.local_addr().context("listener has no local address")
    }

    /// Serves until `shutdown` resolves, then drains (SPEC §6 "Graceful shutdown").
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(address = %self.local_addr()?, "api listening");
        server::serve(self.listener, self.state, shutdown).await;
        tracing::info!("api stopped");
        Ok(())
    }
}
