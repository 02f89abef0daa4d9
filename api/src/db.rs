//! PostgreSQL: the connection pool, migrations, and how database failures map to API errors.

use std::time::Duration;

use anyhow::Context;
use common::config::DatabaseConfig;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, PoolError};
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::http::error::ApiError;

/// The application's pool of PostgreSQL connections.
pub type DbPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// A connection checked out of [`DbPool`].
pub type DbConn<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

/// The migrations in `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Serialises migration runs across replicas starting at once (an arbitrary, fixed key).
const MIGRATION_LOCK_KEY: i64 = 0x0068_6c6d_736d_6967;

/// Name the api's sessions carry in `pg_stat_activity`.
const APPLICATION_NAME: &str = "highload-api";

/// Builds the pool without connecting: the api starts (and reports not-ready) while PostgreSQL is down.
pub fn pool(config: &DatabaseConfig) -> DbPool {
    let manager = AsyncDieselConnectionManager::new(config.connection_string(APPLICATION_NAME));
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

/// Applies pending migrations, holding a PostgreSQL advisory lock so that concurrent starts take turns.
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<()> {
    let conninfo = config.connection_string(APPLICATION_NAME);
    let mut conn =
        AsyncPgConnection::establish(&conninfo).await.context("failed to connect to PostgreSQL to run migrations")?;
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn)
        .await
        .context("failed to take the migration lock")?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map_err(|err| anyhow::anyhow!(err))
        .context("failed to apply migrations")?
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    let mut conn = harness.into_inner();
    // Closing the session would release the lock too; unlocking says so explicitly.
    diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn)
        .await
        .context("failed to release the migration lock")?;
    tracing::info!(migrations.applied = ?applied, "database schema is up to date");
    Ok(())
}

impl From<bb8::RunError<PoolError>> for ApiError {
    fn from(err: bb8::RunError<PoolError>) -> Self {
        match err {
            bb8::RunError::TimedOut => {
                ApiError::Unavailable(anyhow::anyhow!("no database connection became available in time"))
            }
            bb8::RunError::User(err) => {
                ApiError::Unavailable(anyhow::Error::new(err).context("failed to connect to PostgreSQL"))
            }
        }
    }
}

impl From<DieselError> for ApiError {
    fn from(err: DieselError) -> Self {
        match &err {
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => {
                ApiError::Unavailable(anyhow::Error::new(err).context("lost the PostgreSQL connection"))
            }
            // SQLSTATE 57014 (statement timeout) and 57P01..03 (server shutting down) reach diesel as
            // `Unknown`; only their messages tell them apart.
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info) if is_transient_message(info.message()) => {
                ApiError::Unavailable(anyhow::Error::new(err).context("PostgreSQL could not serve the query"))
            }
            _ => ApiError::Internal(anyhow::Error::new(err).context("database query failed")),
        }
    }
}

fn is_transient_message(message: &str) -> bool {
    ["canceling statement due to statement timeout", "terminating connection", "the database system is"]
        .iter()
        .any(|needle| message.contains(needle))
}

/// Whether `err` is a unique violation of the constraint or index `name`.
pub fn is_unique_violation(err: &DieselError, name: &str) -> bool {
    matches!(
        err,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) if info.constraint_name() == Some(name)
    )
}
