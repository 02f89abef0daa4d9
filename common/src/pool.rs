//! The PostgreSQL connection pool (diesel-async over bb8), configured the same way in both binaries.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, PoolError};
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, TransactionManager};
use tracing::Instrument;

use crate::config::DatabaseConfig;
use crate::postgres::Connector;

type Manager = AsyncDieselConnectionManager<AsyncPgConnection>;

/// Work on one connection: a closure returning a boxed future that borrows the connection.
pub type Work<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// A pool of PostgreSQL connections whose every use has a client-side deadline.
///
/// The server's `statement_timeout` cannot help when the server hangs (a frozen process still
/// acknowledges TCP) or the route drops packets silently (TCP gives up only after
/// `tcp_user_timeout`): a query then waits with its pool slot held. So every unit of work gets
/// a deadline (`DB_STATEMENT_TIMEOUT_MS` + 1 s), and a connection whose work did not finish — past the deadline, or
/// abandoned because the caller gave up (a request timeout) — is never handed out again: the
/// next caller would wait on the same dead connection.
#[derive(Clone)]
pub struct DbPool {
    pool: bb8::Pool<Manager>,
    deadline: Duration,
    max_size: NonZeroU32,
}

/// PostgreSQL did not serve the work: retry later, never a client's fault.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// Every connection stayed busy, or none could be opened, for `DB_POOL_TIMEOUT_MS`.
    #[error("no database connection became available in time")]
    PoolTimedOut,
    /// Opening a connection failed.
    #[error("failed to connect to PostgreSQL: {0}")]
    Connect(#[source] PoolError),
    /// The work outlived its deadline; its connection is dropped.
    #[error("no answer from PostgreSQL within {0:?}")]
    Deadline(Duration),
}

impl DbPool {
    /// Runs `work` on a pooled connection within its deadline.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        E: From<Unavailable>,
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> Work<'c, Result<T, E>>,
    {
        let span = crate::traces::postgres();
        let result = self.run_in_span(work).instrument(span.clone()).await;
        if result.is_err() {
            crate::traces::record_error(&span);
        }
        result
    }

    async fn run_in_span<T, E, F>(&self, work: F) -> Result<T, E>
    where
        E: From<Unavailable>,
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> Work<'c, Result<T, E>>,
    {
        let conn = self.pool.get().await.map_err(|err| match err {
            bb8::RunError::TimedOut => Unavailable::PoolTimedOut,
            bb8::RunError::User(err) => Unavailable::Connect(err),
        })?;
        let mut checkout = Checkout { conn, finished: false };
        let result = tokio::time::timeout(self.deadline, work(&mut checkout.conn))
            .await
            .map_err(|_| Unavailable::Deadline(self.deadline))?;
        checkout.finished = true;
        result
    }

    /// Connections open and idle.
    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }

    /// Most connections it opens.
    pub fn max_size(&self) -> NonZeroU32 {
        self.max_size
    }
}

/// A checked-out connection that goes back to the pool only if its work finished.
struct Checkout<'a> {
    conn: bb8::PooledConnection<'a, Manager>,
    finished: bool,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // The pool discards a connection whose transaction manager is in error when it comes back.
            AnsiTransactionManager::transaction_manager_status_mut(&mut *self.conn).set_in_error();
        }
    }
}

/// Builds the pool without connecting, so a process starts (and reports not-ready) while PostgreSQL
/// is down or refuses its certificate. Fails only on settings no connection could use (see
/// [`Connector::new`]). `application_name` shows in `pg_stat_activity`. Its sessions plan statements
/// PostgreSQL's way, for the values bound, until a cached plan looks as cheap: right for queries whose
/// best plan depends on those values (a filter on a column where some values are rare).
pub fn build(config: &DatabaseConfig, application_name: &str) -> anyhow::Result<DbPool> {
    Ok(build_with(Connector::new(config, application_name)?, config, config.pool_max_size))
}

