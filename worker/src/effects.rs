//! What an event does to the database, applied idempotently (SPEC §2 "Worker effects").
//!
//! A client event flips its row from `pending` to `processed` and bumps the user's counters in one
//! statement; the `status = 'pending'` condition makes the event id the idempotency key, so a
//! redelivered message changes nothing. `user_deleted` removes the user's counters (idempotent too).
//! Events are applied in batches (one statement per batch): a commit per event is what bounds a
//! worker's throughput on PostgreSQL, not the work inside it.

use std::collections::HashSet;

use common::db::prepared::{Bind, Prepared};
use common::group_commit::GroupCommit;
use common::kafka::{EventMessage, lifecycle};
use common::pool::DbPool;
use diesel::QueryableByName;
use diesel::result::Error as DieselError;
use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AnsiTransactionManager, RunQueryDsl, TransactionManager};
use prometheus::Histogram;
use tracing::{Instrument, Span};
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

/// Lanes' batches merged into one statement at most, and merged statements running at once.
/// Measured side by side with 16 lanes (BENCHMARKS.md, "Where the time goes"): one statement per lane
/// (no merging) cost 150–196 µs of PostgreSQL CPU per event end to end; 2 statements of up to 16
/// batches 135–141 µs, but drained a backlog at 5.8–7.1k events/s against 7.6–15.9k (a few large
/// statements serialise what 16 lanes overlapped); 4 of up to 4 kept the drain at 8.5–9.2k/s for
/// 144–151 µs end to end.
pub const MAX_MERGED: usize = 4;
/// See [`MAX_MERGED`].
pub const STATEMENTS_IN_FLIGHT: usize = 4;

/// What a lane's batch asks of the database.
#[derive(Debug)]
struct Changes {
    /// Client events to claim and count.
    client_events: Vec<Uuid>,
    /// Users whose counters go.
    deleted_users: Vec<Uuid>,
    /// The caller's span: a statement's database span sits under its first batch's.
    span: Span,
}

/// Applies lanes' batches, concurrent ones in one statement ([`common::group_commit`]); cheap to clone.
#[derive(Clone)]
pub struct Effects {
    commits: GroupCommit<Changes, Result<HashSet<Uuid>, EffectError>>,
}

impl Effects {
    /// Starts the task merging batches (call inside the runtime); `merged` observes how many
    /// batches each statement applies.
    pub fn start(pool: DbPool, merged: Histogram) -> Self {
        let commits = GroupCommit::start(STATEMENTS_IN_FLIGHT, MAX_MERGED, merged, move |batches: Vec<Changes>| {
            apply_merged(pool.clone(), batches)
        });
        Self { commits }
    }

    /// Batches waiting for a statement.
    pub fn queued(&self) -> usize {
        self.commits.queued()
    }

    /// Applies the effects of a batch of events (one lane's, in order) and says what it did to each.
    ///
    /// Client events are claimed and counted in one statement; a `user_deleted` then removes the
    /// user's counters (a no-op when the deletion's cascade got there first), in the same
    /// transaction. A failure fails the whole batch: nothing of it is committed, and the caller
    /// retries or splits it. Merged with other lanes' batches, the result is the same as alone: a
    /// merged statement that fails for anything but an unavailable database is run again batch by batch.
    pub async fn apply(&self, events: &[&EventMessage]) -> Result<Vec<Applied>, EffectError> {
        let changes = Changes {
            client_events: events.iter().filter(|event| !event.is_lifecycle()).map(|event| event.id).collect(),
            deleted_users: events
                .iter()
                .filter(|event| event.event_type == lifecycle::USER_DELETED)
                .map(|event| event.user_id)
                .collect(),
            span: Span::current(),
        };
        let claimed = self
            .commits
            .submit(changes)
            .await
            .unwrap_or_else(|| Err(EffectError::Unavailable("the worker is stopping".to_owned())))?;
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
}

/// Applies `batches` in one statement (or two in a transaction); each batch's result as if alone.
async fn apply_merged(pool: DbPool, batches: Vec<Changes>) -> Vec<Result<HashSet<Uuid>, EffectError>> {
    if let [alone] = batches.as_slice() {
        return vec![apply_changes(&pool, alone).await];
    }
    let merged = Changes {
        client_events: batches.iter().flat_map(|batch| batch.client_events.iter().copied()).collect(),
        deleted_users: batches.iter().flat_map(|batch| batch.deleted_users.iter().copied()).collect(),
        span: batches[0].span.clone(),
    };
    match apply_changes(&pool, &merged).await {
        Ok(claimed) => batches
            .iter()
            .map(|batch| Ok(batch.client_events.iter().copied().filter(|id| claimed.contains(id)).collect()))
            .collect(),
        Err(EffectError::Unavailable(error)) => {
            batches.iter().map(|_| Err(EffectError::Unavailable(error.clone()))).collect()
        }
        Err(EffectError::Failed(error)) => {
            tracing::warn!(
                error,
                batches = batches.len(),
                "a merged statement failed; applying its lanes' batches apart"
            );
            let mut results = Vec::with_capacity(batches.len());
            for batch in &batches {
                results.push(apply_changes(&pool, batch).await);
            }
            results
        }
    }
}

/// Applies `changes` in one statement (two in one transaction when it also deletes counters);
/// returns the ids claimed now.
async fn apply_changes(pool: &DbPool, changes: &Changes) -> Result<HashSet<Uuid>, EffectError> {
    let client_events = changes.client_events.clone();
    let deleted_users = changes.deleted_users.clone();
    let span = changes.span.clone();
    pool.run(|conn| {
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
    .instrument(span)
    .await
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
