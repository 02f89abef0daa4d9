//! What an event does to the database, applied idempotently (SPEC §2 "Worker effects").
//!
//! A client event flips its row from `pending` to `processed` and bumps the user's counters in one
//! transaction; the `status = 'pending'` condition makes the event id the idempotency key, so a
//! redelivered message changes nothing. `user_deleted` removes the user's counters (idempotent too).

use common::kafka::{EventMessage, lifecycle};
use common::pool::DbPool;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{Text, Timestamptz, Uuid as SqlUuid};
use diesel::{QueryableByName, sql_query};
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager};
use uuid::Uuid;

/// Why applying an event failed.
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    /// PostgreSQL is unreachable or overloaded: retry without counting attempts, never dead-letter.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else: retried up to `WORKER_MAX_RETRIES`, then dead-lettered.
    #[error("{0}")]
    Failed(String),
}

/// What applying did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event's effects were committed now.
    Processed,
    /// Already processed earlier (a redelivery), or its user is gone: nothing to do.
    AlreadyDone,
    /// A lifecycle event; its effect (if any) is done.
    Lifecycle,
}

#[derive(QueryableByName)]
struct ClaimedEvent {
    #[diesel(sql_type = SqlUuid)]
    user_id: Uuid,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: chrono::DateTime<chrono::Utc>,
}

/// Applies one event's effects.
pub async fn apply(pool: &DbPool, message: &EventMessage) -> Result<Applied, EffectError> {
    let mut conn = pool.get().await.map_err(|err| EffectError::Unavailable(err.to_string()))?;
    if message.event_type == lifecycle::USER_DELETED {
        sql_query("DELETE FROM user_event_stats WHERE user_id = $1")
            .bind::<SqlUuid, _>(message.user_id)
            .execute(&mut conn)
            .await
            .map_err(classify)?;
        return Ok(Applied::Lifecycle);
    }
    if message.is_lifecycle() {
        return Ok(Applied::Lifecycle);
    }
    let conn: &mut AsyncPgConnection = &mut conn;
    AnsiTransactionManager::begin_transaction(conn).await.map_err(classify)?;
    match process_client_event(conn, message.id).await {
        Ok(applied) => {
            AnsiTransactionManager::commit_transaction(conn).await.map_err(classify)?;
            Ok(applied)
        }
        Err(err) => {
            let _ = AnsiTransactionManager::rollback_transaction(conn).await;
            Err(classify(err))
        }
    }
}

async fn process_client_event(conn: &mut AsyncPgConnection, event_id: Uuid) -> Result<Applied, DieselError> {
    let claimed: Option<ClaimedEvent> = sql_query(
        "UPDATE events SET status = 'processed', processed_at = now()
          WHERE id = $1 AND status = 'pending'
      RETURNING user_id, type AS event_type, created_at",
    )
    .bind::<SqlUuid, _>(event_id)
    .get_result(conn)
    .await
    .map(Some)
    .or_else(|err| if err == DieselError::NotFound { Ok(None) } else { Err(err) })?;
    let Some(event) = claimed else {
        return Ok(Applied::AlreadyDone);
    };
    sql_query(
        "INSERT INTO user_event_stats (user_id, type, count, last_event_at) VALUES ($1, $2, 1, $3)
         ON CONFLICT (user_id, type) DO UPDATE
            SET count = user_event_stats.count + 1,
                last_event_at = GREATEST(user_event_stats.last_event_at, EXCLUDED.last_event_at)",
    )
    .bind::<SqlUuid, _>(event.user_id)
    .bind::<Text, _>(&event.event_type)
    .bind::<Timestamptz, _>(event.created_at)
    .execute(conn)
    .await?;
    Ok(Applied::Processed)
}

/// Marks a dead-lettered client event `failed` (no-op for lifecycle events and processed ones).
pub async fn mark_failed(pool: &DbPool, event_id: Uuid) -> Result<(), EffectError> {
    let mut conn = pool.get().await.map_err(|err| EffectError::Unavailable(err.to_string()))?;
    sql_query("UPDATE events SET status = 'failed' WHERE id = $1 AND status = 'pending'")
        .bind::<SqlUuid, _>(event_id)
        .execute(&mut conn)
        .await
        .map_err(classify)?;
    Ok(())
}

fn classify(err: DieselError) -> EffectError {
    let transient = match &err {
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => true,
        DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        DieselError::DatabaseError(_, info) => [
            "deadlock detected",
            "canceling statement due to statement timeout",
            "terminating connection",
            "the database system is",
        ]
        .iter()
        .any(|needle| info.message().contains(needle)),
        _ => false,
    };
    if transient { EffectError::Unavailable(err.to_string()) } else { EffectError::Failed(err.to_string()) }
}