/// Settings of the sessions [`generic_plan_connector`] opens.
const GENERIC_PLAN_SETTINGS: &[(&str, &str)] = &[("plan_cache_mode", "force_generic_plan")];

/// Opens sessions that plan each statement once and keep the plan (`plan_cache_mode =
/// force_generic_plan`), for statements that find every row by key (an id, an array of ids): one plan
/// fits whatever values they bind. PostgreSQL's default planned such statements again on most calls (a
/// plan for an array of unknown length never looked as cheap to it as one for the array bound): side
/// by side, the events insert on 88 % of its calls and the worker's claim on 73 %, 57 µs of planning
/// per event (BENCHMARKS.md, "One plan per statement for the writers"). Never for sessions that run
/// filters: their cached plan would fit an average value, not the one asked for. PostgreSQL before 12
/// refuses the setting.
pub fn generic_plan_connector(config: &DatabaseConfig, application_name: &str) -> anyhow::Result<Connector> {
    Connector::with_settings(config, application_name, GENERIC_PLAN_SETTINGS)
}

/// As [`build`], with `connector`'s sessions (built from the same `config`) and at most `max_size`.
pub fn build_with(connector: Connector, config: &DatabaseConfig, max_size: NonZeroU32) -> DbPool {
    let mut manager_config = ManagerConfig::default();
    manager_config.custom_setup = Box::new(move |_| {
        let connector = connector.clone();
        Box::pin(async move { connector.connect().await })
    });
    // The connection string is unused: the setup above connects from the config itself.
    let manager = AsyncDieselConnectionManager::new_with_config("", manager_config);
    let pool = bb8::Pool::builder()
        .max_size(max_size.get())
        .min_idle(Some(config.pool_min_idle.min(max_size.get())))
        .connection_timeout(config.pool_timeout)
        // A checkout test costs a round trip per request; broken connections are detected when
        // they are returned instead (diesel-async reports them via `has_broken`, and
        // [`DbPool::run`] marks the ones whose work did not finish).
        .test_on_check_out(false)
        .idle_timeout(Some(Duration::from_secs(300)))
        .build_unchecked(manager);
    // `DB_STATEMENT_TIMEOUT_MS` plus a second, so that the server cancels a slow statement (a clearer
    // error) before the client gives up on the connection.
    DbPool { pool, deadline: config.statement_timeout + Duration::from_secs(1), max_size }
}

/// Whether a query failed because PostgreSQL could not serve it right now (connection lost or
/// refused, server shutting down, statement timeout, a deadlock or serialization failure to
/// retry), as opposed to a query that can never succeed. Callers answer 503 or retry the former.
pub fn is_transient(err: &DieselError) -> bool {
    match err {
        // No SQLSTATE: the command never got an answer (the connection broke or was cut).
        DieselError::DatabaseError(
            DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::UnableToSendCommand
            | DatabaseErrorKind::SerializationFailure,
            _,
        ) => true,
        // SQLSTATE 57014 (statement timeout), 57P01..03 (server shutting down) and 40P01 (deadlock)
        // reach diesel as `Unknown`; only their messages tell them apart.
        DieselError::DatabaseError(DatabaseErrorKind::Unknown, info) => [
            "canceling statement due to statement timeout",
            "terminating connection",
            "the database system is",
            "deadlock detected",
        ]
        .iter()
        .any(|needle| info.message().contains(needle)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_transient_and_constraint_violations_are_not() {
        let transient = [
            DieselError::DatabaseError(
                DatabaseErrorKind::UnableToSendCommand,
                Box::new("connection closed".to_owned()),
            ),
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, Box::new(String::new())),
            DieselError::DatabaseError(
                DatabaseErrorKind::Unknown,
                Box::new("terminating connection due to administrator command".to_owned()),
            ),
        ];
        assert!(transient.iter().all(is_transient));
        let permanent = [
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, Box::new("duplicate key".to_owned())),
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, Box::new("poison event refused".to_owned())),
            DieselError::NotFound,
        ];
        assert!(!permanent.iter().any(is_transient));
    }
}
