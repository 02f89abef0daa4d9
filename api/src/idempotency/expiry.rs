//! The expiry job: deletes `idempotency_keys` rows past `expires_at`, a bounded batch per statement,
//! so that the table holds about one `IDEMPOTENCY_TTL` of keys. Correctness does not depend on it
//! (lookups ignore expired rows, and a new answer replaces an expired row); it only bounds the table.
//!
//! Every replica runs it. Batches lock their rows with `SKIP LOCKED`, so replicas running at once
//! delete disjoint rows instead of queueing behind each other, and no batch holds more than
//! [`BATCH_SIZE`] row locks or runs long enough to reach `DB_STATEMENT_TIMEOUT_MS`.

use std::time::Duration;

use chrono::Utc;
use common::db::prepared::{Bind, Prepared};
use diesel_async::RunQueryDsl;
use prometheus::IntCounter;
use tokio::sync::watch;

use crate::db::DbPool;

/// Rows deleted per statement.
pub const BATCH_SIZE: i64 = 1000;

/// Longest pause between two passes: a table filling faster than one batch per pass keeps going
/// without pausing (see [`run`]).
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// Expiry is judged by the api's clock, the one that set `expires_at` (as lookups do).
const DELETE_EXPIRED: &str = "
DELETE FROM idempotency_keys WHERE (client_id, idempotency_key) IN (
    SELECT client_id, idempotency_key FROM idempotency_keys WHERE expires_at <= $1
    ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Runs until `stop` turns true: a pass every `ttl` (at most [`MAX_INTERVAL`]), each pass deleting
/// batches until one comes back short, counted in `deleted_total`. A failure (PostgreSQL down) is
/// logged and the next pass tries again.
pub async fn run(pool: DbPool, ttl: Duration, deleted_total: IntCounter, mut stop: watch::Receiver<bool>) {
    let interval = ttl.min(MAX_INTERVAL);
    loop {
        match delete_expired(&pool, &deleted_total).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(idempotency.keys_deleted = deleted, "expired idempotency keys deleted"),
            Err(err) => {
                let error = format!("{err:#}");
                tracing::warn!(error, "could not delete expired idempotency keys; will retry");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// One pass: batches until one deletes fewer than [`BATCH_SIZE`] rows; the number deleted.
async fn delete_expired(pool: &DbPool, deleted_total: &IntCounter) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let deleted = pool
            .run(|conn| {
                Box::pin(async move {
                    let binds = vec![Bind::Timestamp(Utc::now()), Bind::BigInt(BATCH_SIZE)];
                    Ok::<_, anyhow::Error>(Prepared::new(DELETE_EXPIRED, binds).execute(conn).await?)
                })
            })
            .await?;
        total += deleted;
        deleted_total.inc_by(u64::try_from(deleted).unwrap_or(u64::MAX));
        if i64::try_from(deleted).unwrap_or(i64::MAX) < BATCH_SIZE {
            return Ok(total);
        }
    }
}
