//! The PostgreSQL connection pool (diesel-async over bb8), configured the same way in both binaries.

use std::time::Duration;

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;

use crate::config::DatabaseConfig;

/// A pool of PostgreSQL connections.
pub type DbPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// A connection checked out of [`DbPool`].
pub type DbConn<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

/// Builds the pool without connecting, so a process starts (and reports not-ready) while PostgreSQL
/// is down. `application_name` shows in `pg_stat_activity`.
pub fn build(config: &DatabaseConfig, application_name: &str) -> DbPool {
    let manager = AsyncDieselConnectionManager::new(config.connection_string(application_name));
    bb8::Pool::builder()
        .max_size(config.pool_max_size.get())
        .min_idle(Some(config.pool_min_idle))
        .connection_timeout(config.pool_timeout)
        // A checkout test costs a round trip per request; broken connections are detected when
        // they are returned instead (diesel-async reports them via `has_broken`).
        .test_on_check_out(false)
        .idle_timeout(Some(Duration::from_secs(300)))
        .build_unchecked(manager)
}
