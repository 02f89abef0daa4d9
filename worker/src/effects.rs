//! What an event does to the database, applied idempotently (SPEC §2 "Worker effects").
//!
//! A client event flips its row from `pending` to `processed` and bumps the user's counters in one
//! statement; the `status = 'pending'` condition makes the event id the idempotency key, so a
//! redelivered message changes nothing. `user_deleted` removes the user's counters (idempotent too).
//! Events are applied in batches (one statement per batch): a commit per event is what bounds a
//! worker's throughput on PostgreSQL, not the work inside it.

use std::collections::HashSet;

use common::db::prepared::{Bind, Prepared};
use common::kafka::{EventMessage, lifecycle};
use common::pool::DbPool;
use diesel::QueryableByName;
use diesel::result::Error as DieselError;
use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AnsiTransactionManager, RunQueryDsl, TransactionManager};
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
struct Claimed {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// Claims the pending events among `$1` and adds them to their users' counters, in one statement (so
/// one transaction and one round trip for the whole batch). The `status = 'pending'` condition makes
/// each event id its own idempotency key; returns the ids claimed now.
const CLAIM_AND_COUNT: &str = "
WITH claimed AS (
    UPDATE events SET status = 'processed', processed_at = now()
     WHERE id = ANY($1) AND status = 'pending'
 RETURNING id, user_id, type, created_at
), counted AS (
    INSERT INTO user_event_stats (user_id, type, count, last_event_at)
    SELECT user_id, type, count(*), max(created_at) FROM claimed
     GROUP BY user_id, type
     -- One lock order for every writer, so concurrent batches cannot deadlock on counter rows.
     ORDER BY user_id, type
    ON CONFLICT (user_id, type) DO UPDATE
       SET count = user_event_stats.count + EXCLUDED.count,
           last_event_at = GREATEST(user_event_stats.last_event_at, EXCLUDED.last_event_at)
)
SELECT id FROM claimed";

/// Applies the effects of a batch of events (one lane's, in order) and says what it did to each.
///
/// Client events are claimed and counted in one statement; a `user_deleted` then removes the user's
/// counters (a no-op when the deletion's cascade got there first), in the same transaction. A failure
/// fails the whole batch: nothing of it is committed, and the caller retries or splits it.
pub async fn apply(pool: &DbPool, events: &[&EventMessage]) -> Result<Vec<Applied>, EffectError> {
    let client_events: Vec<Uuid> = events.iter().filter(|event| !event.is_lifecycle()).map(|event| event.id).collect();
    let deleted_users: Vec<Uuid> =
        events.iter().filter(|event| event.event_type == lifecycle::USER_DELETED).map(|event| event.user_id).collect();
    let claimed = pool
        .run(|conn| {
            Box::pin(async move {
                // Two statements are one transaction (one alone is atomic anyway, and deletions are rare).
                let both = !client_events.is_empty() && !deleted_users.is_empty();
                if both {
                    AnsiTransactionManager::begin_transaction(conn).await.map_err(classify)?;
                }
                let result = async {
                    let claimed: HashSet<Uuid> = if client_events.is_empty() {
                        HashSet::new()
                    } else {
                        Prepared::new(CLAIM_AND_COUNT, vec![Bind::Uuids(&client_events)])
                            .load::<Claimed>(conn)
                            .await?
                            .into_iter()
                            .map(|row| row.id)
                            .collect()
                    };
                    if !deleted_users.is_empty() {
                        Prepared::new(
                            "DELETE FROM user_event_stats WHERE user_id = ANY($1)",
                            vec![Bind::Uuids(&deleted_users)],
                        )
                        .execute(conn)
                        .await?;
                    }
                    if both {
                        AnsiTransactionManager::commit_transaction(conn).await?;
                    }
                    Ok(claimed)
                }
                .await;
                if result.is_err() && both {
                    // A failed rollback leaves the connection marked broken; the pool then discards it.
                    let _ = AnsiTransactionManager::rollback_transaction(conn).await;
                }
                result.map_err(classify)
            })
        })
        .await?;
    Ok(events
        .iter()
        .map(|event| {
            if event.is_lifecycle() {
                Applied::Lifecycle
            } else if claimed.contains(&event.id) {
                Applied::Processed
            } else {
                Applied::AlreadyDone
            }
        })
        .collect())
}

/// Marks a dead-lettered client event `failed` (no-op for lifecycle events and processed ones).
pub async fn mark_failed(pool: &DbPool, event_id: Uuid) -> Result<(), EffectError> {
    pool.run(|conn| {
        Box::pin(async move {
            Prepared::new(
                "UPDATE events SET status = 'failed' WHERE id = $1 AND status = 'pending'",
                vec![Bind::Uuid(event_id)],
            )
            .execute(conn)
            .await
            .map_err(classify)?;
            Ok(())
        })
    })
    .await
}

impl From<common::pool::Unavailable> for EffectError {
    fn from(err: common::pool::Unavailable) -> Self {
        EffectError::Unavailable(err.to_string())
    }
}

fn classify(err: DieselError) -> EffectError {
    if common::pool::is_transient(&err) {
        EffectError::Unavailable(err.to_string())
    } else {
        EffectError::Failed(err.to_string())
    }
}
