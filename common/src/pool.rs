//! The PostgreSQL connection pool (diesel-async over bb8), configured the same way in both binaries.

use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};

use crate::config::DatabaseConfig;
use crate::postgres::Connector;

/// A pool of PostgreSQL connections.
pub type DbPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// A connection checked out of [`DbPool`].
pub type DbConn<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

/// Builds the pool without connecting, so a process starts (and reports not-ready) while PostgreSQL
/// is down or refuses its certificate. Fails only on settings no connection could use (see
/// [`Connector::new`]). `application_name` shows in `pg_stat_activity`.
pub fn build(config: &DatabaseConfig, application_name: &str) -> anyhow::Result<DbPool> {
    let connector = Connector::new(config, application_name)?;
    let mut manager_config = ManagerConfig::default();
    manager_config.custom_setup = Box::new(move |_| {
        let connector = connector.clone();
        Box::pin(async move { connector.connect().await })
    });
    // The connection string is unused: the setup above connects from the config itself.
    let manager = AsyncDieselConnectionManager::new_with_config("", manager_config);
    Ok(bb8::Pool::builder()
        .max_size(config.pool_max_size.get())
        .min_idle(Some(config.pool_min_idle))
        .connection_timeout(config.pool_timeout)
        // A checkout test costs a round trip per request; broken connections are detected when
        // they are returned instead (diesel-async reports them via `has_broken`).
        .test_on_check_out(false)
        .idle_timeout(Some(Duration::from_secs(300)))
        .build_unchecked(manager))
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
