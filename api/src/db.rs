//! PostgreSQL: the connection pool, migrations, and how database failures map to API errors.

use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context;
use common::config::DatabaseConfig;
use common::postgres::Connector;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{AnsiTransactionManager, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, TransactionManager};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::http::error::ApiError;

pub use common::pool::DbPool;

/// The migrations in `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Serialises migration runs across replicas starting at once (an arbitrary, fixed key).
const MIGRATION_LOCK_KEY: i64 = 0x0068_6c6d_736d_6967;

/// Name the api's sessions carry in `pg_stat_activity`.
const APPLICATION_NAME: &str = "highload-api";

/// Builds the api's pool (see [`common::pool::build`]).
pub fn pool(config: &DatabaseConfig) -> anyhow::Result<DbPool> {
    common::pool::build(config, APPLICATION_NAME)
}

/// Name of the event writer's sessions in `pg_stat_activity`.
pub const EVENTS_APPLICATION_NAME: &str = "highload-api-events";

/// Builds the event writer's own sessions, one per statement it runs at once. Apart from the api's
/// pool because its one statement inserts a batch by key and keeps one plan for every batch
/// ([`common::pool::generic_plan_connector`]), while the pool's filtered queries need plans made for
/// the value asked.
pub fn events_pool(config: &DatabaseConfig) -> anyhow::Result<DbPool> {
    let connector = common::pool::generic_plan_connector(config, EVENTS_APPLICATION_NAME)?;
    let sessions = NonZeroU32::try_from(u32::try_from(crate::events::writer::STATEMENTS_IN_FLIGHT)?)?;
    Ok(common::pool::build_with(connector, config, sessions))
}

/// Applies pending migrations as the schema's owner (`DB_MIGRATION_USER`), holding a PostgreSQL
/// advisory lock so that concurrent starts take turns, then grants the running binaries' role
/// (`DB_USER`) what they need when it is another role: DML on the service's tables, nothing more.
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<()> {
    let mut conn = Connector::new(&config.as_migration_owner()?, APPLICATION_NAME)?
        .connect()
        .await
        .context("failed to connect to PostgreSQL to run migrations")?;
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
    if config.user != config.migration_user {
        grant_dml(&mut conn, &config.user).await?;
    }
    // Closing the session would release the lock too; unlocking says so explicitly.
    diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn)
        .await
        .context("failed to release the migration lock")?;
    tracing::info!(migrations.applied = ?applied, "database schema is up to date");
    Ok(())
}

/// Grants `role` DML on every table and sequence of the schema, and only reading of the migrations'
/// own bookkeeping. Run after each migration, so tables added later are granted too.
async fn grant_dml(conn: &mut AsyncPgConnection, role: &str) -> anyhow::Result<()> {
    let role = format!("\"{}\"", role.replace('"', "\"\""));
    let statements = [
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("REVOKE INSERT, UPDATE, DELETE ON __diesel_schema_migrations FROM {role}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"),
    ];
    for statement in statements {
        diesel::sql_query(&statement)
            .execute(conn)
            .await
            .with_context(|| format!("failed to grant the runtime role its privileges ({statement})"))?;
    }
    tracing::info!(role, "runtime role granted DML on the service's tables");
    Ok(())
}

/// Runs `work` in one transaction on a task of its own (see [`detached`]).
/// Any error from `work` rolls the transaction back.
pub async fn transaction<T, F>(pool: &DbPool, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<T, ApiError>> + Send + 'static,
{
    detached(pool, move |conn| {
        Box::pin(async move {
            AnsiTransactionManager::begin_transaction(conn).await?;
            match work(conn).await {
                Ok(value) => {
                    AnsiTransactionManager::commit_transaction(conn).await?;
                    Ok(value)
                }
                Err(err) => {
                    // A failed rollback leaves the connection marked broken; the pool then discards it.
                    let _ = AnsiTransactionManager::rollback_transaction(conn).await;
                    Err(err)
                }
            }
        })
    })
    .await
}

/// Runs a write on a pooled connection on a task of its own: a request that times out stops waiting,
/// but cannot cancel the write half-way; it completes or fails as a whole.
pub async fn detached<T, F>(pool: &DbPool, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<T, ApiError>> + Send + 'static,
{
    let pool = pool.clone();
    // In the request's span, so that the write shows in its trace.
    tokio::spawn(async move { pool.run(work).await }.in_current_span())
        .await
        .map_err(|err| ApiError::Internal(anyhow::Error::new(err).context("database task failed")))?
}

impl From<common::pool::Unavailable> for ApiError {
    fn from(err: common::pool::Unavailable) -> Self {
        Arc::new(err).into()
    }
}

/// Shared, for the event writer's batches: every request of a failed batch gets its own answer.
impl From<Arc<common::pool::Unavailable>> for ApiError {
    fn from(err: Arc<common::pool::Unavailable>) -> Self {
        ApiError::Unavailable(err.into())
    }
}

impl From<DieselError> for ApiError {
    fn from(err: DieselError) -> Self {
        Arc::new(err).into()
    }
}

/// Shared, as for [`common::pool::Unavailable`]: the one place a failed query becomes 503 or 500.
impl From<Arc<DieselError>> for ApiError {
    fn from(err: Arc<DieselError>) -> Self {
        if common::pool::is_transient(&err) {
            ApiError::Unavailable(anyhow::Error::new(err).context("PostgreSQL could not serve the query"))
        } else {
            ApiError::Internal(anyhow::Error::new(err).context("database query failed"))
        }
    }
}

/// Whether `err` is a unique violation of the constraint or index `name`.
pub fn is_unique_violation(err: &DieselError, name: &str) -> bool {
    matches!(
        err,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) if info.constraint_name() == Some(name)
    )
}
